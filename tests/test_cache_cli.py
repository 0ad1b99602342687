"""`lsdc cache info | verify | show` through typer's CliRunner."""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib.image
import pytest
from typer.testing import CliRunner

import cache_helpers as h
from cache import config_hash
from lsdc.cli import app

runner = CliRunner()


@pytest.fixture
def built(tmp_path: Path) -> Path:
    path = tmp_path / "cache"
    h.build(path, n=8)
    return path


def sections(text: str) -> dict[str, dict[str, int]]:
    """'by label:' followed by indented '  name  count' lines -> {'by label': {name: count}}."""
    out: dict[str, dict[str, int]] = {}
    for line in text.splitlines():
        if line.endswith(":") and not line.startswith(" "):
            current = out.setdefault(line[:-1], {})
        elif line.startswith("  ") and line.split()[-1].isdigit() and out:
            name, count = line.strip().rsplit(None, 1)
            current[name] = int(count)
    return out


def test_info(built: Path) -> None:
    res = runner.invoke(app, ["cache", "info", str(built)])
    assert res.exit_code == 0, res.output
    out = res.output
    assert "samples 8 of shape (5, 3, 32, 32)" in out and "errors 1" in out
    table = sections(out)
    assert table["by condition"]["Spinal Canal Stenosis"] == 2 and sum(table["by condition"].values()) == 8
    assert table["by label"] == {"Moderate": 2, "Normal/Mild": 2, "Severe": 2, "missing": 2}
    assert table["by series description"] == {"Axial T2": 2, "Sagittal T1": 4, "Sagittal T2/STIR": 2}
    assert table["errors by stage"] == {"decode": 1}
    assert "compression ratio" in out and "MB on disk" not in out and "size on disk" in out
    assert config_hash(h.CONFIG) in out and '"windows"' in out


def test_verify_ok_then_lists_bad_rows(built: Path) -> None:
    res = runner.invoke(app, ["cache", "verify", str(built)])
    assert res.exit_code == 0 and "all 8 samples" in res.output
    (built / "crops" / "c.4.0.0.0.0").unlink()
    (built / "crops" / "c.6.0.0.0.0").write_bytes(b"garbage")
    res = runner.invoke(app, ["cache", "verify", str(built)])
    assert res.exit_code == 1
    lines = [line.split() for line in res.output.splitlines()]
    assert ["4", "1001"] == lines[-2][:2] and "missing" in lines[-2]
    assert ["6", "1001"] == lines[-1][:2] and "corrupt" in lines[-1]


def test_verify_refuses_unfinalised(tmp_path: Path) -> None:
    h.build(tmp_path / "c", n=2, finalise=False)
    res = runner.invoke(app, ["cache", "verify", str(tmp_path / "c")])
    assert res.exit_code == 2 and "not finalised" in res.output


def test_show_writes_png(built: Path, tmp_path: Path) -> None:
    out = tmp_path / "grid.png"
    args = ["cache", "show", str(built), "--study", "1000", "--condition", "Right Neural Foraminal Narrowing",
            "--level", "L3/L4", "--out", str(out)]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    img = matplotlib.image.imread(out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and img.shape[0] > 200 and img.shape[1] > 400
    assert img[..., :3].std() > 0.1  # a drawn grid, not a blank canvas
    res = runner.invoke(app, args[:-2] + ["--row", "3"])
    assert res.exit_code == 2 and "1 samples match" in res.output


def test_show_accepts_snake_case_and_names_what_is_wrong(built: Path, tmp_path: Path) -> None:
    out = tmp_path / "grid.png"
    res = runner.invoke(app, ["cache", "show", str(built), "--study", "1000", "--condition",
                              "right_neural_foraminal_narrowing", "--level", "l3_l4", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    res = runner.invoke(app, ["cache", "show", str(built), "--study", "4242", "--condition", "spinal_canal_stenosis",
                              "--level", "L4/L5"])
    assert res.exit_code == 2 and "study 4242 is not in this cache" in res.output
    res = runner.invoke(app, ["cache", "show", str(built), "--study", "1000", "--condition", "foraminal",
                              "--level", "L4/L5"])
    assert res.exit_code == 2 and "'foraminal' means 2 conditions" in res.output
    res = runner.invoke(app, ["cache", "show", str(built), "--study", "1000", "--condition", "spinal",
                              "--level", "L1/L2", "--out", str(out)])  # a group of one, as in every other command
    assert res.exit_code == 0, res.output


def test_show_without_matplotlib_says_what_to_install(built: Path, tmp_path: Path, monkeypatch) -> None:
    # A prep-only box has no matplotlib: the command must say what to install, not dump a traceback.
    for name in [m for m in list(sys.modules) if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib...` now raises
    out = tmp_path / "grid.png"
    res = runner.invoke(app, ["cache", "show", str(built), "--study", "1000", "--condition",
                              "Right Neural Foraminal Narrowing", "--level", "L3/L4", "--out", str(out)])
    assert res.exit_code == 2 and "needs matplotlib" in res.output and "[notebook]" in res.output
    assert not out.exists()
