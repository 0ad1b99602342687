"""The one training machinery serves any model: a toy task (its own data, model, loss, metric and selection rule)
trains through train.loop.fit with checkpoints, metrics.jsonl, folds by study and an exact resume, with no code of
the grader's. The localiser (train/locate.py) is the real second task."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import train.loop as loop
from train.checkpoint import load_checkpoint
from train.config import LoopConfig
from train.data import make_loader
from train.tasks import FoldData, Task


@dataclass
class ToyConfig(LoopConfig):
    # --- toy ---
    noise: float = 0.1  # label noise of the toy regression
    kind: ClassVar[str] = "toy"


class ToyModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder, self.head = nn.Linear(4, 8), nn.Linear(8, 1)
        self.backbone_frozen = False

    def forward(self, x):
        return self.head(torch.relu(self.encoder(x))).squeeze(1)

    def backbone_parameters(self):
        return list(self.encoder.parameters())

    def head_parameters(self):
        return list(self.head.parameters())

    def freeze_backbone(self, frozen: bool) -> None:
        self.backbone_frozen = frozen
        self.encoder.requires_grad_(not frozen)


class ToyDataset(torch.utils.data.Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "y": self.y[i]}


class ToyTask(Task):
    """Regress y = x . w from 4 numbers; the selection rule is the lowest validation error."""

    config_class = ToyConfig
    selection = "validation error"

    def trained_positions(self):
        return np.arange(len(self.reader.index))

    def fold_data(self, train_pos, val_pos, rank, world_size, device):
        x, y = self.reader.x, self.reader.y
        loaders = [make_loader(ToyDataset(x[p], y[p]), self.cfg.batch_size, 0, shuffle, self.cfg.seed, rank,
                               world_size) for p, shuffle in ((train_pos, True), (val_pos, False))]
        return FoldData(*loaders, np.asarray(val_pos))

    @classmethod
    def model_from_config(cls, config):
        return ToyModel()

    def build_model(self, data):
        return ToyModel()

    def loss(self, model, batch, generator, device):
        noise = torch.randn(len(batch["y"]), generator=generator, device=device) * self.cfg.noise
        return nn.functional.mse_loss(model(batch["x"].to(device)), batch["y"].to(device) + noise), len(batch["y"])

    def validate(self, model, data, device, autocast):
        with torch.no_grad():
            err = [float(((model(b["x"]) - b["y"]) ** 2).mean()) for b in data.val_loader]
        return {"val_error": float(np.mean(err))}

    def selection_key(self, record):
        return [-record["val_error"]]

    def summary_line(self, record):
        return f"toy epoch {record['epoch']} val {record['val_error']:.4f}"

    def fold_outputs(self, fold, fold_dir, data, device, autocast):
        ckpt = load_checkpoint(fold_dir / "best.pt")
        pd.DataFrame({"row": data.val_positions}).to_parquet(fold_dir / "oof.parquet")
        return {"best_epoch": int(ckpt["epoch"])}


def toy_reader(n_studies: int = 12, per_study: int = 8):
    rng = np.random.default_rng(0)
    x = torch.tensor(rng.normal(size=(n_studies * per_study, 4)), dtype=torch.float32)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 3.0])
    index = pd.DataFrame({"study_id": np.repeat(np.arange(1000, 1000 + n_studies), per_study),
                          "label": pd.array([pd.NA] * len(x), dtype="Int8")})
    return type("ToyReader", (), {"index": index, "x": x, "y": y, "manifest": {"config_hash": "toy"}})()


@pytest.fixture
def toy(monkeypatch):
    reader = toy_reader()
    real = loop.task_class
    monkeypatch.setattr(loop, "task_class", lambda kind: ToyTask if kind == "toy" else real(kind))
    monkeypatch.setattr(loop, "open_reader", lambda path, kind: reader)
    return reader


def cfg(**kw) -> ToyConfig:
    base = dict(epochs=4, batch_size=8, lr_backbone=1e-1, lr_head=1e-1, warmup_epochs=0, freeze_epochs=1,
                swa_start=None, workers=0, device="cpu", channels_last=False, deterministic=True, patience=None)
    return ToyConfig(**{**base, **kw})


def test_a_second_model_trains_through_the_same_loop(toy, tmp_path):
    result = loop.fit(tmp_path / "toy_cache", tmp_path / "run", cfg())
    records = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if r["type"] == "epoch"]
    assert [e["epoch"] for e in epochs] == [0, 1, 2, 3]
    assert epochs[0]["frozen"] and not epochs[1]["frozen"]  # the loop's frozen-backbone epochs apply to it too
    assert epochs[-1]["val_error"] < 0.5 * epochs[0]["val_error"]  # it really learns
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["kind"] == "toy" and saved["noise"] == 0.1
    ckpt = load_checkpoint(tmp_path / "run" / "fold0" / "best.pt")
    assert ckpt["kind"] == "toy" and ckpt["epoch"] == result[0]["best_epoch"]
    best = min(epochs, key=lambda e: e["val_error"])
    assert best["best"] and best["epoch"] == result[0]["best_epoch"]
    folds = pd.read_parquet(tmp_path / "run" / "folds.parquet")
    assert sorted(folds["study_id"]) == list(range(1000, 1012))  # folds by study, as for the grader


def test_the_toy_run_resumes_exactly(toy, tmp_path, monkeypatch):
    full = loop.fit(tmp_path / "toy_cache", tmp_path / "full", cfg())
    real = loop.train_one_epoch

    def killed_in_epoch_2(task, model, training, loader, *args, desc, **kwargs):
        if desc.endswith("epoch 2"):
            raise KeyboardInterrupt
        return real(task, model, training, loader, *args, desc=desc, **kwargs)

    monkeypatch.setattr(loop, "train_one_epoch", killed_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        loop.fit(tmp_path / "toy_cache", tmp_path / "cut", cfg())
    monkeypatch.setattr(loop, "train_one_epoch", real)
    resumed = loop.fit(None, tmp_path / "cut", resume=True)
    assert resumed[0]["weights_sha256"] == full[0]["weights_sha256"]
    assert [r for r in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines() if '"epoch"' in r].__len__() \
        == 4


def test_the_training_loop_imports_neither_evaluate_nor_predict():
    # scikit-learn (folds, the metric's log loss) brings scipy itself; the loop must not pull in `lsdc evaluate`'s
    # temperature fitting or predict's submission code on top
    code = ("import sys, train.loop, train.grade; "
            "print(sorted(m for m in ('train.evaluate', 'train.predict') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_resolve_merges_file_options_and_overrides_in_that_order(tmp_path):
    from train.config import TrainConfig

    (tmp_path / "c.toml").write_text("[train]\nepochs = 9\nbatch_size = 4\nlr_head = 1e-3\n")
    c = TrainConfig.resolve(tmp_path / "c.toml", {"epochs": 5, "backbone": None, "fold": "all"}, ["lr_head=2e-3"])
    assert (c.epochs, c.batch_size, c.lr_head, c.fold, c.backbone) == (5, 4, 2e-3, None, "tf_efficientnetv2_s")
    assert TrainConfig.resolve(options={"fold": "2"}).fold == 2


@pytest.mark.parametrize("setting, says", [
    ("lr_head=-1", "lr_head must be at least 0"), ("lr_backbone=-1e-5", "lr_backbone must be at least 0"),
    ("grad_clip=-1", "grad_clip must be at least 0"), ("lr_head=NaN", "lr_head must be a finite number"),
    ("class_weights=[1,2,1e400]", "class_weights must be a finite number"), ("head_dropout=1.5", "head_dropout"),
    ("aug_p_noise=-0.1", "aug_p_noise"), ("weight_decay=-0.1", "weight_decay"), ("swa_lr=inf", "swa_lr")])
def test_settings_that_cannot_be_right_are_refused_naming_the_setting(setting, says):
    from cache.errors import SettingError
    from train.config import TrainConfig

    with pytest.raises(SettingError, match=says):
        TrainConfig().with_overrides([setting])


def test_cli_defaults_and_help_come_from_the_dataclasses():
    import typer.main

    from cache.settings import defaults
    from lsdc.cli import app
    from prep.config import PrepConfig

    group = typer.main.get_command(app)
    prep = {p.name: p for p in group.commands["prep"].params}
    want = defaults(PrepConfig)
    for name in ("slices", "size", "crop_scale", "crop_base_mm", "clahe_clip", "clahe_tiles", "percentile_stride",
                 "codec", "split"):
        assert prep[name].default == want[name], name
    assert "crop_mm" not in prep  # one name per setting: PrepConfig's, in prep, the demo and the docs
    train = {p.name: p for p in group.commands["train"].params}
    assert "(default 25)" in train["epochs"].help and train["epochs"].default is None
    from typer.testing import CliRunner

    shown = " ".join(CliRunner().invoke(app, ["prep", "--help"], terminal_width=200).output.split())
    assert "--crop-base-mm" in shown and "[default: 170.0]" in shown and "--crop-mm " not in shown
    from lsdc.demo import DemoConfig

    assert {"crop_scale", "crop_base_mm"} <= set(defaults(DemoConfig)) and "crop_mm" not in defaults(DemoConfig)
