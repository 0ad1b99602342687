"""The `lsdc` command: every subcommand is listed, and --help imports none of the heavy stacks."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from lsdc.cli import app

HEAVY = ("torch", "timm", "pydicom", "dask", "distributed", "cv2", "matplotlib", "zarr", "sklearn", "pandas")


def test_help_lists_every_command():
    out = CliRunner().invoke(app, ["--help"])
    assert out.exit_code == 0
    for name in ("synth", "prep", "train", "evaluate", "predict", "demo", "cache", "bench"):
        assert name in out.output


def test_help_imports_no_heavy_stack():
    code = ("import sys; from typer.testing import CliRunner; from lsdc.cli import app; "
            "r = CliRunner().invoke(app, ['--help']); assert r.exit_code == 0, r.output; "
            f"import json; print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))")
    loaded = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                       check=True).stdout)
    assert loaded == []


def test_a_folder_named_like_a_package_does_not_shadow_it(tmp_path):
    """A user's `cache/` (a crop cache), `prep/` or `train/` folder in the working directory must not be imported
    in place of lsdc's packages, by `python -c`, a notebook or `python -m lsdc` (torchrun's form). This checks the
    install `make` does (a strict editable install, README)."""
    for name in ("cache", "prep", "train"):
        (tmp_path / name).mkdir()
    code = "import cache, prep, train; print(hasattr(cache, 'open'), all(m.__file__ for m in (prep, train)))"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 0 and res.stdout.split() == ["True", "True"], res.stderr[-2000:]
    res = subprocess.run([sys.executable, "-m", "lsdc", "cache", "info", "cache"], capture_output=True, text=True,
                         cwd=tmp_path)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]


@pytest.mark.parametrize("argv, hidden, says", [
    (["train", "c", "r"], "torch", "lsdc train: needs torch, which is not installed here; install the train role"),
    (["prep", "{data}", "c"], "cv2", "lsdc prep: needs cv2, which is not installed here; install the prep role"),
    (["bench", "load", "{data}"], "torch", "lsdc bench load: needs torch"),
])
def test_a_command_on_a_box_without_its_role_says_what_to_install(tmp_path, argv, hidden, says):
    # the two-box workflow's likeliest mistake (`lsdc train` on the prep box): one line naming the role, exit 2
    argv = [a.format(data=tmp_path) for a in argv]
    code = (f"import sys; sys.modules[{hidden!r}] = None; sys.argv = ['lsdc', *{argv!r}]; "
            "from lsdc.cli import main; main()")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 2 and says in res.stderr and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert len(res.stderr.strip().splitlines()) == 1
