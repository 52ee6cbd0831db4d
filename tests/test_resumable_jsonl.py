"""ResumableJsonl: what a kill leaves behind is kept exactly when it can be trusted, and never mixed with
rows of another job."""

import json

import pytest

from retriever.resumable_jsonl import ResumableJsonl


def _job(path, fingerprint, rows, state=None, done_marker=False, kill_after=None):
    """Write ``rows`` (a kill after ``kill_after`` of them: no finish, as SIGKILL would leave it)."""
    written = [0]
    out = ResumableJsonl(path, fingerprint, sync_every_s=0.0, done_marker=done_marker,
                         state=(lambda: {"written": written[0]}) if state else None)
    kept = list(out.kept_rows())
    out.open()
    for row in rows[len(kept):]:
        if kill_after is not None and written[0] - len(kept) == kill_after:
            out._fh.flush()
            return out, kept
        written[0] += 1
        out.write(row)
        out.checkpoint()  # a job with state saves it where rows and state agree; a stateless one ignores this
    out.finish()
    return out, kept


ROWS = [{"i": i} for i in range(10)]


def test_kept_rows_resume_and_the_file_is_whole(tmp_path):
    path = tmp_path / "out.jsonl"
    _job(path, {"a": 1}, ROWS, kill_after=4)
    assert not path.exists() and len((tmp_path / "out.jsonl.partial").read_text().splitlines()) == 4
    with open(tmp_path / "out.jsonl.partial", "a") as fh:
        fh.write('{"i": 4')  # torn by the kill
    out, kept = _job(path, {"a": 1}, ROWS)
    assert kept == ROWS[:4] and out.resumed_rows == 4
    assert [json.loads(line) for line in path.read_text().splitlines()] == ROWS
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl"]


def test_another_fingerprint_starts_anew(tmp_path):
    path = tmp_path / "out.jsonl"
    _job(path, {"a": 1}, ROWS, kill_after=4)
    out, kept = _job(path, {"a": 2}, [{"j": i} for i in range(3)])
    assert kept == [] and [json.loads(line) for line in path.read_text().splitlines()] == [{"j": i} for i in range(3)]


def test_a_job_with_state_keeps_only_the_rows_its_state_covers(tmp_path):
    path = tmp_path / "out.jsonl"
    _job(path, {"a": 1}, ROWS, state=True, kill_after=5)
    with open(tmp_path / "out.jsonl.partial", "a") as fh:  # rows written after the last saved state
        fh.write('{"i": 5}\n{"i": 6}\n')
    out = ResumableJsonl(path, {"a": 1}, state=lambda: {})
    assert list(out.kept_rows()) == ROWS[:5] and out.resumed_state == {"written": 5}
    out.open()
    assert len((tmp_path / "out.jsonl.partial").read_text().splitlines()) == 5  # the two extra rows cut off

    # a state ahead of its rows (cannot happen in order, but a damaged folder can) is not trusted
    state = json.loads((tmp_path / "out.jsonl.partial.state.json").read_text())
    (tmp_path / "out.jsonl.partial.state.json").write_text(json.dumps({**state, "rows": 9}))
    out.close()
    again = ResumableJsonl(path, {"a": 1}, state=lambda: {})
    assert list(again.kept_rows()) == ROWS[:5] and again.resumed_rows == 0 and again.resumed_state is None


def test_a_finished_block_is_skipped_by_its_done_marker(tmp_path):
    path = tmp_path / "block"
    _job(path, {"a": 1}, ROWS, state=True, done_marker=True)
    assert json.loads((tmp_path / "block.done.json").read_text())["state"] == {"written": 10}
    assert ResumableJsonl(path, {"a": 1}, done_marker=True).finished() == {"written": 10}
    assert ResumableJsonl(path, {"a": 2}, done_marker=True).finished() is None
    assert ResumableJsonl(path, {"a": 1}).finished() is None  # only jobs that ask for the marker


def test_kept_rows_can_be_capped_and_the_rest_is_cut_off(tmp_path):
    path = tmp_path / "out.jsonl"
    _job(path, {"a": 1}, ROWS, kill_after=7)
    out = ResumableJsonl(path, {"a": 1})
    assert out.complete_rows() == 7 and list(out.kept_rows(limit=4)) == ROWS[:4]
    out.open()
    assert len((tmp_path / "out.jsonl.partial").read_text().splitlines()) == 4


def test_a_marker_beside_a_partial_is_not_trusted_and_lone_surrogates_are_written(tmp_path):
    """Killed between writing the done marker and the rename: the file there is an older one."""
    path = tmp_path / "out.jsonl"
    _job(path, {"a": 1}, ROWS, done_marker=True)  # an older, finished file
    _job(path, {"a": 2}, [{"s": "\ud800 lone"}] * 5, done_marker=True, kill_after=3)
    (tmp_path / "out.jsonl.done.json").write_text(json.dumps({"fingerprint": {"a": 2}, "state": None}))
    out = ResumableJsonl(path, {"a": 2}, done_marker=True)
    assert out.finished() is None
    assert list(out.kept_rows()) == [{"s": "\ud800 lone"}] * 3
    out.open().finish()
    assert [json.loads(line) for line in path.read_text().splitlines()] == [{"s": "\ud800 lone"}] * 3
    with pytest.raises(ValueError, match="no limit"):
        list(ResumableJsonl(path, {"a": 2}, state=lambda: {}).kept_rows(limit=1))
