"""``negatives.options.index``: the `negatron index build` settings every index-backed strategy takes."""

import json
import logging

import numpy as np
import pytest

from retriever.config import ConfigError, TrainConfig, load_config
from retriever.negatives.corpus_index import (AUTO_FLAT_BELOW, IndexOptions, KeyedRows, auto_factory, auto_nlist,
                                              build_index)
from strategy_data import shared_mini, tiny_config

INDEX_BACKED = ["star", "adore", "ance", "ar2"]


@pytest.fixture(scope="module")
def mini(scifact):
    return shared_mini(scifact)


def test_auto_picks_flat_below_the_threshold_and_ivf_at_and_above_it():
    assert auto_factory(AUTO_FLAT_BELOW - 1, 768)[0] == "Flat"
    assert auto_factory(AUTO_FLAT_BELOW, 768)[0] == "IVF4096,SQfp16"         # 4*sqrt(1M) = 4,000 -> 2^12
    factory, why = auto_factory(8_841_823, 768)                               # MS MARCO passages
    assert factory == "IVF16384,SQfp16"                                       # 4*sqrt(8.8M) = 11,894 -> 2^14
    assert "25.3 GiB" in why and "12.6 GiB" in why                            # the memory it saves, stated
    assert auto_nlist(120) == 2                                               # never more lists than N / 39 train
    assert auto_factory(500, 64, flat_below=100)[0] == "IVF8,SQfp16"


@pytest.mark.parametrize("flat_below, expected", [(None, "Flat"), (50, "IVF2,SQfp16")])
def test_auto_builds_either_side_of_an_overridden_threshold_and_says_why(mini, tmp_path, caplog, flat_below, expected):
    from retriever.data import Corpus
    from retriever.modeling import BiEncoder

    folder, model = mini
    options = {} if flat_below is None else {"auto_flat_below": flat_below}
    with caplog.at_level(logging.INFO, logger="retriever.negatives.corpus_index"):
        dense, store = build_index(BiEncoder.from_pretrained(model), Corpus(folder / "corpus.jsonl"), tmp_path,
                                   bf16=False, options=options)
    assert store.count == 120 and dense.manifest["factory"] == expected
    lines = [r.getMessage() for r in caplog.records if r.name == "retriever.negatives.corpus_index"]
    assert len(lines) == 1 and f"auto -> {expected!r}" in lines[0]
    assert ("< auto_flat_below" if expected == "Flat" else ">= auto_flat_below") in lines[0]


@pytest.mark.parametrize("options, manifest", [
    ({"factory": "IVF4,Flat", "nprobe": 3, "train_sample": 100, "gpu": "no"},
     {"factory": "IVF3,Flat", "requested_factory": "IVF4,Flat", "nprobe": 3, "train_sample": 100,
      "gpus_used_for_build": 0}),
    ({"factory": "HNSW8", "ef_search": 77, "gpu": "no"}, {"factory": "HNSW8", "ef_search": 77, "nprobe": None}),
])
def test_options_reach_the_built_index_manifest(mini, tmp_path, options, manifest):
    from retriever.data import Corpus
    from retriever.modeling import BiEncoder

    folder, model = mini
    dense, _ = build_index(BiEncoder.from_pretrained(model), Corpus(folder / "corpus.jsonl"), tmp_path, bf16=False,
                           options=options)
    written = json.loads((tmp_path / "index" / "manifest.json").read_text())
    for key, value in manifest.items():  # IVF4 is clamped to 120 // 39 = 3 lists by index/faiss_index.py
        assert written[key] == value and dense.manifest[key] == value, key


def test_a_prepared_embeddings_folder_is_reused_and_another_models_refused(mini, tmp_path, caplog):
    """``index.embeddings``: the corpus encoded beforehand (e.g. under torchrun) is not re-encoded; a folder
    from other weights is refused by encoding's own check, naming the folder and the differing fingerprint."""
    import torch

    from index.encode import encode_corpus
    from retriever.data import Corpus, DataError
    from retriever.modeling import BiEncoder

    folder, model_dir = mini
    model, corpus = BiEncoder.from_pretrained(model_dir), Corpus(folder / "corpus.jsonl")
    prepared = encode_corpus(model, corpus, tmp_path / "prepared", bf16=False, show_progress=False)
    shard = tmp_path / "prepared" / "shard-00000.npy"
    written = shard.stat().st_mtime_ns
    options = {"factory": "Flat", "embeddings": str(tmp_path / "prepared")}
    with caplog.at_level(logging.INFO):
        dense, store = build_index(model, corpus, tmp_path / "run", bf16=False, options=options)
    assert shard.stat().st_mtime_ns == written and not (tmp_path / "run" / "embeddings").exists()
    assert store.folder == tmp_path / "prepared" and dense.count == prepared.count == 120
    assert any("negatives.options.index.embeddings" in r.getMessage() for r in caplog.records)
    # not reused when the caller says so (ANCE's later versions): encoded into the run's own folder
    build_index(model, corpus, tmp_path / "later", bf16=False, options=options, reuse_embeddings=False)
    assert (tmp_path / "later" / "embeddings" / "shard-00000.npy").is_file()
    with torch.no_grad():
        next(model.parameters()).add_(0.01)
    with pytest.raises(DataError) as err:
        build_index(model, corpus, tmp_path / "other", bf16=False, options=options)
    assert "checkpoint_hash" in str(err.value) and str(tmp_path / "prepared") in str(err.value)


@pytest.mark.parametrize("strategy", INDEX_BACKED)
def test_every_index_backed_strategy_takes_the_index_section(mini, strategy):
    folder, model = mini
    cfg = TrainConfig.model_validate(tiny_config(folder, model, strategy, {"index": {"factory": "IVF64,SQfp16",
                                                                                    "nprobe": 8, "gpu": "no"}}))
    index = cfg.negatives.options["index"]  # defaults explicit in the run's config.yaml
    assert index == {"factory": "IVF64,SQfp16", "nprobe": 8, "ef_search": None, "train_sample": None, "gpu": "no",
                     "auto_flat_below": AUTO_FLAT_BELOW, "embeddings": None}
    default = TrainConfig.model_validate(tiny_config(folder, model, strategy, {}))
    assert default.negatives.options["index"]["factory"] == "auto"


@pytest.mark.parametrize("strategy", INDEX_BACKED)
def test_unknown_or_bad_index_keys_are_refused_naming_the_key(mini, tmp_path, strategy):
    import yaml

    folder, model = mini
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(tiny_config(folder, model, strategy, {"index": {"nprob": 4}})))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert "'nprob'" in message and "negatives.options.index" in message and "Did you mean 'nprobe'" in message
    path.write_text(yaml.safe_dump(tiny_config(folder, model, strategy, {"index": {"gpu": "maybe"}})))
    with pytest.raises(ConfigError, match="gpu"):
        load_config(path)
    with pytest.raises(ValueError, match="nprob"):
        IndexOptions.model_validate({"nprob": 4})


def test_keyed_rows_groups_concatenates_and_deduplicates():
    rows = KeyedRows(np.int32)
    rows.add(7, [3, 1])
    rows.add(-2, [])
    rows.add(7, [1, 9])
    rows.add(5, [4])
    frozen = rows.freeze()
    assert frozen.get(7).tolist() == [3, 1, 1, 9] and frozen.get(-2).tolist() == [] and frozen.get(8) is None
    assert frozen.values.dtype == np.int32 and frozen.keys.tolist() == [-2, 5, 7]
    rows = KeyedRows()
    rows.add(7, [3, 1])
    rows.add(7, [1, 9])
    assert rows.freeze(unique=True).get(7).tolist() == [1, 3, 9]


def test_keyed_rows_freeze_gathers_in_blocks_with_little_transient_memory():
    """Freezing an 8.8M-passage STAR pool (~50M values) built one int64 index over every value: 1.2 GB of
    transient memory, which put the stage over its bound. A block of groups at a time gives the same rows."""
    import tracemalloc

    rng = np.random.default_rng(0)
    keys = rng.integers(-10**12, 10**12, 60_000)  # many blocks of 4,096 groups, unsorted, some repeated
    keys[::7] = keys[0]
    expected: dict[int, list[int]] = {}
    rows = KeyedRows(np.int32)
    for key in keys.tolist():
        values = rng.integers(0, 8_000_000, 40).tolist()
        rows.add(key, values)
        expected.setdefault(key, []).extend(values)
    values_bytes = len(rows._vals) * 4
    tracemalloc.start()
    rows.freeze()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(rows) == len(expected) and all(rows.get(k).tolist() == v for k, v in expected.items())
    # the frozen copy plus a small per-block index (one index over everything was 5x the values here)
    assert peak < 1.6 * values_bytes, (peak, values_bytes)
