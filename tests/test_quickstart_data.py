"""The stdlib docstring → function dataset behind `negatron quickstart`."""

import json
import textwrap
from pathlib import Path

import pytest

from retriever.data import load_beir, read_queries, read_qrels
from retriever.quickstart_data import (build_dataset, cached_stdlib_dataset, extract_functions, split_of, summarize)

FAKE_MODULES = {
    "alpha.py": '''
        import os

        def join_paths(a, b):
            """Join two path components with the platform separator.

            Longer explanation that is not part of the query.
            """
            sep = os.sep
            return a + sep + b

        def count_words(text):
            """Count the words in a text. Words are split on whitespace."""
            words = text.split()
            return len(words)

        def trivial(x):
            """Return the argument unchanged, always."""
            return x

        def stub(self):
            """Subclasses must implement this method."""
            pass
            raise NotImplementedError

        def no_doc(a):
            b = a + 1
            return b

        def _private_helper(items):
            """Sort items by their second field."""
            ordered = sorted(items, key=lambda it: it[1])
            return ordered

        def test_something():
            """Check that something works as intended."""
            assert True
            assert 1

        class Box:
            def __repr__(self):
                """Return repr(self) for the box."""
                name = type(self).__name__
                return name

            def put(self, item):
                """Put an item into the box and return its slot."""
                self.items.append(item)
                return len(self.items) - 1

            def short(self):
                """Docstring."""
                a = 1
                return a
    ''',
    "beta/__init__.py": '''
        def open_box(path):
            """Open the box stored at the given path."""
            with open(path) as fh:
                return fh.read()
    ''',
    "beta/gamma.py": '''
        def join_paths(a, b):
            """Join two path components with the platform separator."""
            first = str(a)
            return first + "/" + str(b)

        def emit(record):
            """Emit a logging record to the stream."""
            msg = str(record)
            print(msg)

        def emit_twice(record):
            """Emit a logging record to the stream."""
            msg = str(record) * 2
            print(msg)
    ''',
    "delta.py": '''
        def count_words(text):
            """Return the number of words in a text."""
            words = text.split()
            return len(words)

        def sum_values(values):
            """Add up all the values of a sequence."""
            total = 0
            for v in values:
                total += v
            return total

        def mean(values):
            """Arithmetic mean of a non-empty sequence of numbers."""
            total = sum(values)
            return total / len(values)
    ''',
    "test/test_alpha.py": '''
        def helper_in_tests(a):
            """A helper function living in the test suite."""
            b = a * 2
            return b
    ''',
    "site-packages/pkg.py": '''
        def third_party(a):
            """A function from a third-party package."""
            b = a * 2
            return b
    ''',
    "broken.py": "def oops(:\n    pass\n",
}


@pytest.fixture()
def fake_stdlib(tmp_path) -> Path:
    root = tmp_path / "stdlib"
    for rel, source in FAKE_MODULES.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(source).lstrip("\n"))
    return root


def _read_corpus(folder: Path) -> dict[str, dict]:
    with open(folder / "corpus.jsonl") as fh:
        return {row["_id"]: row for row in map(json.loads, fh)}


def test_summary_is_first_sentence_of_first_paragraph():
    assert summarize("Join two paths.\n\nMore text.") == "Join two paths."
    assert summarize("Count the words in a\n   text. Words are split.") == "Count the words in a text."
    assert summarize("Return os.path.join(a, b) for two paths") == "Return os.path.join(a, b) for two paths"


def test_filters_on_fake_stdlib(fake_stdlib):
    counts: dict[str, int] = {}
    ids = [r.id for r in extract_functions(fake_stdlib, counts)]
    assert ids == ["alpha.join_paths", "alpha.count_words", "alpha._private_helper", "alpha.Box.put",
                   "beta.open_box", "beta.gamma.join_paths", "beta.gamma.emit", "beta.gamma.emit_twice",
                   "delta.count_words", "delta.sum_values", "delta.mean"]
    assert counts["unparsable_files"] == 1          # broken.py
    assert counts["no_docstring"] == 1              # no_doc
    assert counts["dunder_or_test_name"] == 2       # __repr__, test_something
    assert counts["short_or_boilerplate_summary"] == 1  # "Docstring."
    assert counts["trivial_body"] == 2              # trivial (one line), stub (pass + raise)


def test_documents_drop_docstring_and_keep_code(fake_stdlib, tmp_path):
    folder = build_dataset(tmp_path / "ds", source_root=fake_stdlib)
    corpus = _read_corpus(folder)
    queries = read_queries(folder / "queries.jsonl")
    assert corpus["alpha.join_paths"]["text"] == "def join_paths(a, b):\n    sep = os.sep\n    return a + sep + b"
    assert corpus["alpha.Box.put"]["text"].startswith("def put(self, item):\n    self.items.append")  # dedented
    for doc_id, row in corpus.items():
        assert row["title"] == ""
        assert row["text"].strip()
        assert '"""' not in row["text"]
        qid = f"q:{doc_id}"
        if qid in queries:
            assert queries[qid] not in row["text"]
    assert all(text.strip() for text in queries.values())
    assert queries["q:alpha.count_words"] == "Count the words in a text."


def test_duplicates_and_ambiguous_summaries(fake_stdlib, tmp_path):
    folder = build_dataset(tmp_path / "ds", source_root=fake_stdlib)
    corpus = _read_corpus(folder)
    queries = read_queries(folder / "queries.jsonl")
    stats = json.loads((folder / "stats.json").read_text())
    # delta.count_words is a copy of alpha.count_words (other docstring) → dropped with its query.
    assert "delta.count_words" not in corpus and "q:delta.count_words" not in queries
    assert queries["q:alpha.count_words"] == "Count the words in a text."
    assert stats["filters"]["duplicate_documents_dropped"] == 1
    # Same summary, different code: both documents stay, neither gets a query.
    for doc_id in ("alpha.join_paths", "beta.gamma.join_paths", "beta.gamma.emit", "beta.gamma.emit_twice"):
        assert doc_id in corpus and f"q:{doc_id}" not in queries
    assert stats["filters"]["ambiguous_queries_dropped"] == 4
    assert len({row["text"] for row in corpus.values()}) == len(corpus)


def test_split_by_module(fake_stdlib, tmp_path):
    folder = build_dataset(tmp_path / "ds", source_root=fake_stdlib)
    queries = read_queries(folder / "queries.jsonl")
    seen_split: dict[str, str] = {}
    total = 0
    for split in ("train", "dev", "test"):
        qrels = read_qrels(folder / "qrels" / f"{split}.tsv") if (folder / "qrels" / f"{split}.tsv").stat().st_size > 30 else {}
        for qid, docs in qrels.items():
            total += 1
            assert qid in queries and list(docs.values()) == [1]
            (doc_id,) = docs
            module = doc_id.rsplit(".", 2 if ".Box." in doc_id else 1)[0]
            assert split_of(module) == split
            assert seen_split.setdefault(module, split) == split
    assert total == len(queries) == 6


def test_build_is_deterministic(fake_stdlib, tmp_path):
    a = build_dataset(tmp_path / "a", source_root=fake_stdlib)
    b = build_dataset(tmp_path / "b", source_root=fake_stdlib)
    for rel in ("corpus.jsonl", "queries.jsonl", "qrels/train.tsv", "qrels/dev.tsv", "qrels/test.tsv"):
        assert (a / rel).read_bytes() == (b / rel).read_bytes()


def test_slice_keeps_judged_documents(fake_stdlib, tmp_path):
    folder = build_dataset(tmp_path / "ds", source_root=fake_stdlib, max_queries_per_split=1, max_docs=3)
    corpus = _read_corpus(folder)
    queries = read_queries(folder / "queries.jsonl")
    assert 1 <= len(queries) <= 3 and len(corpus) <= 3
    for qid in queries:
        assert qid.removeprefix("q:") in corpus


def test_real_stdlib(tmp_path):
    """The actual stdlib of this interpreter: sizes, split hygiene, cache reuse, determinism."""
    folder, cached = cached_stdlib_dataset(tmp_path)
    assert not cached
    again, cached = cached_stdlib_dataset(tmp_path)
    assert cached and again == folder
    stats = json.loads((folder / "stats.json").read_text())
    assert 2000 <= stats["documents"] <= 10000
    assert stats["queries"]["test"] >= 200 and stats["queries"]["train"] >= 1000 and stats["queries"]["dev"] >= 100
    splits = {s: load_beir(folder, s) for s in ("train", "dev", "test")}
    module_of = {}
    with open(folder / "queries.jsonl") as fh:
        for row in map(json.loads, fh):
            module_of[row["_id"]] = row["metadata"]["module"]
    train_modules = {module_of[q] for q in splits["train"].qrels}
    dev_modules = {module_of[q] for q in splits["dev"].qrels}
    test_modules = {module_of[q] for q in splits["test"].qrels}
    assert not (test_modules & train_modules) and not (dev_modules & train_modules) and not (dev_modules & test_modules)
    assert not any(m.startswith(("test.", "idlelib", "tkinter", "lib2to3")) for m in module_of.values())
    rebuilt = build_dataset(tmp_path / "rebuilt")
    for rel in ("corpus.jsonl", "queries.jsonl", "qrels/test.tsv"):
        assert (folder / rel).read_bytes() == (rebuilt / rel).read_bytes()
