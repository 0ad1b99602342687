"""Training runs on tiny caches (CPU, timm test_efficientnet, 32 px): learning, run directory, monitor, resume, DDP."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

import cache
from cache.rsna import PROB_COLUMNS
from tiny_cache import make_tiny_cache
from train import loop
from train.config import TrainConfig
from train.infer import predict_cache
from train.predict import checkpoint_config, condition_priors

TIMING = ("samples_per_s",)
OOF_COLUMNS = ["row", "study_id", "series_id", "condition", "level", "label", "fold", *PROB_COLUMNS]


def tiny_cfg(**kw) -> TrainConfig:
    base = dict(backbone="test_efficientnet", pretrained=False, epochs=2, folds=3, fold=0, batch_size=8, workers=0,
                lr_backbone=1e-3, lr_head=1e-3, warmup_epochs=0.5, freeze_epochs=0, swa_start=None,
                channels_last=False, in_memory=False)
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_cache(tmp_path_factory.mktemp("cache") / "c", n_studies=12, unlabelled=2)


def epochs_of(run: Path) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["type"] == "epoch"]


def test_two_epochs_loss_falls_and_run_directory(tiny, tmp_path):
    run = tmp_path / "run"
    cfg = tiny_cfg(workers=2, freeze_epochs=1, swa_start=1)  # loader workers, a frozen epoch and SWA
    result = loop.fit(tiny, run, cfg)
    ep = epochs_of(run)
    assert [e["epoch"] for e in ep] == [0, 1]
    assert ep[1]["train_loss"] < ep[0]["train_loss"]
    assert ep[0]["frozen"] and not ep[1]["frozen"] and ep[1]["eval_with"] == "ema"
    for e in ep:
        assert set(e["score_parts"]) == {"spinal", "foraminal", "subarticular", "any_severe_spinal"}
        assert np.isfinite(e["score"]) and np.isfinite(e["ba"]) and sum(e["pred_counts"]) == result[0]["n_val"]
        assert np.array(e["confusion"]).sum() == result[0]["n_val"]
    saved = json.loads((run / "config.json").read_text())
    assert saved["slices"] == 3 and saved["image_size"] == 32 and saved["cache_config_hash"]
    assert saved["cache_config_hash"] == cache.open(tiny).manifest["config_hash"]
    folds = pd.read_parquet(run / "folds.parquet")
    assert list(folds.columns) == ["study_id", "fold"] and len(folds) == 12
    for name in ("last.pt", "best.pt"):
        ckpt = torch.load(run / "fold0" / name, weights_only=True)
        assert {"model", "optimizer", "scheduler", "scaler", "ema", "rng", "epoch", "config"} <= set(ckpt)
    assert torch.load(run / "fold0" / "last.pt", weights_only=True)["epoch"] == 1
    # the fold's training label mix per condition, which predict's fill-in values come from
    index = cache.open(tiny).index
    train_rows = index["study_id"].isin(folds.loc[folds["fold"] != 0, "study_id"]) & index["label"].notna()
    stored = torch.load(run / "fold0" / "best.pt", weights_only=True)["class_prior"]
    assert set(stored) == set(index["condition"])
    for condition, mix in stored.items():
        labels = index.loc[train_rows & (index["condition"] == condition), "label"].astype(int)
        assert mix == pytest.approx(((np.bincount(labels, minlength=3) + 1) / (len(labels) + 3)).tolist())
    assert torch.load(run / "fold0" / "best.pt", weights_only=True)["crop_settings"] == {"size": 32, "slices": 3}
    priors, source = condition_priors([run / "fold0" / "best.pt"], [checkpoint_config(run / "fold0" / "best.pt")])
    assert all(source[c].endswith("best.pt: class_prior") for c in stored)
    oof = pd.read_parquet(run / "oof.parquet")
    assert list(oof.columns) == OOF_COLUMNS
    val_studies = folds.loc[folds["fold"] == 0, "study_id"]
    assert set(oof["row"]) == set(index.loc[index["study_id"].isin(val_studies) & index["label"].notna(), "row"])
    assert (oof["fold"] == 0).all() and oof["label"].notna().all()
    np.testing.assert_allclose(oof[list(PROB_COLUMNS)].sum(axis=1), 1.0, atol=1e-9)
    assert (oof[list(PROB_COLUMNS)].to_numpy() > 0).all()
    for png in ("loss", "recall", "ba", "score", "confusion"):
        assert (run / "plots" / f"{png}.png").read_bytes()[:4] == b"\x89PNG"
    report = (run / "report.md").read_text()
    assert f"| {len(oof)} | {result[0]['oof_ba']:.3f} |" in report

    # predict_cache over the whole cache: unlabelled samples too, the same probabilities as the OOF for fold 0
    pred = predict_cache(run / "fold0" / "best.pt", cache.open(tiny))
    assert len(pred) == len(index) and pred["label"].isna().sum() == 2
    np.testing.assert_allclose(pred[list(PROB_COLUMNS)].sum(axis=1), 1.0, atol=1e-9)
    same = pred.set_index("row").loc[oof["row"], list(PROB_COLUMNS)].to_numpy()
    np.testing.assert_allclose(same, oof[list(PROB_COLUMNS)].to_numpy(), atol=1e-6)
    tta = predict_cache(run / "fold0" / "best.pt", cache.open(tiny), tta=True)
    assert not np.allclose(tta[list(PROB_COLUMNS)].to_numpy(), pred[list(PROB_COLUMNS)].to_numpy())

    with pytest.raises(FileExistsError, match="--resume"):
        loop.fit(tiny, run, cfg)


def test_dead_class_monitor_fires_and_stops(tiny, tmp_path, monkeypatch, caplog):
    # a head that can never output Moderate, and nothing learns (lr 0): Moderate is dead every epoch
    def never_moderate(self, prior):
        with torch.no_grad():
            self.net[-1].weight.zero_()
            self.net[-1].bias.copy_(torch.tensor([5.0, -50.0, 0.0]))

    monkeypatch.setattr("train.model.Head.init_bias", never_moderate)
    run = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="lsdc.train"):
        loop.fit(tiny, run, tiny_cfg(epochs=4, lr_backbone=0.0, lr_head=0.0, dead_stop_after=2, patience=None,
                                     in_memory="auto"))
    records = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    dead = [r for r in records if r["type"] == "dead_class"]
    assert [d["epoch"] for d in dead] == [0, 1] and all("Moderate" in d["classes"] for d in dead)
    assert all(d["pred_counts"][1] == 0 for d in dead)
    assert [r["reason"] for r in records if r["type"] == "stop"] == ["a dead class for 2 consecutive epochs"]
    assert len(epochs_of(run)) == 2  # stopped after K = 2 dead epochs, not 4
    warnings = [r.getMessage() for r in caplog.records if "dead class" in r.getMessage()]
    assert len(warnings) == 2 and all("'Moderate'" in w for w in warnings)
    assert "dead_class" in (run / "report.md").read_text()


def test_a_kill_before_the_first_last_pt_logs_each_epoch_once(tiny, tmp_path, monkeypatch):
    real = loop.save_checkpoint

    def killed_saving_last(path, *args, **kwargs):
        if path.name == "last.pt":
            raise KeyboardInterrupt  # epoch 0 is logged and best.pt written, last.pt never
        return real(path, *args, **kwargs)

    monkeypatch.setattr(loop, "save_checkpoint", killed_saving_last)
    with pytest.raises(KeyboardInterrupt):
        loop.fit(tiny, tmp_path / "run", tiny_cfg())
    assert [e["epoch"] for e in epochs_of(tmp_path / "run")] == [0]
    monkeypatch.setattr(loop, "save_checkpoint", real)
    loop.fit(None, tmp_path / "run", resume=True)  # no last.pt: the fold starts again at epoch 0
    assert [e["epoch"] for e in epochs_of(tmp_path / "run")] == [0, 1]


def test_resume_equals_uninterrupted_run(tiny, tmp_path, monkeypatch):
    cfg = tiny_cfg(epochs=3, deterministic=True, freeze_epochs=1, swa_start=1)
    loop.fit(tiny, tmp_path / "full", cfg)

    real = loop.train_one_epoch
    calls = {"n": 0}

    def killed_in_epoch_1(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # a kill in the middle of epoch 1: last.pt holds epoch 0
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "train_one_epoch", killed_in_epoch_1)
    with pytest.raises(KeyboardInterrupt):
        loop.fit(tiny, tmp_path / "cut", cfg)
    monkeypatch.setattr(loop, "train_one_epoch", real)
    assert torch.load(tmp_path / "cut" / "fold0" / "last.pt", weights_only=True)["epoch"] == 0
    loop.fit(None, tmp_path / "cut", resume=True)

    full, cut = (torch.load(tmp_path / r / "fold0" / "last.pt", weights_only=True) for r in ("full", "cut"))
    assert full["model"].keys() == cut["model"].keys()
    assert all(torch.equal(full["model"][k], cut["model"][k]) for k in full["model"])
    assert all(torch.equal(full["ema"]["module"][k], cut["ema"]["module"][k]) for k in full["ema"]["module"])
    strip = [{k: v for k, v in e.items() if k not in TIMING} for e in epochs_of(tmp_path / "full")]
    assert strip == [{k: v for k, v in e.items() if k not in TIMING} for e in epochs_of(tmp_path / "cut")]
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "full" / "oof.parquet"),
                                  pd.read_parquet(tmp_path / "cut" / "oof.parquet"))


def _ddp_worker(rank: int, world: int, port: int, cache_path: str, out: str, result_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), LSDC_NO_PROGRESS="1", HF_HUB_OFFLINE="1")
    torch.set_num_threads(1)
    result = loop.fit(cache_path, out, tiny_cfg(freeze_epochs=1))  # a frozen epoch: unused parameters under DDP
    Path(result_dir, f"rank{rank}.json").write_text(json.dumps(result[0], default=str))
    torch.distributed.destroy_process_group()


def test_ddp_two_processes_gloo(tiny, tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = tmp_path / "run"
    mp.spawn(_ddp_worker, args=(2, port, str(tiny), str(run), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["weights_sha256"] == r1["weights_sha256"]  # gradients were averaged: both ranks hold one model
    ep = epochs_of(run)
    n_train = 12 * 5 - 2 - r0["n_val"]  # labelled samples outside fold 0
    assert [e["world_size"] for e in ep] == [2, 2]
    assert all(e["train_samples"] == n_train + n_train % 2 for e in ep)  # each rank its half (padded to even)
    oof = pd.read_parquet(run / "oof.parquet")
    assert len(oof) == r0["n_val"] and list(oof.columns) == OOF_COLUMNS
    assert "n_val" not in r1  # only rank 0 validates and writes


def test_cli_train_config_file_set_and_resume(tiny, tmp_path):
    from lsdc.cli import app

    (tmp_path / "c.toml").write_text('epochs = 5\nbackbone = "test_efficientnet"\npretrained = false\n')
    run = tmp_path / "run"
    args = ["train", str(tiny), str(run), "--config", str(tmp_path / "c.toml"), "--epochs", "1", "--fold", "1",
            "--set", "folds=3", "--set", "workers=0", "--set", "swa_start=null", "--set", "freeze_epochs=0",
            "--set", "ema_decay=0.9", "--device", "cpu"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    saved = json.loads((run / "config.json").read_text())
    assert (saved["epochs"], saved["fold"], saved["folds"], saved["swa_start"], saved["device"]) == (1, 1, 3, None,
                                                                                                   "cpu")
    assert "fold 1 epoch  0/1" in res.output
    assert (run / "fold1" / "oof.parquet").exists()
    ckpt = torch.load(run / "fold1" / "best.pt", weights_only=True)
    n_train = 12 * 5 - 2 - len(pd.read_parquet(run / "oof.parquet"))
    assert ckpt["eval_with"] == "ema" and ckpt["ema"]["n_averaged"] == -(-n_train // 12)  # EMA: once per step
    res = CliRunner().invoke(app, ["train", "--resume", str(run)])  # a finished run: nothing left to do
    assert res.exit_code == 0, res.output
    assert len(epochs_of(run)) == 1
    bad = CliRunner().invoke(app, ["train", str(tiny), str(tmp_path / "x"), "--set", "nonsense=1"])
    assert bad.exit_code != 0 and "unknown key" in bad.output


def test_a_run_that_died_before_its_first_checkpoint_can_be_started_again(tiny, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")  # e.g. `lsdc train` offline without --weights: config written, then failed
    loop.fit(tiny, run, tiny_cfg(epochs=1))
    assert (run / "fold0" / "last.pt").exists()
    with pytest.raises(FileExistsError, match="--resume"):  # now it holds a checkpoint: refused as before
        loop.fit(tiny, run, tiny_cfg(epochs=1))


def test_a_study_with_nothing_of_the_trained_condition_is_left_out(tmp_path):
    # as in the competition's data: a default cache holds every condition, and a few studies have no labelled sample
    # of the one trained (here study 1000's spinal samples are unlabelled); they sit out the folds, not the run
    both = make_tiny_cache(tmp_path / "c", n_studies=8, unlabelled=5,
                           conditions=("Spinal Canal Stenosis", "Left Neural Foraminal Narrowing"))
    run = tmp_path / "run"
    loop.fit(both, run, tiny_cfg(epochs=1, conditions=("Spinal Canal Stenosis",)))
    folds = pd.read_parquet(run / "folds.parquet")
    assert sorted(folds["study_id"]) == list(range(1001, 1008))
    oof = pd.read_parquet(run / "fold0" / "oof.parquet")
    assert len(oof) and 1000 not in set(oof["study_id"]) and set(oof["condition"]) == {"Spinal Canal Stenosis"}


def test_cli_reports_user_errors_in_one_line(tiny, tmp_path):
    from typer.testing import CliRunner

    from lsdc.cli import app

    runner = CliRunner()
    missing = runner.invoke(app, ["train", str(tmp_path / "nope"), str(tmp_path / "run")])
    assert missing.exit_code == 2 and "lsdc train: no cache at" in missing.output
    assert "Traceback" not in missing.output
    resume = runner.invoke(app, ["train", "--resume", str(tmp_path / "run"), "--epochs", "3"])
    assert resume.exit_code == 2 and "--epochs" in resume.output
    (tmp_path / "bad.toml").write_text("epochs = 0\n")
    bad = runner.invoke(app, ["train", str(tiny), str(tmp_path / "run"), "--config", str(tmp_path / "bad.toml")])
    assert bad.exit_code == 2 and "epochs must be at least 1, got 0" in bad.output and "Traceback" not in bad.output
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_slice_shift_trains_on_moved_windows_and_predicts_on_the_centre(tmp_path, monkeypatch):
    # a cache of 5 slices, a model of 3 moved by up to +-1: training draws windows starting at 0, 1 or 2;
    # validation, the OOF and predict read the centre 3 (start 1)
    import train.augment as augment

    five = make_tiny_cache(tmp_path / "c5", n_studies=9, slices=5)
    starts = []
    real = augment.slice_window

    def spy(x, slices, offset=None):
        starts.extend(((x.shape[1] - slices) // 2 + (offset if offset is not None else torch.zeros(len(x),
                                                                                                  dtype=torch.long))
                       ).tolist())
        return real(x, slices, offset)

    monkeypatch.setattr(augment, "slice_window", spy)
    result = loop.fit(five, tmp_path / "run", tiny_cfg(epochs=1, aug_slice_shift=1, aug_jitter_mm=2.0))
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["slices"] == 3 and saved["aug_slice_shift"] == 1
    assert set(starts) == {0, 1, 2}
    starts.clear()
    pred = predict_cache(tmp_path / "run" / "fold0" / "best.pt", cache.open(five))
    assert set(starts) == {1} and len(pred) == len(cache.open(five).index) and result[0]["n_val"] > 0
    with pytest.raises(ValueError, match="needs 7"):  # a 3-slice model moved by +-2 cannot come from 5 slices
        loop.fit(five, tmp_path / "run2", tiny_cfg(epochs=1, aug_slice_shift=2, slices=3))
