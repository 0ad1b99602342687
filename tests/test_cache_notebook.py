"""docs/inspect_cache.ipynb runs top to bottom in a real Jupyter kernel and draws the crops."""

from __future__ import annotations

import base64
import json
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "docs" / "inspect_cache.ipynb"


@pytest.fixture
def venv_kernel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A 'python3' kernelspec that runs this interpreter, found first via JUPYTER_PATH (no install needed)."""
    spec = tmp_path / "jupyter" / "kernels" / "python3"
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": "lsdc", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    return "python3"


def test_notebook_executes_and_shows_crops(venv_kernel: str, tmp_path: Path) -> None:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, kernel_name=venv_kernel, timeout=300, resources={"metadata": {"path": str(tmp_path)}}).execute()
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    outputs = [o for cell in code for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    pngs = [o["data"]["image/png"] for o in outputs if "image/png" in o.get("data", {})]
    assert pngs and min(len(base64.b64decode(p)) for p in pngs) > 10_000  # a real grid, not an empty canvas
    html = "\n".join(o.get("data", {}).get("text/html", "") for o in outputs)
    assert "CacheReader" in html and "Spinal Canal Stenosis" in html  # the summary rendered as HTML
    assert code[-1].outputs[-1]["data"]["text/plain"] == "((7, 3, 96, 96), dtype('uint8'), True)"  # zarr+pyarrow
