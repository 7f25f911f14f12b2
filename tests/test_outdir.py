"""Output folders: splitkd cleans only folders it made (never a user's files)."""

from __future__ import annotations

from pathlib import Path

import pytest

from splitkd import outdir
from splitkd.errors import FailedPrecondition


def test_a_new_or_empty_folder_is_claimed_and_its_old_outputs_can_be_cleared(
    tmp_path: Path,
) -> None:
    new = outdir.claim(tmp_path / "new" / "run", "a tool")
    assert (new / outdir.MARKER).is_file()
    empty = tmp_path / "empty"
    empty.mkdir()
    outdir.claim(empty, "a tool")
    (new / "logs").mkdir()
    (new / "logs" / "cloud.log").write_text("old run")
    (new / "report.json").write_text("{}")
    outdir.claim(new, "a tool")  # claimed again on the next run: it carries the marker
    outdir.clear(new / "logs", owner=new)
    outdir.clear(new / "report.json", owner=new)
    outdir.clear(new / "never-written", owner=new)  # nothing there: nothing to do
    assert sorted(p.name for p in new.iterdir()) == [outdir.MARKER]


def test_a_folder_holding_someone_elses_files_is_refused_and_left_untouched(
    tmp_path: Path,
) -> None:
    (tmp_path / "thesis.tex").write_text("years of work")
    with pytest.raises(FailedPrecondition, match=r"did not write.*--out"):
        outdir.claim(tmp_path, "the testbed")
    with pytest.raises(FailedPrecondition, match="not an output folder splitkd made"):
        outdir.clear(tmp_path / "thesis.tex", owner=tmp_path)
    assert (tmp_path / "thesis.tex").read_text() == "years of work"
    assert not (tmp_path / outdir.MARKER).exists()


def test_nothing_outside_the_claimed_folder_is_deleted(tmp_path: Path) -> None:
    ours = outdir.claim(tmp_path / "ours", "a tool")
    theirs = tmp_path / "theirs.txt"
    theirs.write_text("keep")
    with pytest.raises(FailedPrecondition, match="outside the output folder"):
        outdir.clear(ours / ".." / "theirs.txt", owner=ours)
    link = ours / "link"
    link.symlink_to(tmp_path)  # a symlink in our folder is removed, never followed
    outdir.clear(link, owner=ours)
    assert theirs.read_text() == "keep" and not link.exists()


def test_make_loadtest_refuses_an_out_folder_with_the_users_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from benchmarks import loadtest

    mine = tmp_path / "batching"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    code = loadtest.main(["--out", str(tmp_path), "--batching", "on", "--edges", "1"])
    assert code == 2
    assert "did not write" in capsys.readouterr().err
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
