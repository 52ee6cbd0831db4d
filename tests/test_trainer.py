import json

import pytest
import torch

from retriever.config import TrainConfig
from retriever.data import TrainingExample, iter_triples
from retriever.losses import ContrastiveLoss
from retriever.modeling import BiEncoder
from retriever.negatives import HardNegatives, NegativeStrategy
from retriever.step import grad_cache_step, plain_step
from retriever.train_data import BatchCollator
from retriever.trainer import train


@pytest.fixture(autouse=True)
def one_thread():
    # 2 shared cores: one intra-op thread avoids oversubscription stalls with tiny models.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def triples_path(shared_data):
    return shared_data / "msmarco" / "samples" / "triples.train.small.head100.tsv"


@pytest.fixture
def batch(triples_path):
    examples = list(iter_triples(triples_path))[:8]
    return BatchCollator(HardNegatives({"per_query": 1}), seed=0)(examples, list(range(8)), epoch=0)


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def run(step_fn, model, batch, **kw):
    model.zero_grad(set_to_none=True)
    loss = step_fn(model, batch, ContrastiveLoss(0.05), NegativeStrategy(), bf16=False, **kw)
    return loss, grads(model)


def assert_same_grads(a, b, atol, rtol=1e-4):
    assert a.keys() == b.keys() and a
    for name in a:
        diff = (a[name] - b[name]).abs().max().item()
        assert diff <= atol + rtol * b[name].abs().max().item(), (name, diff)


def test_grad_cache_matches_plain_step_over_several_chunks(tiny_model_dir, batch):
    model = BiEncoder.from_pretrained(tiny_model_dir)
    model.eval()  # no dropout: chunked and whole-batch forwards then compute the same function
    loss_plain, g_plain = run(plain_step, model, batch)
    loss_gc, g_gc = run(grad_cache_step, model, batch, chunk_size=3)
    assert abs(loss_plain - loss_gc) < 1e-5
    # fp32 sums in a different order in chunks: ~3e-6 on gradients of ~1e-2 here, 6.6e-6 on the CI CPU
    # (stop 25). A chunking bug errs by the gradient's own size, ~1e-2: 1e-3 relative still catches it.
    assert_same_grads(g_plain, g_gc, atol=5e-6, rtol=1e-3)


def test_grad_cache_replays_dropout_masks(tiny_model_dir, batch):
    model = BiEncoder.from_pretrained(tiny_model_dir)
    model.train()  # dropout on: the re-run must reuse each chunk's RNG state
    torch.manual_seed(7)
    loss_plain, g_plain = run(plain_step, model, batch)
    torch.manual_seed(7)
    loss_gc, g_gc = run(grad_cache_step, model, batch, chunk_size=64)  # one chunk per kind = same draws as plain
    assert abs(loss_plain - loss_gc) < 1e-5
    assert_same_grads(g_plain, g_gc, atol=1e-6)


def test_strategy_exclude_mask_reaches_the_loss(tiny_model_dir, batch):
    class DropAllHardNegatives(NegativeStrategy):
        def exclude_mask(self, batch, q, d):
            mask = torch.zeros(q.shape[0], d.shape[0], dtype=torch.bool)
            mask[:, len(batch.queries):] = True
            return mask

    model = BiEncoder.from_pretrained(tiny_model_dir)
    model.eval()
    full = plain_step(model, batch, ContrastiveLoss(0.05), NegativeStrategy(), bf16=False)
    masked = plain_step(model, batch, ContrastiveLoss(0.05), DropAllHardNegatives(), bf16=False)
    only_positives = BatchCollator(NegativeStrategy(), seed=0)(
        [TrainingExample(q, [d]) for q, d in zip(batch.queries, batch.documents)], list(range(8)), 0)
    assert masked < full
    assert abs(masked - plain_step(model, only_positives, ContrastiveLoss(0.05), NegativeStrategy(), bf16=False)) < 1e-5


def test_bf16_autocast_step_runs_on_cpu(tiny_model_dir, batch):
    model = BiEncoder.from_pretrained(tiny_model_dir)
    loss = plain_step(model, batch, ContrastiveLoss(0.05), NegativeStrategy(), bf16=True)
    assert torch.isfinite(torch.tensor(loss))
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())


def tiny_config(model_dir, triples, **training):
    return TrainConfig.model_validate({
        "model": {"name": str(model_dir), "query_max_length": 32, "doc_max_length": 64},
        "data": {"triples": str(triples), "dev_fraction": 0.2},
        "negatives": {"strategy": "hard"},
        "training": {"batch_size": 8, "max_steps": 6, "learning_rate": 1e-3, "log_every": 2, "save_every": 2,
                     "keep_last": 2, "gradient_accumulation_steps": 2, "num_threads": 1, "bf16": False,
                     **training},
    })


def test_train_writes_run_folder(tiny_model_dir, triples_path, tmp_path):
    from sentence_transformers import SentenceTransformer

    out = tmp_path / "run"
    final = train(tiny_config(tiny_model_dir, triples_path), out)
    assert final == out / "final"
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [2, 4, 6]
    assert set(log[0]) == {"step", "epoch", "loss", "lr", "pairs_per_s", "elapsed", "bf16"} and log[-1]["lr"] == 0.0
    assert TrainConfig.model_validate(__import__("yaml").safe_load((out / "config.yaml").read_text())).training.max_steps == 6
    assert len((out / "dev.jsonl").read_text().splitlines()) == 20
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000004", "step-0000006"]
    trained = SentenceTransformer(str(final), device="cpu").encode(["a query"], convert_to_tensor=True)
    original = BiEncoder.from_pretrained(tiny_model_dir).encode(["a query"], bf16=False)
    assert not torch.allclose(trained, torch.from_numpy(original), atol=1e-3)  # the weights moved
    with pytest.raises(ValueError, match="pass --resume"):
        train(tiny_config(tiny_model_dir, triples_path), out)


def test_grad_cache_training_matches_plain_training(tiny_model_dir, triples_path, tmp_path):
    plain = train(tiny_config(tiny_model_dir, triples_path, max_steps=2, save_every=None), tmp_path / "plain")
    cached = train(tiny_config(tiny_model_dir, triples_path, max_steps=2, save_every=None, grad_cache=True,
                               grad_cache_chunk_size=64), tmp_path / "cached")
    a = BiEncoder.from_pretrained(plain).state_dict()
    b = BiEncoder.from_pretrained(cached).state_dict()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


def test_checkpoint_scoring_keeps_best_and_stops_early(tiny_model_dir, tmp_path):
    """The evaluation section scores the held-out dev queries against the corpus every N steps,
    keeps the best model in best/, and early stopping ends training before max_steps."""
    from _eval_data import write_toy_beir

    beir = write_toy_beir(tmp_path / "toy", split="train",
                          qrels={q: {f"d{i}": 1} for i, q in enumerate(["q1", "q2", "q4", "q5"] * 1, start=1)})
    config = TrainConfig.model_validate({
        "model": {"name": str(tiny_model_dir), "doc_max_length": 32, "query_max_length": 16},
        "data": {"beir": str(beir), "split": "train", "dev_fraction": 0.5, "dev_seed": 0},
        "training": {"batch_size": 2, "max_steps": 20, "learning_rate": 1e-12, "seed": 0, "log_every": 1},
        "evaluation": {"held_out_dev": True, "every_steps": 1, "early_stopping_patience": 2, "k": 10},
    })
    out = tmp_path / "run"
    train(config, out)
    lines = [json.loads(line) for line in (out / "checkpoint_eval.jsonl").read_text().splitlines()]
    assert lines and all("held-out-dev" in line["eval"] for line in lines)
    assert len(lines) < 20, "early stopping should end the run before max_steps"
    best = json.loads((out / "best" / "best.json").read_text())
    assert best["score"] == max(line["score"] for line in lines)
    assert (out / "best" / "modules.json").exists()


def test_evaluation_section_needs_something_to_score(tiny_model_dir):
    with pytest.raises(ValueError, match="dev_sets or held_out_dev"):
        TrainConfig.model_validate({"data": {"beir": "x"}, "evaluation": {"every_steps": 5}})


def test_bf16_auto_follows_the_hardware_and_bad_values_are_refused(tiny_model_dir, triples_path, tmp_path):
    from retriever.config import TrainConfig
    from retriever.modeling import bf16_supported
    from retriever.trainer import Trainer

    auto = tiny_config(tiny_model_dir, triples_path, bf16="auto")
    assert Trainer(auto, tmp_path / "auto").bf16 == bf16_supported("cpu")
    assert Trainer(tiny_config(tiny_model_dir, triples_path, bf16=False), tmp_path / "off").bf16 is False
    with pytest.raises(ValueError, match="bf16"):
        TrainConfig.model_validate({"model": {"name": str(tiny_model_dir)}, "data": {"triples": str(triples_path)},
                                    "training": {"bf16": "sometimes"}})


def _dropouts(model: BiEncoder) -> dict[str, float]:
    return {name: m.p for name, m in model.named_modules() if isinstance(m, torch.nn.Dropout)}


@pytest.mark.parametrize("rate", [0.0, 0.3, None])
def test_attention_dropout_sets_the_attention_layers_only_and_keeps_the_saved_config(
        tiny_model_dir, triples_path, tmp_path, rate):
    from retriever.trainer import Trainer

    cfg = tiny_config(tiny_model_dir, triples_path, max_steps=1, save_every=None)
    cfg.model.attention_dropout = rate
    trainer = Trainer(cfg, tmp_path / "run")
    before = _dropouts(BiEncoder.from_pretrained(tiny_model_dir))
    after = _dropouts(trainer.model)
    attention = {n for n in after if n.endswith("attention.self.dropout")}
    assert len(attention) == 2  # one per layer of the tiny BERT
    assert all(after[n] == (before[n] if rate is None else rate) for n in attention)
    assert all(after[n] == before[n] for n in after if n not in attention)  # hidden dropout untouched
    trainer.run()
    saved = json.loads((tmp_path / "run" / "final" / "config.json").read_text())
    assert saved["attention_probs_dropout_prob"] == json.loads((tiny_model_dir / "config.json").read_text())[
        "attention_probs_dropout_prob"]


def test_attention_dropout_zero_makes_a_training_forward_deterministic(tiny_model_dir):
    """The rate set on the module is the one the attention kernel applies (no other copy of it is read)."""
    from retriever.modeling import set_attention_dropout

    model = BiEncoder.from_pretrained(tiny_model_dir)
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout) and m.p > 0:
            m.p = 0.0  # hidden dropout off: only attention dropout can make two forwards differ
    batch = model.tokenize(["dense retrieval with hard negatives", "a b c"], "document")
    assert set_attention_dropout(model, 0.5) == 2
    assert not torch.equal(model.embed(batch, "document"), model.embed(batch, "document"))
    set_attention_dropout(model, 0.0)
    assert torch.equal(model.embed(batch, "document"), model.embed(batch, "document"))


def test_attention_dropout_warns_when_the_model_has_no_attention_layer_it_knows(
        tiny_model_dir, triples_path, tmp_path, monkeypatch, caplog):
    import logging

    import retriever.modeling as modeling
    import retriever.trainer as trainer_module

    monkeypatch.setattr(modeling, "set_attention_dropout", lambda module, p: 0)  # an unknown architecture
    with caplog.at_level(logging.WARNING, logger="retriever.modeling"):
        trainer_module.Trainer(tiny_config(tiny_model_dir, triples_path, max_steps=1, save_every=None), tmp_path / "run")
    assert any("no attention layer" in r.message and "checkpoint's own rate" in r.message for r in caplog.records)
