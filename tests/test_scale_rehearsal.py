"""The scale rehearsal at a small size (issue #13): every stage runs as the CLI and stays within the memory
bound ``1.5 x fp16 embeddings + model + CONSTANT_MIB``; the generated files are in the official formats."""

import hashlib
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import scale_rehearsal as sr  # noqa: E402


@pytest.fixture(scope="module")
def cache(tmp_path_factory, shared_data):
    return tmp_path_factory.mktemp("rehearsal-cache")


def test_generated_files_are_msmarco_shaped_and_deterministic(cache, tmp_path):
    meta = sr.generate(cache / "n3000", 3000)
    again = sr.generate(tmp_path / "n3000", 3000)
    folder = cache / "n3000"
    for name in ("collection.tsv", "queries.train.tsv", "qrels.train.tsv", "triples.train.small.tsv",
                 "queries.dev.small.tsv", "qrels.dev.small.tsv"):
        a, b = (folder / name).read_bytes(), (tmp_path / "n3000" / name).read_bytes()
        assert hashlib.sha256(a).digest() == hashlib.sha256(b).digest(), name
    assert meta["bytes"] == again["bytes"]
    from retriever.data import Corpus, iter_triples, read_qrels, read_queries

    corpus = Corpus(folder / "collection.tsv")
    assert len(corpus) == 3000 and corpus.ids[0] == "0"
    words = [len(corpus[i].text.split()) for i in range(0, 3000, 30)]
    assert 25 <= sum(words) / len(words) <= 110  # MS MARCO passages average ~56 words
    queries, qrels = read_queries(folder / "queries.train.tsv"), read_qrels(folder / "qrels.train.tsv")
    assert len(queries) == meta["train_queries"] == len(qrels) and all(d in corpus for r in qrels.values() for d in r)
    first = next(iter_triples(folder / "triples.train.small.tsv"))
    assert first.query == queries["1000000"] and first.positives == [corpus.get(next(iter(qrels["1000000"]))).text]
    assert (folder / "qrels.dev.small.tsv").read_text().split("\n")[0].split("\t")[1] == "0"  # qid 0 pid rel


def test_growth_exponents():
    res = [{"passages": 1000, "rows": [{"stage": "encode", "wall_s": 2.0, "peak_rss_mib": 500.0}]},
           {"passages": 10000, "rows": [{"stage": "encode", "wall_s": 20.0, "peak_rss_mib": 500.0}]}]
    assert sr.exponents(res) == [{"stage": "encode", "from": 1000, "to": 10000, "time_exponent": 1.0, "rss_exponent": 0.0}]
    assert sr.nlist_for(100_000) == 1024 and sr.nlist_for(8_841_823) == 16384 and sr.nlist_for(3000) == 76


def test_reused_embeddings_are_encoded_at_the_train_length_and_refused_for_eval(tmp_path):
    """STAR/ADORE/ANCE accept the encode stage's folder only at their doc_max_length; eval and mine search
    with the model's own length, so a reuse run refuses them up front (before generating any data)."""
    encode = sr._encode_cmd(Path("m"), Path("c.tsv"), Path("emb"), 1, 1, sr.DOC_MAX_LENGTH)
    assert encode[encode.index("--max-length") + 1] == str(sr.DOC_MAX_LENGTH)
    assert "--max-length" not in sr._encode_cmd(Path("m"), Path("c.tsv"), Path("emb"), 1, 1)
    assert sr._strategy_options(10, Path("emb"))["adore"]["index"] == {"embeddings": "emb"}
    with pytest.raises(ValueError, match="reuse-embeddings"):
        sr.rehearse(1000, tmp_path / "cache", tmp_path / "work", 10, 1, stages=["encode", "eval"], reuse_embeddings=True)
    assert not (tmp_path / "cache").exists()


def test_small_rehearsal_stays_within_the_memory_bound(cache, tmp_path):
    stages = {"read", "encode", "index-exact", "index-ivf", "mine", "train-inbatch", "train-star", "train-adore",
              "train-ance", "eval", "serve"}
    result = sr.rehearse(5_000, cache, tmp_path / "work", steps=10, threads=1, stages=stages, timeout=300)
    rows = {r["stage"]: r for r in result["rows"]}
    assert set(rows) == stages - {"serve"} | {"serve + refresh under load"}
    over = {s: (r["peak_rss_mib"], r["bound_mib"]) for s, r in rows.items() if not r["within_bound"]}
    assert not over, f"stages over their bound (peak, bound MiB): {over}"
    bound = sr.memory_bound(result["emb_fp16_mib"], result["model_mib"])
    assert all(r["bound_mib"] == round(bound, 1) for s, r in rows.items() if s != "train-ance")  # one role each
    assert all(r["peak_rss_mib"] > 50 and r["wall_s"] > 0 for r in rows.values())  # the measurement saw the child
    assert rows["encode"]["disk_mib"] >= result["emb_fp16_mib"]
    assert (tmp_path / "work" / "eval").is_dir() and (tmp_path / "work" / "mined.jsonl").is_file()
    serve = rows["serve + refresh under load"]
    assert serve["failed"] == 0 and serve["final_version"] >= 2 and serve["answered"] > 0
    for name in ("star", "adore", "ance"):  # each index-backed strategy trained its steps
        assert (tmp_path / "work" / f"run-{name}" / "final").is_dir(), name


def test_resumed_encode_keeps_the_finished_shards(cache, tmp_path):
    """An 8.8M encode outlives a session: ``--resume-encode`` keeps the shards an earlier run finished instead
    of deleting the folder and encoding everything again."""
    assert "--overwrite" in sr._encode_cmd(Path("m"), Path("c.tsv"), Path("emb"), 1, 1)
    assert "--overwrite" not in sr._encode_cmd(Path("m"), Path("c.tsv"), Path("emb"), 1, 1, resume=True)
    work = tmp_path / "work"
    first = sr.rehearse(3000, cache, work, 10, 1, stages=["encode"], timeout=300)
    assert "resumed_shards" not in first["rows"][0]
    timeline = (work / "encode.rss.tsv").read_text().splitlines()  # when and in which memory a stage grew
    assert timeline[0].split("\t") == ["elapsed_s", "tree_rss_mib", "root_anon_mib", "root_file_mib"]
    assert len(timeline) >= 2 and float(timeline[1].split("\t")[2]) > 0
    shards = sorted((work / "emb").glob("shard-*.npy"))
    stamps = [p.stat().st_mtime_ns for p in shards]
    shards[-1].unlink()  # as if the run had been killed before its last shard
    again = sr.rehearse(3000, cache, work, 10, 1, stages=["encode"], timeout=300, resume_encode=True)
    assert again["rows"][0]["resumed_shards"] == len(shards) - 1
    assert [p.stat().st_mtime_ns for p in shards[:-1]] == stamps[:-1] and shards[-1].is_file()


def test_resumed_mining_keeps_the_partial_pool_and_warmup_index(tmp_path):
    """``--resume-mining`` clears an interrupted train-star folder but for what STAR's up-front mining
    finished, and counts its complete rows (a torn last line is not one)."""
    run = tmp_path / "run-star"
    (run / "checkpoint-100").mkdir(parents=True)
    (run / "star-warmup-index" / "index").mkdir(parents=True)
    (run / "train_log.jsonl").write_text("{}\n")
    (run / "star-hard-negatives.jsonl.partial").write_text('{"query": "a", "neg_ids": ["1"]}\n' * 3 + '{"que')
    (run / "star-hard-negatives.jsonl.partial.json").write_text("{}\n")
    assert sr.keep_star_mining(run) == 3
    assert sorted(p.name for p in run.iterdir()) == [
        "star-hard-negatives.jsonl.partial", "star-hard-negatives.jsonl.partial.json", "star-warmup-index"]
    assert sr.keep_star_mining(tmp_path / "absent") == 0
    # a run killed after its mining (in training): the finished pool and its done marker stay
    (run / "star-hard-negatives.jsonl").write_text('{"query": "a", "neg_ids": ["1"]}\n' * 5)
    (run / "star-hard-negatives.jsonl.done.json").write_text("{}\n")
    (run / "checkpoint-200").mkdir()
    assert sr.keep_star_mining(run) == 5 and not (run / "checkpoint-200").exists()
    assert (run / "star-hard-negatives.jsonl.done.json").exists()


def test_resumed_ance_stage_continues_from_its_checkpoint(cache, tmp_path):
    """``--resume-training``: an ANCE stage killed after a checkpoint (at 8.8M, in its hours-long refresh)
    continues from that checkpoint with ``negatron train --resume``."""
    import shutil

    work = tmp_path / "work"
    first = sr.rehearse(3000, cache, work, 4, 1, stages=["train-ance"], timeout=600)
    run = work / "run-ance"
    assert "resumed_from_step" not in first["rows"][0] and (run / "final").is_dir()
    assert sr.newest_checkpoint_step(run) == 4  # save_every = steps // 4 = 1, keep_last 1
    shutil.rmtree(run / "final")  # killed after its last checkpoint, before the final model was written
    again = sr.rehearse(3000, cache, work, 4, 1, stages=["train-ance"], timeout=600, resume_training=True)
    assert again["rows"][0]["resumed_from_step"] == 4 and (run / "final").is_dir()
    assert sr.newest_checkpoint_step(tmp_path / "absent") is None


def test_complete_index_needs_its_manifest_and_the_whole_file(tmp_path):
    import json

    folder = tmp_path / "ix"
    folder.mkdir()
    (folder / "index.faiss").write_bytes(b"x" * 100)
    assert not sr.complete_index(folder, 10)  # no manifest: a build that never finished
    (folder / "manifest.json").write_text(json.dumps({"count": 10, "index_bytes": 100}))
    assert sr.complete_index(folder, 10) and not sr.complete_index(folder, 11)
    (folder / "index.faiss").write_bytes(b"x" * 50)
    assert not sr.complete_index(folder, 10)
