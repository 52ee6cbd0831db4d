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
a pipeline resumes at the first unfinished stage.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import yaml

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


def run_pipeline(path: str | Path, output_dir: str | Path, overrides: Sequence[str] = (), resume: bool = False) -> Path:
    """Train every stage in order; returns the last stage's final model folder."""
    from retriever.trainer import train

    output_dir = Path(output_dir)
    previous: Path | None = None
    for name, cfg, chained in load_pipeline(path, overrides):
        stage_dir = output_dir / name
        if chained and previous is not None:
            cfg.model.name = str(previous)
        final = stage_dir / "final"
        if not final.exists():
            final = train(cfg, stage_dir, resume=resume or stage_dir.exists())
        previous = final
    assert previous is not None
    return previous


def stage_summary(stages: list[tuple[str, TrainConfig, bool]]) -> list[dict[str, Any]]:
    return [{"name": n, "strategy": c.negatives.strategy, "from_previous": chained} for n, c, chained in stages]
