"""The sentence-transformers folder read and written without importing sentence-transformers
(retriever/st_format.py), checked against the real package in both directions."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from retriever.modeling import BiEncoder
from retriever.st_format import read_classic

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("pooling,normalize", [("mean", True), ("cls", False), ("last-token", True)])
def test_written_folder_is_what_sentence_transformers_loads(tiny_model_dir, tmp_path, pooling, normalize):
    from sentence_transformers import SentenceTransformer

    model = BiEncoder.from_pretrained(tiny_model_dir, pooling=pooling, normalize=normalize,
                                      query_prefix="query: ", doc_prefix="passage: ", doc_max_length=96)
    folder = model.save(tmp_path / "m")
    st = SentenceTransformer(str(folder), device="cpu")
    kinds = [type(m).__name__ for m in st]
    assert kinds == ["Transformer", "Pooling"] + (["Normalize"] if normalize else [])
    assert st.max_seq_length == 96 and st.get_embedding_dimension() == model.dim
    assert str(st[1].pooling_mode) == {"mean": "mean", "cls": "cls", "last-token": "lasttoken"}[pooling]
    assert st.prompts == {"query": "query: ", "document": "passage: "}
    assert st.similarity_fn_name == ("cosine" if normalize else "dot")
    assert read_classic(folder) == {"max_seq_length": 96, "pooling": pooling, "normalize": normalize,
                                    "query_prefix": "query: ", "doc_prefix": "passage: "}


def test_sentence_transformers_own_layout_is_left_to_it(tiny_model_dir, tmp_path):
    """A folder in the 6.x layout (here written by SentenceTransformer.save) is not read by hand, and
    BiEncoder still loads it, through sentence-transformers."""
    from sentence_transformers import SentenceTransformer

    folder = BiEncoder.from_pretrained(tiny_model_dir, pooling="cls").save(tmp_path / "m")
    SentenceTransformer(str(folder), device="cpu").save(str(tmp_path / "st"))
    assert read_classic(tmp_path / "st") is None
    again = BiEncoder.from_pretrained(tmp_path / "st")
    assert (again.pooling, again.normalize, again.query_prefix) == ("cls", True, "")


@pytest.mark.parametrize("change", ["lower_case", "dense", "weighted_mean", "default_prompt", "model_args"])
def test_anything_beyond_the_plain_pipeline_is_left_to_sentence_transformers(tiny_model_dir, tmp_path, change):
    folder = BiEncoder.from_pretrained(tiny_model_dir).save(tmp_path / "m")
    edit = {
        "lower_case": ("sentence_bert_config.json", lambda c: {**c, "do_lower_case": True}),
        "dense": ("modules.json", lambda c: c + [{"idx": 3, "name": "3", "path": "3_Dense",
                                                   "type": "sentence_transformers.models.Dense"}]),
        "weighted_mean": ("1_Pooling/config.json", lambda c: {**c, "pooling_mode_weightedmean_tokens": True}),
        "default_prompt": ("config_sentence_transformers.json", lambda c: {**c, "default_prompt_name": "query"}),
        "model_args": ("sentence_bert_config.json", lambda c: {**c, "model_args": {"torch_dtype": "bfloat16"}}),
    }[change]
    path = folder / edit[0]
    path.write_text(json.dumps(edit[1](json.loads(path.read_text()))))
    assert read_classic(folder) is None


def test_minilm_folder_reads_as_sentence_transformers_reads_it(minilm_path):
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(minilm_path, device="cpu")
    assert read_classic(Path(minilm_path)) == {"max_seq_length": st.max_seq_length, "pooling": "mean",
                                               "normalize": True, "query_prefix": "", "doc_prefix": ""}


def test_load_and_save_do_not_import_sentence_transformers(tiny_model_dir, tmp_path):
    """The point of the module: a process that loads, saves and reloads a model never pays for the import."""
    script = (
        "import sys\nfrom retriever.modeling import BiEncoder\n"
        f"m = BiEncoder.from_pretrained({str(tiny_model_dir)!r})\n"
        f"BiEncoder.from_pretrained(m.save({str(tmp_path / 'm')!r}))\n"
        "assert 'sentence_transformers' not in sys.modules, 'imported'\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, cwd=ROOT)
