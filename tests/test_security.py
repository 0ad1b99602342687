"""Security (issue 7, item 7): an id is a plain integer or the row is rejected, no path leaves the data directory,
and nothing is unpickled from disk (only `torch.load(..., weights_only=True)`).

Dask pickles tasks and results between its own processes in memory; that is not loading a file and is out of scope.
"""

from __future__ import annotations

import ast
import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest

import cache
from cache.rsna import LABEL_COLUMNS, label_column
from prep.build import build
from prep.config import PrepConfig
from prep.samples import read_samples
from prep_fixtures import write_dataset

REPO = Path(__file__).resolve().parents[1]
SCS = "Spinal Canal Stenosis"
CFG = PrepConfig(size=32, crop_scale=1.0, crop_base_mm=20.0)

BAD_IDS = {
    "dotdot": "../x", "slash": "1/2", "absolute": "/etc/passwd", "dot": ".", "exponent": "1e3", "float": "12.0",
    "hex": "0x1f", "leading_space": " 12", "trailing_space": "12 ", "newline": "12\n", "negative": "-5", "plus": "+5",
    "huge": "9" * 25, "int64_overflow": str(2**63), "empty": "", "unicode_digits": "\u0661\u0662",
    "fullwidth_digits": "\uff11\uff12",
}
# (table, column): every id column of every CSV prep reads
ID_CELLS = [("train.csv", "study_id"), ("train_series_descriptions.csv", "study_id"),
            ("train_series_descriptions.csv", "series_id"), ("train_label_coordinates.csv", "study_id"),
            ("train_label_coordinates.csv", "series_id"), ("train_label_coordinates.csv", "instance_number")]


def _tables(d: Path) -> Path:
    """Two studies, one canal label and one coordinate each (no images: read_samples never opens one)."""
    labels = [{"study_id": s, **{c: "" for c in LABEL_COLUMNS}, label_column(SCS, "L4/L5"): "Moderate"}
              for s in (10, 20)]
    pd.DataFrame(labels).to_csv(d / "train.csv", index=False)
    pd.DataFrame({"study_id": [10, 20], "series_id": [100, 200], "series_description": "Sagittal T2/STIR"}).to_csv(
        d / "train_series_descriptions.csv", index=False)
    pd.DataFrame({"study_id": [10, 20], "series_id": [100, 200], "instance_number": [7, 8], "condition": SCS,
                  "level": "L4/L5", "x": [30.0, 31.0], "y": [40.0, 41.0]}).to_csv(
        d / "train_label_coordinates.csv", index=False)
    return d


def _set_cell(path: Path, row: int, column: str, value: str) -> None:
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    df.loc[row, column] = value
    df.to_csv(path, index=False)  # quoted where needed ('12\n'), otherwise written as is (' 12')


@pytest.mark.parametrize("value", list(BAD_IDS.values()), ids=list(BAD_IDS))
@pytest.mark.parametrize("table, column", ID_CELLS, ids=[f"{t.split('.')[0]}.{c}" for t, c in ID_CELLS])
def test_an_id_that_is_not_a_plain_integer_is_rejected(tmp_path, table, column, value):
    d = _tables(tmp_path)
    _set_cell(d / table, 1, column, value)  # study 20's row, line 3
    assert pd.read_csv(d / table, dtype=str, keep_default_na=False).loc[1, column] == value  # the cell is as meant
    samples, errors = read_samples(d, PrepConfig())
    # the row is an error naming the file, the line, the column and the value as written
    hit = errors[errors.path == f"{table}:3"]
    assert len(hit) == 1 and hit.stage.item() == "tables", errors.values.tolist()
    assert hit.reason.item() == f"{column} {value!r} not a non-negative integer id"
    assert hit[column].isna().all()  # never coerced into the errors table either
    # only study 10's untouched sample remains; whatever pointed at study 20 is a named error, never a guess
    assert samples[["study_id", "series_id", "instance_number"]].values.tolist() == [[10, 100, 7]]
    assert all(r.startswith(("study 20 ", "series 200 ", "label ")) or p == f"{table}:3"
               for p, r in zip(errors.path, errors.reason))


def test_the_users_coordinates_for_the_test_split_are_checked_too(tmp_path):
    (tmp_path / "test_series_descriptions.csv").write_text(
        "study_id,series_id,series_description\n7,70,Axial T2\n7,../70,Axial T2\n")
    coords = tmp_path / "mine.csv"
    coords.write_text("study_id,series_id,instance_number,condition,level,x,y\n"
                      "7,70,4,Left Subarticular Stenosis,L4/L5,10,11\n"
                      "7,70/../70,4,Left Subarticular Stenosis,L3/L4,10,11\n"
                      "7,70,../4,Left Subarticular Stenosis,L2/L3,10,11\n")
    samples, errors = read_samples(tmp_path, PrepConfig(split="test", coords=str(coords)))
    assert samples[["study_id", "series_id", "level"]].values.tolist() == [[7, 70, "L4/L5"]]
    assert errors.reason.tolist() == ["series_id '../70' not a non-negative integer id",
                                      "series_id '70/../70' not a non-negative integer id",
                                      "instance_number '../4' not a non-negative integer id"]
    assert errors.path.tolist() == ["test_series_descriptions.csv:3", "mine.csv:3", "mine.csv:4"]


def test_no_file_outside_the_data_directory_is_ever_opened(tmp_path, monkeypatch):
    """Path-like ids aimed at a valid series planted next to the data: the build opens nothing outside DATA."""
    data = write_dataset(tmp_path / "data", studies=2)
    clean = build(data, tmp_path / "clean", CFG, scheduler="synchronous")
    series = next((data / "train_images" / "1000").iterdir())
    shutil.copytree(series, tmp_path / "outside" / series.name)  # the decoy: readable, valid, outside DATA
    instance = next(series.iterdir()).stem
    escape = f"../../../outside/{series.name}"  # DATA/train_images/1000/ + escape = the decoy
    with open(data / "train_series_descriptions.csv", "a") as f:
        f.write(f"1000,{escape},Sagittal T2/STIR\n../outside,{series.name},Sagittal T2/STIR\n")
    with open(data / "train_label_coordinates.csv", "a") as f:
        f.write(f"1000,{escape},{instance},{SCS},L1/L2,20,20\n"
                f"../outside,{series.name},{instance},{SCS},L1/L2,20,20\n"
                f"1000,{series.name},../../../../outside/{series.name}/{instance},{SCS},L1/L2,20,20\n")
    opened: list[Path] = []
    real_read, real_listdir = pydicom.dcmread, os.listdir

    def spy_read(path, *a, **kw):
        opened.append(Path(path).resolve())
        return real_read(path, *a, **kw)

    def spy_listdir(path="."):
        opened.append(Path(path).resolve())
        return real_listdir(path)

    monkeypatch.setattr(pydicom, "dcmread", spy_read)
    monkeypatch.setattr(os, "listdir", spy_listdir)
    result = build(data, tmp_path / "c", CFG, scheduler="synchronous")  # synchronous: the spies see every read
    monkeypatch.undo()
    # what it read lies in DATA (images) or the output (its own chunk listing), never next to them
    assert any(p.is_relative_to(data.resolve()) for p in opened)
    near = [p for p in opened if p.is_relative_to(tmp_path.resolve())]
    assert all(p.is_relative_to(data.resolve()) or p.is_relative_to((tmp_path / "c").resolve()) for p in near), near
    assert len(result.errors) == 5  # 2 series rows + 3 coordinate rows, each named
    assert result.errors.reason.str.endswith("not a non-negative integer id").all()
    c, ref = cache.open(tmp_path / "c"), cache.open(tmp_path / "clean")
    assert c.index.drop(columns="row").astype(str).values.tolist() == \
        ref.index.drop(columns="row").astype(str).values.tolist() and clean.built == result.built == len(c)
    assert all(np.array_equal(c[i], ref[i]) for i in range(len(c)))


# ---------------------------------------------------------------------------------------- nothing is unpickled
PICKLERS = ("pickle", "_pickle", "cPickle", "dill", "cloudpickle", "joblib", "marshal", "shelve", "jsonpickle")
SAFE_YAML_LOADERS = ("SafeLoader", "CSafeLoader", "BaseLoader", "CBaseLoader")


def _qualname(node: ast.AST, aliases: dict[str, str]) -> str | None:
    """'np.load' -> 'numpy.load' through the file's imports; None for calls on expressions."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return "." + ".".join(reversed(parts)) if parts else None  # a method of some object: '.read_pickle'
    return ".".join([aliases.get(node.id, node.id), *reversed(parts)])


def _kw(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_true(node: ast.expr | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def unpickling_calls(source: str) -> list[str]:
    """Every call in the source that can unpickle data (AST, so comments and strings never match)."""
    tree = ast.parse(source)
    aliases: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            aliases.update({a.asname or a.name.split(".")[0]: a.name if a.asname else a.name.split(".")[0]
                            for a in node.names})
        elif isinstance(node, ast.ImportFrom) and node.module:
            aliases.update({a.asname or a.name: f"{node.module}.{a.name}" for a in node.names})
    found = []
    for call in (n for n in ast.walk(tree) if isinstance(n, ast.Call)):
        name = _qualname(call.func, aliases)
        if name is None:
            continue
        head, last = name.split(".")[0], name.rsplit(".", 1)[-1]
        loader = _kw(call, "Loader") or (call.args[1] if len(call.args) > 1 else None)
        if head in PICKLERS and (last.startswith("load") or last in ("Unpickler", "open", "decode")) \
                or last == "read_pickle" \
                or name in ("numpy.load", "numpy.lib.npyio.load") and not _is_false_or_absent(call, "allow_pickle") \
                or name == "torch.load" and not _is_true(_kw(call, "weights_only")) \
                or name in ("yaml.unsafe_load", "yaml.full_load", "yaml.unsafe_load_all", "yaml.full_load_all") \
                or name in ("yaml.load", "yaml.load_all") and not (
                    isinstance(loader, (ast.Attribute, ast.Name))
                    and (_qualname(loader, aliases) or "").rsplit(".", 1)[-1] in SAFE_YAML_LOADERS):
            found.append(f"line {call.lineno}: {ast.unparse(call)}")
    return found


def _is_false_or_absent(call: ast.Call, name: str) -> bool:
    v = _kw(call, name)
    return v is None or isinstance(v, ast.Constant) and v.value is False


def _sources() -> dict[str, str]:
    """Every Python file of the packages, plus the code cells of the committed notebooks."""
    out = {str(p.relative_to(REPO)): p.read_text() for pkg in ("cache", "prep", "train", "lsdc")
           for p in (REPO / pkg).rglob("*.py")}
    for nb in REPO.glob("docs/*.ipynb"):
        cells = json.loads(nb.read_text())["cells"]
        code = ["".join(c["source"]) for c in cells if c["cell_type"] == "code"]
        out[str(nb.relative_to(REPO))] = "\n".join("\n".join(ln for ln in src.splitlines()
                                                              if not ln.lstrip().startswith(("%", "!")))
                                                   for src in code)
    return out


IMPORTS = """
import json, pickle, dill, joblib, yaml, torch
import numpy as np
import pandas as pd
from pickle import loads as pl
from yaml import SafeLoader
import cloudpickle as cp
"""
UNSAFE = ["pickle.load(f)", "pickle.loads(b)", "pickle.Unpickler(f).load()", "pl(b)", "dill.load(f)", "cp.loads(b)",
          "joblib.load(p)", "np.load(p, allow_pickle=True)", "np.load(p, allow_pickle=flag)", "torch.load(p)",
          "torch.load(p, weights_only=False)", "torch.load(p, map_location='cpu')", "pd.read_pickle(p)",
          "df.read_pickle(p)", "yaml.load(s)", "yaml.load(s, Loader=yaml.Loader)", "yaml.load(s, yaml.FullLoader)",
          "yaml.unsafe_load(s)", "yaml.full_load(s)"]
SAFE = ["json.loads(s)", "np.load(p)", "np.load(p, allow_pickle=False)", "torch.load(p, weights_only=True)",
        "torch.load(p, map_location='cpu', weights_only=True)", "yaml.safe_load(s)",
        "yaml.load(s, Loader=yaml.SafeLoader)", "yaml.load(s, Loader=SafeLoader)", "pd.read_parquet(p)",
        "print('pickle.load(f)')  # pickle.loads(b) in a comment"]


def test_the_scanner_finds_every_kind_of_unpickling():
    for statement in UNSAFE:
        assert len(unpickling_calls(IMPORTS + statement)) == 1, statement
    for statement in SAFE:
        assert unpickling_calls(IMPORTS + statement) == [], statement


def test_no_source_file_unpickles_anything():
    sources = _sources()
    assert len(sources) > 40 and "train/loop.py" in sources and "cache/reader.py" in sources
    found = {name: hits for name, src in sources.items() if (hits := unpickling_calls(src))}
    assert found == {}
    # the one checkpoint reader exists and was scanned: a torch.load(..., weights_only=True) in train/checkpoint.py,
    # and no other module calls torch.load at all (one way to load a checkpoint)
    loads = [(n, _is_true(_kw(c, "weights_only"))) for n, src in sources.items() for c in ast.walk(ast.parse(src))
             if isinstance(c, ast.Call) and ast.unparse(c.func) == "torch.load"]
    assert loads == [("train/checkpoint.py", True)]


class _Payload:
    """Unpickling this creates a directory: proof that the loader ran attacker-chosen code."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_a_checkpoint_carrying_code_is_refused(tmp_path):
    import torch

    from cache.errors import InputError
    from train.checkpoint import load_checkpoint, model_from_checkpoint

    marker = tmp_path / "pwned"
    evil = tmp_path / "best.pt"
    torch.save({"model": {"w": torch.zeros(1)}, "config": {}, "x": _Payload(marker)}, evil)
    pickle.loads(pickle.dumps(_Payload(marker)))  # the payload is live: plain unpickling runs it
    assert marker.is_dir()
    marker.rmdir()
    with pytest.raises(InputError, match="is not an lsdc checkpoint .*[Ww]eights only load failed"):
        load_checkpoint(evil)
    with pytest.raises(InputError):
        model_from_checkpoint(evil)
    assert not marker.exists()
