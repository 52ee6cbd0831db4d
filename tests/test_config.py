import pytest
import yaml

from retriever.config import ConfigError, TrainConfig, load_config
from retriever.negatives import NegativeStrategy, StrategyOptions, register_strategy

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def write(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(obj))
    return path


@pytest.fixture
def triples(tmp_path):
    f = tmp_path / "data" / "triples.tsv"
    f.parent.mkdir()
    f.write_text("q1\tpos one\tneg one\n")
    return f


def test_shipped_configs_validate_and_resolve_relative_paths(shared_data, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # not the repo root: the config file's parent must be the fallback
    sci = load_config(ROOT / "configs" / "scifact-inbatch.yaml")
    assert sci.data.beir == str((shared_data / "beir" / "scifact").resolve())
    assert (sci.training.batch_size, sci.training.epochs, sci.model.query_max_length, sci.model.doc_max_length) == (32, 1, 64, 256)
    marco = load_config(ROOT / "configs" / "msmarco-inbatch.yaml")
    assert marco.data.source == "triples" and marco.negatives.options == {"per_query": 1}


def test_working_directory_wins_over_config_parent(tmp_path, monkeypatch, triples):
    cfg = write(tmp_path / "configs" / "c.yaml", {"data": {"triples": "data/triples.tsv"}})
    assert load_config(cfg).data.triples == str(triples.resolve())  # via the config folder's parent
    here = tmp_path / "elsewhere"
    (here / "data").mkdir(parents=True)
    (here / "data" / "triples.tsv").write_text("a\tb\tc\n")
    monkeypatch.chdir(here)
    assert load_config(cfg).data.triples == str((here / "data" / "triples.tsv").resolve())


def test_unknown_key_names_file_key_valid_keys_and_suggestion(tmp_path, triples):
    cfg = write(tmp_path / "configs" / "bad.yaml", {"data": {"triples": str(triples)}, "training": {"learning_rat": 1e-4}})
    with pytest.raises(ConfigError) as err:
        load_config(cfg)
    msg = str(err.value)
    assert str(cfg) in msg and "training.learning_rat" in msg
    assert "Did you mean 'learning_rate'" in msg and "batch_size" in msg and "grad_cache" in msg


def test_unknown_section_is_an_error(tmp_path, triples):
    cfg = write(tmp_path / "c.yaml", {"data": {"triples": str(triples)}, "eval": {"every": 10}})
    with pytest.raises(ConfigError, match="unknown key in section top-level 'eval'.*Valid: model, data, negatives, training"):
        load_config(cfg)


def test_overrides_parse_yaml_scalars_and_reject_unknown_keys(tmp_path, triples):
    cfg = write(tmp_path / "c.yaml", {"data": {"triples": str(triples)}})
    c = load_config(cfg, ["training.bf16=true", "training.learning_rate=3.0e-5", "model.pooling=cls",
                          "negatives.strategy=hard", "negatives.options.per_query=4", "model.query_prefix=query: "])
    assert c.training.bf16 is True and c.training.learning_rate == 3e-5 and c.model.pooling == "cls"
    assert c.negatives.options == {"per_query": 4} and c.model.query_prefix == "query: "
    with pytest.raises(ConfigError, match="Did you mean 'batch_size'"):
        load_config(cfg, ["training.batchsize=8"])
    with pytest.raises(ConfigError, match="expected section.key=value"):
        load_config(cfg, ["training.batch_size"])
    with pytest.raises(ConfigError, match="training.batch_size"):
        load_config(cfg, ["training.batch_size=lots"])


def test_data_needs_exactly_one_source(triples):
    with pytest.raises(ValueError, match="exactly one data source"):
        TrainConfig.model_validate({"data": {"triples": str(triples), "jsonl": "x.jsonl"}})
    with pytest.raises(ValueError, match="exactly one data source"):
        TrainConfig.model_validate({"data": {"split": "train"}})
    with pytest.raises(ValueError, match="needs `queries` and `collection`"):
        TrainConfig.model_validate({"data": {"qrels": "q.tsv"}})


def test_strategy_name_and_options_are_validated(triples):
    with pytest.raises(ValueError, match="unknown strategy 'hrad'.*Did you mean 'hard'"):
        TrainConfig.model_validate({"data": {"triples": str(triples)}, "negatives": {"strategy": "hrad"}})
    with pytest.raises(ValueError, match="Did you mean 'per_query'"):
        TrainConfig.model_validate({"data": {"triples": str(triples)},
                                    "negatives": {"strategy": "hard", "options": {"per_qury": 2}}})


def test_registered_strategy_is_usable_from_config(triples):
    class Opts(StrategyOptions):
        margin: float = 0.1

    @register_strategy("test-margin")
    class Margin(NegativeStrategy):
        Options = Opts

    c = TrainConfig.model_validate({"data": {"triples": str(triples)},
                                    "negatives": {"strategy": "test-margin", "options": {"margin": 0.3}}})
    assert c.negatives.options == {"margin": 0.3}


def test_resolved_config_round_trips(tmp_path, triples):
    c = load_config(write(tmp_path / "c.yaml", {"data": {"triples": str(triples)}}))
    again = TrainConfig.model_validate(yaml.safe_load(c.to_yaml()))
    assert again == c


def test_cli_reports_bad_config_without_traceback(tmp_path, triples):
    from typer.testing import CliRunner

    from retriever.cli import _register_all, app

    _register_all()
    cfg = write(tmp_path / "bad.yaml", {"data": {"triples": str(triples)}, "model": {"pooling": "max"}})
    result = CliRunner().invoke(app, ["train", "--config", str(cfg), "--output", str(tmp_path / "run")])
    assert result.exit_code == 2
    assert "model.pooling" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("strategy, options", [("adore", {}), ("ar2", {}), ("tasb", {"loss": "margin_mse", "hard_per_query": 1}),
                                               ("tasb", {"loss": "distill_kl", "hard_per_query": 1})])
@pytest.mark.parametrize("training", [{"loss": "decoupled"}, {"grad_cache": True}])
def test_loss_options_refused_where_a_strategy_has_its_own_loss(strategy, options, training):
    """training.loss / grad_cache would silently do nothing under ADORE, AR2 and TAS-B distillation."""
    raw = {"data": {"triples": "t.tsv"}, "negatives": {"strategy": strategy, "options": options}, "training": training}
    with pytest.raises(ValueError, match=rf"training\.(loss|grad_cache).*no effect.*{strategy}"):
        TrainConfig.model_validate(raw)


@pytest.mark.parametrize("strategy, options", [("inbatch", {}), ("hard", {}), ("tasb", {}), ("star", {})])
def test_loss_options_accepted_where_the_trainer_step_runs(strategy, options):
    raw = {"data": {"triples": "t.tsv"}, "negatives": {"strategy": strategy, "options": options},
           "training": {"loss": "decoupled", "grad_cache": True}}
    assert TrainConfig.model_validate(raw).training.loss == "decoupled"
