"""The shared, memory-mapped corpus offset index (issue #13: Corpus kept a list + dict of 8.8M ids)."""

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest

import retriever.offset_index as offset_index
from retriever.data import Corpus, DataError
from retriever.offset_index import CorpusIds


def _corpus_file(path, n=300):
    path.write_text("".join(json.dumps({"_id": f"doc-{i}", "title": f"t{i}", "text": f"text {i}"}) + "\n" for i in range(n)))
    return path


def test_index_is_built_once_memory_mapped_and_shared(tmp_path, monkeypatch):
    path = _corpus_file(tmp_path / "c.jsonl")
    first = Corpus(path)
    assert isinstance(first.ids, CorpusIds) and isinstance(first._offsets, np.memmap)
    folder = first._index.folder
    assert folder is not None and folder.parent == offset_index.cache_root()
    assert sorted(p.name for p in folder.iterdir()) == ["id_bytes.npy", "id_ends.npy", "id_hashes.npy", "id_rows.npy",
                                                      "meta.json", "offsets.npy"]
    # a second consumer maps the same files and never rescans the corpus
    monkeypatch.setattr(Corpus, "_scan", lambda self: pytest.fail("the corpus was rescanned"))
    second = Corpus(path)
    assert second._index.folder == folder and second.ids == first.ids
    assert second.get("doc-17").text == "text 17" and second.row("doc-299") == 299


def test_ids_behave_like_the_list_they_replace(tmp_path):
    corpus = Corpus(_corpus_file(tmp_path / "c.jsonl", n=70_000))  # > one 65,536-id iteration chunk
    expect = [f"doc-{i}" for i in range(70_000)]
    assert corpus.ids == expect and expect == corpus.ids and list(corpus.ids) == expect
    assert corpus.ids[-1] == "doc-69999" and corpus.ids[3:5] == ["doc-3", "doc-4"] and len(corpus.ids) == 70_000
    assert "doc-65536" in corpus and "doc-70000" not in corpus and 5 not in corpus
    assert corpus.rows(["doc-9", "nope", "doc-65537"]).tolist() == [9, -1, 65537]
    asked = [f"doc-{i}" for i in np.random.default_rng(0).integers(0, 71_000, 5_000)]
    assert corpus.rows(iter(asked)).tolist() == [int(d[4:]) if int(d[4:]) < 70_000 else -1 for d in asked]
    assert corpus.rows([]).tolist() == []
    with pytest.raises(KeyError, match="'nope' is not in"):
        corpus.row("nope")
    with pytest.raises(IndexError):
        corpus.ids[70_000]


def test_hash_collisions_are_resolved_by_comparing_ids(tmp_path, monkeypatch):
    monkeypatch.setattr(offset_index, "id_hash", lambda doc_id: 7)  # every id collides
    corpus = Corpus(_corpus_file(tmp_path / "c.jsonl", n=50))
    assert [corpus.row(f"doc-{i}") for i in range(50)] == list(range(50)) and "doc-50" not in corpus
    asked = [f"doc-{i}" for i in (49, 0, 17, 17)] + ["doc-50", ""]  # the batch path walks the same runs
    assert corpus.rows(asked).tolist() == [49, 0, 17, 17, -1, -1]
    dup = tmp_path / "d.tsv"
    dup.write_text("a\tx\nb\ty\nc\tz\nb\tw\n")
    with pytest.raises(DataError, match=r"d\.tsv:4: duplicate document id 'b' \(first seen on line 2\)"):
        Corpus(dup)


def test_an_edited_corpus_gets_a_fresh_index(tmp_path):
    path = _corpus_file(tmp_path / "c.jsonl", n=5)
    old = Corpus(path)
    path.write_text('{"_id": "new", "text": "fresh"}\n')
    os.utime(path, ns=(1, 1))  # a different mtime even on a coarse-clock filesystem
    new = Corpus(path)
    assert new._index.folder != old._index.folder and list(new.ids) == ["new"] and len(new) == 1


def test_pickling_ships_the_folder_not_the_arrays(tmp_path):
    corpus = Corpus(_corpus_file(tmp_path / "c.jsonl", n=20_000))
    blob = pickle.dumps(corpus)
    assert len(blob) < 5_000  # the arrays would be ~1 MB
    again = pickle.loads(blob)
    assert again.get("doc-19999").title == "t19999" and again.ids == corpus.ids


def test_read_only_cache_falls_back_to_memory(tmp_path, monkeypatch):
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the cache folder would go")
    monkeypatch.setenv("NEGATRON_CACHE_DIR", str(blocked))
    corpus = Corpus(_corpus_file(tmp_path / "c.jsonl", n=10))
    assert corpus._index.folder is None and corpus.get("doc-3").text == "text 3"
    assert pickle.loads(pickle.dumps(corpus)).row("doc-9") == 9


def test_embedding_and_index_ids_are_memory_mapped(tmp_path):
    from index.store import read_ids

    path = tmp_path / "ids.txt"
    path.write_text("a\nbb\n\u00e9t\u00e9\n")
    ids = read_ids(path, 3)
    assert isinstance(ids, CorpusIds) and ids == ["a", "bb", "\u00e9t\u00e9"] and ids[2] == "\u00e9t\u00e9"
    path.write_text("a\nbb")  # no final newline
    assert list(read_ids(path, 2)) == ["a", "bb"]
    with pytest.raises(DataError, match="2 ids but the manifest says 3"):
        read_ids(path, 3)


def test_take_decodes_many_ids_at_once(tmp_path):
    corpus = Corpus(_corpus_file(tmp_path / "c.jsonl", n=50))
    rows = [0, 49, 7, 7, 1]
    assert corpus.ids.take(rows) == [corpus.ids[r] for r in rows] == ["doc-0", "doc-49", "doc-7", "doc-7", "doc-1"]
    lines = tmp_path / "ids.txt"
    lines.write_text("a\nbb\nccc\n")
    assert CorpusIds.from_lines(lines).take([2, 0, 1]) == ["ccc", "a", "bb"]
    with pytest.raises(IndexError):
        corpus.ids.take([50])


def _mapped_kib(folder) -> float:
    """KiB of this process's resident pages mapped from files under ``folder`` (Linux smaps)."""
    import re

    total, current = 0, ""
    with open("/proc/self/smaps") as fh:
        for line in fh:
            head = re.match(r"^[0-9a-f]+-[0-9a-f]+ \S+ \S+ \S+ \d+\s*(.*)$", line)
            if head:
                current = head.group(1).strip()
            elif line.startswith("Rss:") and current.startswith(str(folder)):
                total += int(line.split()[1])
    return total


def _large_corpus(tmp_path, monkeypatch, n: int = 300_000):
    """(offset-index cache folder, Corpus, n): a TSV corpus big enough that its id and offset maps span MiBs."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("NEGATRON_CACHE_DIR", str(cache))
    path = tmp_path / "collection.tsv"
    path.write_text("".join(f"p{i}\tpassage number {i}\n" for i in range(n)))
    return cache, Corpus(path), n


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs Linux /proc/self/smaps")
def test_a_burst_of_id_lookups_leaves_no_mapped_pages_resident(tmp_path, monkeypatch):
    """Looking up a qrels file's ids touches pages all over the id maps (Linux maps them in up to 2 MiB
    folios); the table builder and the alignment check unmap them afterwards, and lookups still work."""
    from retriever.example_table import table_from_qrels

    cache, corpus, n = _large_corpus(tmp_path, monkeypatch)
    rng = np.random.default_rng(0)
    picked = rng.choice(n, 5_000, replace=False).tolist()
    assert corpus.rows([f"p{i}" for i in picked]).tolist() == picked
    assert _mapped_kib(cache) > 1024  # the lookups left the maps resident
    queries = {f"q{i}": f"query {i}" for i in picked}
    table = table_from_qrels(queries, {f"q{i}": {f"p{i}": 1} for i in picked}, corpus)
    assert _mapped_kib(cache) < 512
    assert table.positive_rows(7).tolist() == [picked[7]] and corpus.get(f"p{picked[9]}").text == f"passage number {picked[9]}"

    lines = tmp_path / "ids.txt"
    lines.write_text("".join(f"p{i}\n" for i in range(n)))
    ids = CorpusIds.from_lines(lines)  # its scan read every page
    assert _mapped_kib(lines) < 512 and ids[123_456] == "p123456" and len(ids) == n


def test_line_ends_of_an_ids_file_are_kept_beside_it_and_never_trusted_when_stale(tmp_path):
    """``ids.txt``'s line ends are saved as ``ids.txt.ends.npy`` and memory-mapped by later opens (no 67 MiB
    array per open at 8.8M); a rewritten ids file or a damaged ends file is scanned again."""
    import time

    lines = tmp_path / "ids.txt"
    lines.write_text("a\nbb\nccc\n")
    first = CorpusIds.from_lines(lines)
    cached = tmp_path / "ids.txt.ends.npy"
    assert list(first) == ["a", "bb", "ccc"] and cached.is_file()
    again = CorpusIds.from_lines(lines)
    assert isinstance(again._ends, np.memmap) and list(again) == ["a", "bb", "ccc"]

    time.sleep(0.01)
    lines.write_text("x\ny\n")  # newer than the saved ends: they are not used
    assert list(CorpusIds.from_lines(lines)) == ["x", "y"]
    cached.write_bytes(b"not an npy file")
    os.utime(cached, ns=(time.time_ns() + 10**9,) * 2)
    assert list(CorpusIds.from_lines(lines)) == ["x", "y"]
    np.save(cached, np.array([1, 3, 5], dtype=np.int64))  # newer but from a longer file: refused by its end
    os.utime(cached, ns=(time.time_ns() + 10**9,) * 2)
    assert list(CorpusIds.from_lines(lines)) == ["x", "y"]


def test_a_read_only_ids_folder_keeps_the_line_ends_in_memory(tmp_path, monkeypatch):
    import retriever.offset_index as oi

    lines = tmp_path / "ids.txt"
    lines.write_text("a\nbb\n")
    monkeypatch.setattr(oi.tempfile, "mkstemp", lambda *a, **k: (_ for _ in ()).throw(PermissionError("read-only")))
    ids = CorpusIds.from_lines(lines)
    assert list(ids) == ["a", "bb"] and not (tmp_path / "ids.txt.ends.npy").exists()


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs Linux /proc/self/smaps")
def test_scattered_passage_and_triple_reads_leave_the_offset_maps_unmapped(tmp_path, monkeypatch):
    """Reading passages (or triples) at random reads each line's offset with pread: the offsets file stays in
    the page cache, not in the process's RSS, and every read returns the right line."""
    import pickle

    from retriever.example_table import TriplesFile

    cache, corpus, n = _large_corpus(tmp_path, monkeypatch)
    rng = np.random.default_rng(1)
    for r in rng.choice(n, 3_000, replace=False).tolist():
        assert corpus[r].text == f"passage number {r}"
    assert corpus[-1].id == f"p{n - 1}" and corpus[0].id == "p0"
    with pytest.raises(IndexError):
        corpus[n]
    assert _mapped_kib(cache) < 512

    triples = tmp_path / "triples.tsv"
    triples.write_text("".join(f"q{i}\tpos {i}\tneg {i}\n" for i in range(n)))
    table = TriplesFile(triples)
    for i in rng.choice(n, 3_000, replace=False).tolist():
        assert table[i].query == f"q{i}"
    assert table[n - 1].negatives == [f"neg {n - 1}"]
    assert _mapped_kib(cache) < 512 and _mapped_kib(triples.parent) < 1024
    again = pickle.loads(pickle.dumps(table))  # a DataLoader worker's copy reads the same lines
    assert again[12_345].positives == ["pos 12345"]
