"""Training configuration: YAML validated by pydantic, every section strict (``extra="forbid"``).

Python API (stable, used by other modules):

- ``load_config(path, overrides=()) -> TrainConfig``: read a YAML file, apply ``section.key=value``
  overrides (values parsed as YAML scalars), resolve relative data paths, validate.
- ``TrainConfig.model_validate(dict)``: validate a dict built in code (paths are taken as given).

Relative data paths are resolved against the current working directory first and, when nothing exists
there, against the parent of the config file's folder (``configs/x.yaml`` + ``../shared/data`` finds the
data folder beside the repository from any working directory).
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal, Sequence

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

__all__ = ["ConfigError", "ModelConfig", "DataConfig", "NegativesConfig", "TrainingConfig", "TrainConfig",
           "load_config", "apply_overrides"]


class ConfigError(ValueError):
    """A config file is invalid. The message names the file, the key and the fix."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Strict):
    name: str = "sentence-transformers/all-MiniLM-L6-v2"
    pooling: Literal["cls", "mean", "last-token"] | None = None  # None: what the checkpoint says
    normalize: bool | None = None
    shared: bool = True
    query_prefix: str | None = None
    doc_prefix: str | None = None
    query_max_length: int = Field(64, gt=0)
    doc_max_length: int = Field(256, gt=0)
    attention_dropout: float | None = Field(
        0.0, ge=0.0, lt=1.0,
        description="dropout on attention probabilities while training. 0 (default) lets PyTorch use its fused "
                    "attention kernel, which cannot apply it (1.74x faster steps for MiniLM on CPU, same dev "
                    "quality on SciFact: docs/benchmarks.md); null keeps the checkpoint's own rate (0.1 for "
                    "BERT-family models), as sentence-transformers does. Hidden-state dropout is unchanged")


DATA_SOURCES = ("beir", "triples", "qrels", "jsonl", "hf")
PATH_KEYS = ("beir", "triples", "queries", "qrels", "collection", "jsonl", "corpus", "hf")


class DataConfig(_Strict):
    """Exactly one source: ``beir`` (+ ``split``), ``triples``, ``qrels`` (+ ``queries`` + ``collection``),
    ``jsonl`` (+ optional ``corpus`` for id resolution) or ``hf`` (+ ``hf_split``, ``columns``)."""

    beir: str | None = None
    split: str = "train"
    triples: str | None = None
    queries: str | None = None
    qrels: str | None = None
    collection: str | None = None
    jsonl: str | None = None
    corpus: str | None = None
    hf: str | None = None
    hf_split: str = "train"
    columns: dict[str, str] | None = None
    max_examples: int | None = Field(None, gt=0)
    dev_fraction: float = Field(0.0, ge=0.0, lt=1.0)
    dev_seed: int = 0
    rows: Literal["per_query", "per_pair"] = Field(
        "per_query", description="what one training row is: per_query, one query with one of its positives drawn "
                                 "at random each epoch; per_pair, one (query, positive) pair, so an epoch trains "
                                 "every positive once (sentence-transformers' layout; not with tasb)")
    sampler: Literal["random", "no_duplicates"] = Field(
        "random", description="how an epoch's rows are ordered into batches: random, a shuffle (a repeated "
                              "query or positive in one batch is masked out of the in-batch negatives); "
                              "no_duplicates, the same shuffle with any row whose query text or positive passage "
                              "is already in the batch deferred to a later batch (sentence-transformers' "
                              "NO_DUPLICATES batch sampler; not with tasb)")

    @model_validator(mode="after")
    def _one_source(self) -> "DataConfig":
        chosen = [s for s in DATA_SOURCES if getattr(self, s) is not None]
        if len(chosen) != 1:
            raise ValueError(f"give exactly one data source out of {', '.join(DATA_SOURCES)} (found "
                             f"{', '.join(chosen) or 'none'})")
        if chosen == ["qrels"] and (self.queries is None or self.collection is None):
            raise ValueError("a qrels source also needs `queries` and `collection`")
        if self.corpus is not None and chosen != ["jsonl"]:
            raise ValueError("`corpus` resolves ids in a `jsonl` source; drop it or use `jsonl`")
        if self.columns is not None and chosen != ["hf"]:
            raise ValueError("`columns` maps a Hugging Face dataset's columns; use it with `hf`")
        return self

    @property
    def source(self) -> str:
        return next(s for s in DATA_SOURCES if getattr(self, s) is not None)


class NegativesConfig(_Strict):
    """``strategy`` names a registered :class:`retriever.negatives.NegativeStrategy`; ``options`` are
    validated by that strategy's own ``Options`` model (also strict)."""

    strategy: str = "inbatch"
    options: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _validate_options(self) -> "NegativesConfig":
        from retriever.negatives import available_strategies, get_strategy

        try:
            cls = get_strategy(self.strategy)
        except KeyError:
            raise ValueError(_unknown_message("strategy", self.strategy, available_strategies())) from None
        unknown = [k for k in self.options if k not in cls.Options.model_fields]
        if unknown:
            raise ValueError(_unknown_message(f"options of strategy {self.strategy!r}", unknown[0],
                                              list(cls.Options.model_fields)))
        # Round-trip so defaults become explicit in the run's config.yaml.
        object.__setattr__(self, "options", cls.Options.model_validate(self.options).model_dump())
        return self


class TrainingConfig(_Strict):
    learning_rate: float = Field(2e-5, gt=0)
    batch_size: int = Field(32, gt=0, description="queries per optimizer micro-step on each process")
    gradient_accumulation_steps: int = Field(1, gt=0)
    grad_cache: bool = False
    grad_cache_chunk_size: int = Field(32, gt=0)
    epochs: int = Field(1, gt=0)
    max_steps: int | None = Field(None, gt=0, description="overrides epochs when set")
    warmup_ratio: float = Field(0.1, ge=0.0, le=1.0)
    weight_decay: float = Field(0.01, ge=0.0)
    max_grad_norm: float | None = Field(1.0, gt=0)
    temperature: float = Field(0.05, gt=0)
    loss: Literal["infonce", "decoupled"] = Field(
        "infonce", description="contrastive loss: InfoNCE, or decoupled (positive removed from the denominator)")
    bf16: bool | Literal["auto"] = Field(
        "auto", description="bf16 autocast; auto: on where the hardware computes bf16 natively (CUDA, AVX512-BF16/AMX CPUs)")
    seed: int = 42
    num_threads: int | None = Field(None, gt=0, description="torch CPU threads; None keeps torch's default")
    log_every: int = Field(10, gt=0)
    save_every: int | None = Field(None, gt=0, description="checkpoint every N optimizer steps; None: only the final model")
    keep_last: int = Field(2, gt=0)


class DevSetConfig(_Strict):
    """A BEIR folder scored during training. Use a dev split; never a test split."""

    path: str
    split: str = "dev"
    name: str | None = None


class EvaluationConfig(_Strict):
    """Checkpoint scoring during training (:class:`eval.checkpoint_scoring.CheckpointScorer`): every
    ``every_steps`` the model is scored on the dev sets, the best is kept in ``<output>/best/``, and training
    stops after ``early_stopping_patience`` evaluations without improvement."""

    dev_sets: list[DevSetConfig] = Field(default_factory=list)
    held_out_dev: bool = Field(False, description="also score the data.dev_fraction queries held out of a "
                                                  "BEIR training split, against that folder's corpus")
    metric: str = "ndcg@10"
    every_steps: int = Field(500, gt=0)
    early_stopping_patience: int | None = Field(None, gt=0)
    keep_best: bool = True
    k: int = Field(100, gt=0, description="documents retrieved per dev query")
    sub_collection: int | None = Field(None, gt=0, description="score on a fixed sub-collection: the dev queries' "
                                       "judged documents + this many corpus documents sampled once (seed 0); "
                                       "None: the whole corpus at every evaluation")

    @model_validator(mode="after")
    def _has_something_to_score(self) -> "EvaluationConfig":
        if not self.dev_sets and not self.held_out_dev:
            raise ValueError("the evaluation section needs dev_sets or held_out_dev: true")
        from eval.metrics import parse_metric

        parse_metric(self.metric)
        return self


class TrainConfig(_Strict):
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig
    negatives: NegativesConfig = Field(default_factory=NegativesConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    evaluation: EvaluationConfig | None = None

    @model_validator(mode="after")
    def _held_out_dev_needs_beir(self) -> "TrainConfig":
        ev = self.evaluation
        if ev is not None and ev.held_out_dev and (self.data.beir is None or self.data.dev_fraction == 0):
            raise ValueError("evaluation.held_out_dev needs a data.beir source and data.dev_fraction > 0")
        return self

    @model_validator(mode="after")
    def _pair_rows_need_the_trainer_order(self) -> "TrainConfig":
        """``data.rows: per_pair`` and ``data.sampler: no_duplicates`` are refused where the strategy orders the
        epoch's queries itself (TAS-B's topic batches are built from queries, not pairs)."""
        from retriever.negatives import get_strategy

        if self.data.rows == "per_pair" and get_strategy(self.negatives.strategy).orders_epoch():
            raise ValueError(f"data.rows: per_pair does not apply to negatives.strategy {self.negatives.strategy!r}, "
                             "which builds each epoch's batches from queries; use data.rows: per_query")
        if self.data.sampler != "random" and get_strategy(self.negatives.strategy).orders_epoch():
            raise ValueError(f"data.sampler: {self.data.sampler} does not apply to negatives.strategy "
                             f"{self.negatives.strategy!r}, which builds each epoch's batches itself; remove it")
        return self

    @model_validator(mode="after")
    def _loss_options_take_effect(self) -> "TrainConfig":
        """Refuse trainer loss options that a strategy with its own loss would silently ignore."""
        from retriever.negatives import get_strategy

        cls = get_strategy(self.negatives.strategy)
        if cls.uses_trainer_loss(cls.Options.model_validate(self.negatives.options)):
            return self
        ignored = [f"training.loss: {self.training.loss}"] if self.training.loss != "infonce" else []
        ignored += ["training.grad_cache: true"] if self.training.grad_cache else []
        if ignored:
            raise ValueError(f"{' and '.join(ignored)} would have no effect: negatives.strategy "
                             f"{self.negatives.strategy!r} (with these options) trains with its own loss, not the "
                             "trainer's contrastive step; remove the option (see docs/strategies.md)")
        return self

    @field_validator("data", mode="before")
    @classmethod
    def _data_is_mapping(cls, value):
        if value is None:
            raise ValueError("the data section is empty; give one data source")
        return value

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


# ---------------------------------------------------------------------------------------- loading
def _unknown_message(where: str, key: str, valid: Sequence[str]) -> str:
    close = difflib.get_close_matches(str(key), list(valid), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return f"unknown {where} {key!r}.{hint} Valid: {', '.join(valid)}"


def _model_at(loc: Sequence[Any]) -> type[BaseModel] | None:
    """The pydantic model class that owns the key at ``loc`` (``("training", "lr")`` -> TrainingConfig)."""
    model: type[BaseModel] = TrainConfig
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    return model


def _format_errors(exc: ValidationError, source: str) -> str:
    lines = []
    for err in exc.errors():
        loc = [str(p) for p in err["loc"]]
        key = ".".join(loc) or "<top level>"
        if err["type"] == "extra_forbidden":
            owner = _model_at(err["loc"])
            valid = list(owner.model_fields) if owner else []
            section = ".".join(loc[:-1]) or "top-level"
            lines.append(f"  {key}: " + _unknown_message(f"key in section {section}", loc[-1], valid))
        else:
            msg = err["msg"].removeprefix("Value error, ")
            value = err.get("input")
            got = f" (got {value!r})" if err["type"] != "value_error" and not isinstance(value, (dict, list)) else ""
            lines.append(f"  {key}: {msg}{got}")
    return f"invalid config {source}:\n" + "\n".join(lines)


def apply_overrides(raw: dict, overrides: Sequence[str]) -> dict:
    """Apply ``section.key=value`` strings to a nested dict; values are parsed as YAML scalars."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected section.key=value, e.g. training.batch_size=64")
        dotted, value = item.split("=", 1)
        parts = dotted.strip().split(".")
        node = raw
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: {part!r} is a value, not a section")
            node = child
        node[parts[-1]] = _parse_scalar(value)
    return raw


def _parse_scalar(value: str) -> Any:
    """YAML scalar parsing (``true``, ``3e-5``, ``null``); text that YAML would read as a mapping or a list
    without explicit brackets (``query: ``, ``- x``) stays a string, since prefixes look like that."""
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError:
        return value
    if isinstance(parsed, (dict, list)) and not value.lstrip().startswith(("{", "[")):
        return value
    return parsed


def _resolve_paths(section: dict, keys: Sequence[str], config_path: Path) -> None:
    """Relative paths: working directory first, then the parent of the config file's folder."""
    fallback_root = config_path.resolve().parent.parent
    for key in keys:
        value = section.get(key)
        if not isinstance(value, str) or Path(value).expanduser().is_absolute():
            continue
        path = Path(value).expanduser()
        candidate = path if path.exists() else fallback_root / path
        if candidate.exists():  # otherwise left as given: the reader reports it (or it is a hub dataset name)
            section[key] = str(candidate.resolve())


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read, override, resolve and validate a training config; :class:`ConfigError` on any problem."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections ({', '.join(TrainConfig.model_fields)})")
    raw = apply_overrides(raw, overrides)
    if isinstance(raw.get("data"), dict):
        _resolve_paths(raw["data"], PATH_KEYS, path)
    if isinstance(raw.get("evaluation"), dict):
        for dev_set in raw["evaluation"].get("dev_sets") or []:
            if isinstance(dev_set, dict):
                _resolve_paths(dev_set, ("path",), path)
    try:
        return TrainConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, str(path))) from None
