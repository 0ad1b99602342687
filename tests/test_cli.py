"""The `lsdc` command: every subcommand is listed, and --help imports none of the heavy stacks."""

from __future__ import annotations

import json
import subprocess
import sys

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
