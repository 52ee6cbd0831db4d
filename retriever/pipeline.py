"""Multi-stage training: a YAML with a ``pipeline:`` list runs its stages in order, each starting from
the previous stage's final model (STAR then ADORE, warm-up then ANCE, ...).

::

    pipeline:
      - name: star
        config: scifact-star.yaml          # a config file (relative to this file) or an inline mapping
      - name: adore
        config: scifact-adore.yaml
        set: [training.max_steps=200]       # optional overrides for this stage

Stage ``i`` trains into ``<output>/<name>``; from the second stage on its ``model.name`` is replaced
by ``<output>/<previous name>/final``. A stage whose ``final`` folder exists is skipped, so re-running
a pipeline resumes at the first unfinished stage — but only when the stage would be trained the same way:
before a stage starts, ``<output>/<name>/stage.json`` records the SHA-256 of its resolved config and of its
input model's files. A stage folder (finished or interrupted) whose record differs from the current
config or input model is refused with a message naming what changed; it is never silently reused, and
never deleted for you (delete the folder, and those of the stages after it, to retrain, or choose another
``--output``).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Sequence

import yaml

from retriever.io import write_text_atomic

from retriever.config import PATH_KEYS, ConfigError, TrainConfig, _resolve_paths, apply_overrides, load_config


def is_pipeline(path: str | Path) -> bool:
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(raw, dict) and "pipeline" in raw


def load_pipeline(path: str | Path, overrides: Sequence[str] = ()) -> list[tuple[str, TrainConfig, bool]]:
    """``[(stage name, config, starts from previous stage)]``; ``overrides`` apply to every stage."""
    path = Path(path)
    raw = yaml.safe_load(path.read_text())
    extra = set(raw) - {"pipeline"}
    stages = raw["pipeline"]
    if extra:
        raise ConfigError(f"{path}: a pipeline file holds only `pipeline:`; move {sorted(extra)} into the stages")
    if not isinstance(stages, list) or not stages:
        raise ConfigError(f"{path}: `pipeline` must be a non-empty list of stages (name, config, optional set)")
    out, names = [], set()
    for i, stage in enumerate(stages):
        where = f"{path}: pipeline[{i}]"
        if not isinstance(stage, dict) or set(stage) - {"name", "config", "set"} or "config" not in stage:
            raise ConfigError(f"{where}: a stage is a mapping with `name`, `config` and optional `set`")
        name = str(stage.get("name") or f"stage{i + 1}")
        if name in names:
            raise ConfigError(f"{where}: duplicate stage name {name!r}")
        names.add(name)
        stage_overrides = list(stage.get("set") or []) + list(overrides)
        if isinstance(stage["config"], str):
            cfg = load_config(path.parent / stage["config"], stage_overrides)
        elif isinstance(stage["config"], dict):
            body = apply_overrides(dict(stage["config"]), stage_overrides)
            if isinstance(body.get("data"), dict):
                _resolve_paths(body["data"], PATH_KEYS, path)
            try:
                cfg = TrainConfig.model_validate(body)
            except Exception as exc:
                raise ConfigError(f"{where}: {exc}") from None
        else:
            raise ConfigError(f"{where}: `config` is a file name or a mapping")
        out.append((name, cfg, i > 0))
    return out


STAGE_RECORD = "stage.json"


def model_fingerprint(name: str) -> str:
    """SHA-256 over a local model folder's files (relative path and content); a hub name stands for itself."""
    folder = Path(name)
    if not folder.is_dir():
        return f"name:{name}"
    digest = hashlib.sha256()
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(folder)).encode() + b"\0")
        with open(file, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def stage_record(cfg: TrainConfig) -> dict[str, str]:
    return {"config_sha256": hashlib.sha256(cfg.to_yaml().encode()).hexdigest(),
            "input_model_sha256": model_fingerprint(cfg.model.name)}


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    return {k: v for key, value in tree.items() for k, v in _flat(value, f"{prefix}.{key}" if prefix else key).items()}


def _check_stage(name: str, stage_dir: Path, cfg: TrainConfig, record: dict[str, str]) -> None:
    """Refuse to reuse (skip or resume) a stage folder trained from another config or input model."""
    if not stage_dir.exists() or not any(stage_dir.iterdir()):
        return
    fix = f"delete {stage_dir} (and the folders of the stages after it) to retrain, or choose another --output"
    path = stage_dir / STAGE_RECORD
    if not path.exists():
        raise ConfigError(f"stage {name!r}: {stage_dir} holds a run without a {STAGE_RECORD} record, so it "
                          f"cannot be shown to match this config; {fix}")
    old = json.loads(path.read_text())
    if old.get("config_sha256") != record["config_sha256"]:
        changed = ""
        saved = stage_dir / "config.yaml"
        if saved.exists():
            a, b = _flat(yaml.safe_load(saved.read_text())), _flat(cfg.model_dump(mode="json"))
            keys = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
            changed = f" (changed: {', '.join(keys[:6])}{', ...' if len(keys) > 6 else ''})" if keys else ""
        raise ConfigError(f"stage {name!r}: {stage_dir} was trained with a different config{changed}; it is "
                          f"not reused; {fix}")
    if old.get("input_model_sha256") != record["input_model_sha256"]:
        raise ConfigError(f"stage {name!r}: {stage_dir} was trained from a different input model than "
                          f"{cfg.model.name} is now (an earlier stage was retrained?); it is not reused; {fix}")


def run_pipeline(path: str | Path, output_dir: str | Path, overrides: Sequence[str] = (), resume: bool = False) -> Path:
    """Train every stage in order; returns the last stage's final model folder. A stage already trained
    with the same config and input model is reused; one trained otherwise is refused (ConfigError)."""
    from retriever import trainer

    output_dir = Path(output_dir)
    previous: Path | None = None
    for name, cfg, chained in load_pipeline(path, overrides):
        stage_dir = output_dir / name
        if chained and previous is not None:
            cfg.model.name = str(previous)
        record = stage_record(cfg)
        _check_stage(name, stage_dir, cfg, record)
        final = stage_dir / "final"
        if not final.exists():
            interrupted = stage_dir.exists() and any(stage_dir.iterdir())
            stage_dir.mkdir(parents=True, exist_ok=True)
            write_text_atomic(stage_dir / STAGE_RECORD, json.dumps(record, indent=2) + "\n")
            final = trainer.train(cfg, stage_dir, resume=resume or interrupted)
        previous = final
    assert previous is not None
    return previous


def stage_summary(stages: list[tuple[str, TrainConfig, bool]]) -> list[dict[str, Any]]:
    return [{"name": n, "strategy": c.negatives.strategy, "from_previous": chained} for n, c, chained in stages]
