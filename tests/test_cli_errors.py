"""One error path for every command (lsdc.cli.LsdcGroup): a user's mistake is one line `lsdc <command>: ...` and
exit 2; an unexpected exception (a bug) keeps its traceback; LSDC_DEBUG=1 shows the traceback for both."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cache.errors import InputError
from lsdc.cli import app

runner = CliRunner()

# (argv with {tmp} for a fresh folder, what the one line says, the function a bug is planted in)
COMMANDS = [
    (["synth", "{tmp}/full"], "is not empty and holds no lsdc synthetic dataset", "prep.synth.synth"),
    (["prep", "{tmp}/nowhere", "{tmp}/c"], "no such folder", "prep.build.build"),
    (["prep", "{tmp}/full", "{tmp}/c", "--clahe-clip", "nan"], "clahe_clip", None),
    (["train", "{tmp}/nowhere", "{tmp}/run"], "no cache at", "train.loop.fit"),
    (["train", "{tmp}/full", "{tmp}/run", "--set", "lr_head=-1"], "lr_head must be at least 0, got -1", None),
    (["prep-volumes", "{tmp}/nowhere", "{tmp}/v"], "no such folder", "prep.volumes.build_volumes"),
    (["train-locator", "{tmp}/nowhere", "{tmp}/loc"], "no cache at", "lsdc.locate.train_locator"),
    (["train-locator", "{tmp}/full", "{tmp}/loc", "--set", "sigma_mm=-1"], "sigma_mm must be at least 0.1", None),
    (["locate", "{tmp}/full", "{tmp}/full"], "holds no localiser run", "lsdc.locate.locate"),
    (["predict", "{tmp}/full/junk.pt", "--locator", "{tmp}/full", "--data", "{tmp}/full"],
     "holds no localiser run", "lsdc.locate.predict_from_dicoms"),
    (["evaluate", "{tmp}/nowhere"], "does not exist", "train.evaluate.evaluate"),
    (["predict", "{tmp}/full/junk.pt", "--cache", "{tmp}/full"], "is not an lsdc checkpoint", "train.predict.predict"),
    (["demo", "--out", "{tmp}/full/junk.pt"], "junk.pt", "lsdc.demo.run_demo"),
    (["cache", "info", "{tmp}/full"], "no cache at", "cache.reader.open"),
    (["cache", "verify", "{tmp}/full"], "no cache at", "cache.reader.open"),
    (["cache", "show", "{tmp}/full", "--study", "1", "--condition", "spinal", "--level", "L4/L5"], "no cache at",
     "cache.reader.open"),
    (["bench", "prep", "{tmp}/full"], "missing file", "lsdc.bench.prep_bench.bench_prep"),
    (["bench", "load", "{tmp}/full"], "no cache at", "lsdc.bench.load_bench.bench_load"),
    (["bench", "train", "{tmp}/full"], "no cache at", "lsdc.bench.train_bench.bench_train"),
    (["bench", "predict", "{tmp}/full", "{tmp}/full", "{tmp}/full"], "test_series_descriptions.csv",
     "lsdc.bench.predict_bench.bench_predict"),
]
# the commands whose work is called at all (the others are refused while reading their settings)
CALLED = [(argv, where) for argv, _, where in COMMANDS if where is not None]
IDS = [" ".join(a[:2]) if a[0] in ("cache", "bench") else f"{a[0]}-{i}" for i, (a, _, _) in enumerate(COMMANDS)]


def _args(argv: list[str], tmp: Path) -> list[str]:
    full = tmp / "full"
    full.mkdir(exist_ok=True)
    (full / "junk.pt").write_text("not a checkpoint\n")  # also makes the folder non-empty
    return [a.format(tmp=tmp) for a in argv]


def _command(argv: list[str]) -> str:
    return " ".join(argv[:2]) if argv[0] in ("cache", "bench") else argv[0]


@pytest.mark.parametrize("argv, says, _", COMMANDS, ids=IDS)
def test_a_user_error_is_one_line_and_exit_2(tmp_path, monkeypatch, argv, says, _):
    monkeypatch.delenv("LSDC_DEBUG", raising=False)
    res = runner.invoke(app, _args(argv, tmp_path))
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"lsdc {_command(argv)}: ") and says in lines[0], res.output
    assert "Traceback" not in res.output


@pytest.mark.parametrize("argv, where", CALLED, ids=[i for i, c in zip(IDS, COMMANDS) if c[2] is not None])
@pytest.mark.parametrize("bug", [KeyError("the bug"), RuntimeError("the bug"), ValueError("the bug")])
def test_a_bug_keeps_its_traceback(tmp_path, monkeypatch, argv, where, bug):
    # the same commands, with the function they call raising what a bug raises: never turned into one line
    module, name = where.rsplit(".", 1)

    def broken(*args, **kwargs):
        raise bug

    monkeypatch.setattr(f"{module}.{name}", broken)
    if where == "cache.reader.open":
        monkeypatch.setattr("cache.open", broken, raising=False)
    res = runner.invoke(app, _args(argv, tmp_path))
    assert res.exit_code == 1 and res.exception is bug, res.output


def test_lsdc_debug_shows_the_traceback_of_a_user_error(tmp_path, monkeypatch):
    from cache import CacheError

    monkeypatch.setenv("LSDC_DEBUG", "1")
    res = runner.invoke(app, ["cache", "info", str(tmp_path)])
    assert res.exit_code == 1 and isinstance(res.exception, CacheError)


def test_the_console_command_prints_a_bugs_traceback_and_a_user_errors_line(tmp_path):
    bug = ("import sys; sys.argv = ['lsdc', 'evaluate', 'x']; import train.evaluate as e; "
           "e.evaluate = lambda *a, **k: {}['missing key']; from lsdc.cli import main; main()")
    res = subprocess.run([sys.executable, "-c", bug], capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 1 and "KeyError" in res.stderr and "Traceback" in res.stderr
    res = subprocess.run([sys.executable, "-m", "lsdc", "evaluate", "nowhere"], capture_output=True, text=True,
                         cwd=tmp_path)
    assert res.returncode == 2 and res.stderr.strip().splitlines() == [
        "lsdc evaluate: nowhere does not exist (give a run directory, an OOF .parquet or a submission .csv)"]


def test_a_full_disk_is_one_line_naming_the_file(tmp_path, monkeypatch):
    import errno

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "c" / "index.parquet"))

    monkeypatch.setattr("prep.build.build", full)
    (tmp_path / "d").mkdir()
    res = runner.invoke(app, ["prep", str(tmp_path / "d"), str(tmp_path / "c")])
    assert res.exit_code == 2 and res.output.strip() == (
        f"lsdc prep: No space left on device: {tmp_path / 'c' / 'index.parquet'}")


def test_tables_a_user_gives_are_named_when_they_cannot_be_read(tmp_path):
    import os

    from train.predict import submission_rows

    sub = tmp_path / "sub.csv"
    sub.write_text("row_id,normal_mild,moderate,severe\n")
    (tmp_path / "empty.csv").write_text("")
    os.mkfifo(tmp_path / "fifo.csv")
    for labels, says in (("empty.csv", "empty.csv: empty file (no header)"),
                         ("fifo.csv", "fifo.csv: not a regular file"), ("nope.csv", "nope.csv: no such file")):
        res = runner.invoke(app, ["evaluate", str(sub), "--labels", str(tmp_path / labels)])
        assert res.exit_code == 2 and says in res.output and len(res.output.strip().splitlines()) == 1, res.output
    with pytest.raises(InputError, match="a header and no rows"):  # not an empty submission with exit 0
        submission_rows(sub, [1])
