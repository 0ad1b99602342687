"""train/ pieces without a training run: config, loss, metrics, model init, weights files, augmentation, folds."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from train.augment import augment_batch
from train.config import TrainConfig
from train.folds import fold_of_samples, make_folds
from train.losses import WeightedFocalCE
from train.metrics import balanced_accuracy, classification_metrics, confusion_matrix, dead_classes, per_class_recall
from train.model import WeightAverage, build_model

SPINAL = "Spinal Canal Stenosis"
LEFT_SUB, RIGHT_SUB = "Left Subarticular Stenosis", "Right Subarticular Stenosis"


def tiny_cfg(**kw) -> TrainConfig:
    base = dict(backbone="test_efficientnet", pretrained=False, slices=5, image_size=32, channels_last=False)
    return TrainConfig(**{**base, **kw})


# ------------------------------------------------------------------------------------------------ config

def test_config_defaults_are_v8():
    c = TrainConfig()
    assert (c.backbone, c.aggregator, c.conditions, c.weights) == ("tf_efficientnetv2_s", "weighted", (SPINAL,), None)
    assert (c.level_emb, c.head_hidden, c.head_dropout, c.head_dropout2) == (256, 512, 0.35, 0.175)
    assert c.class_weights == (1.0, 2.0, 4.0) and c.focal_gamma == 0.0
    assert (c.lr_backbone, c.lr_head, c.weight_decay, c.grad_clip) == (1e-5, 1e-4, 0.03, 1.0)
    assert (c.warmup_epochs, c.epochs, c.swa_start, c.swa_lr, c.ema_decay) == (2, 25, 18, 5e-6, None)
    assert (c.patience, c.freeze_epochs, c.batch_size, c.workers) == (12, 2, 12, 2)
    assert (c.folds, c.fold, c.seed, c.best_rule, c.best_min_recall, c.dead_min_count) == (5, 0, 42, "v8", 0.2, 3)
    assert (c.aug_shift, c.aug_scale, c.aug_rotate, c.aug_center_jitter * 256, c.hflip) == (0.1, 0.12, 12, 16, False)


def test_docs_list_every_setting_as_the_dataclass_says():
    import dataclasses

    from train.config import settings_markdown
    table = settings_markdown()
    docs = (Path(__file__).resolve().parents[1] / "docs" / "training.md").read_text()
    assert f"<!-- settings:start -->\n{table}<!-- settings:end -->" in docs, \
        "docs/training.md's settings table is stale: paste train.config.settings_markdown() between its markers"
    names = re.findall(r"^\| `(\w+)` \|", table, flags=re.M)
    assert sorted(names) == sorted(f.name for f in dataclasses.fields(TrainConfig)) and len(set(names)) == len(names)
    assert "| `epochs` | `25` | training epochs |" in table


@pytest.mark.parametrize("setting", [dict(epochs=0), dict(folds=1), dict(batch_size=0), dict(workers=-1),
                                     dict(image_size=4), dict(class_weights=(1, 0, 4)), dict(patience=0)])
def test_config_refuses_counts_out_of_range(setting):
    with pytest.raises(ValueError, match=next(iter(setting))):
        TrainConfig(**setting)


def test_config_round_trip_files_and_overrides(tmp_path):
    c = TrainConfig(epochs=3, conditions=(LEFT_SUB, RIGHT_SUB), fold=None)
    assert TrainConfig.from_dict(c.to_dict()) == c
    (tmp_path / "c.json").write_text(json.dumps({"epochs": 7, "class_weights": [1, 3, 6]}))
    assert TrainConfig.from_file(tmp_path / "c.json").class_weights == (1.0, 3.0, 6.0)
    (tmp_path / "c.toml").write_text('[train]\nepochs = 9\naggregator = "bigru"\nswa_start = 5\n')
    t = TrainConfig.from_file(tmp_path / "c.toml")
    assert (t.epochs, t.aggregator, t.swa_start) == (9, "bigru", 5)
    o = t.with_overrides(["lr_head=3e-4", "swa_start=none", "ema_decay=0.99", "fold=null", "deterministic=true",
                          f"conditions={LEFT_SUB},{RIGHT_SUB}", "hflip=true"])
    assert (o.lr_head, o.swa_start, o.ema_decay, o.fold, o.deterministic) == (3e-4, None, 0.99, None, True)
    assert o.conditions == (LEFT_SUB, RIGHT_SUB) and o.hflip
    with pytest.raises(ValueError, match="unknown key 'lr'"):
        t.with_overrides(["lr=1"])
    with pytest.raises(ValueError, match="epochs: expected an integer"):
        t.with_overrides(["epochs=abc"])
    with pytest.raises(ValueError, match="must be trained too"):  # a side flip needs the other side's condition
        TrainConfig(conditions=(LEFT_SUB,), hflip=True)
    with pytest.raises(ValueError, match="not both"):
        TrainConfig(ema_decay=0.999, swa_start=18)


# ------------------------------------------------------------------------------------------------ loss and metrics

def test_weighted_ce_equals_hand_computation():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 1.5, 0.0], [0.0, 0.0, 3.0], [1.0, 2.0, 3.0]])
    target = torch.tensor([0, 1, 2, 0])
    w = [1.0, 2.0, 4.0]
    p = [math.exp(r[t]) / sum(math.exp(v) for v in r) for r, t in zip(logits.tolist(), target.tolist())]
    ws = [w[t] for t in target.tolist()]
    hand = sum(wi * -math.log(pi) for wi, pi in zip(ws, p)) / sum(ws)
    loss = WeightedFocalCE(tuple(w))(logits, target)
    assert loss.item() == pytest.approx(hand, rel=1e-6)
    assert loss.item() == pytest.approx(F.cross_entropy(logits, target, weight=torch.tensor(w)).item(), rel=1e-6)
    hand_focal = sum(wi * (1 - pi) ** 1.5 * -math.log(pi) for wi, pi in zip(ws, p)) / sum(ws)
    assert WeightedFocalCE(tuple(w), gamma=1.5)(logits, target).item() == pytest.approx(hand_focal, rel=1e-6)


def test_metrics_by_hand():
    y = np.array([0, 0, 0, 0, 1, 1, 2, 2])
    pred = np.array([0, 0, 0, 1, 1, 0, 0, 0])
    cm = confusion_matrix(y, pred)
    assert cm.tolist() == [[3, 1, 0], [1, 1, 0], [2, 0, 0]]
    assert per_class_recall(cm).tolist() == [0.75, 0.5, 0.0]
    assert balanced_accuracy(cm) == pytest.approx((0.75 + 0.5 + 0) / 3)
    assert dead_classes(pred, 3) == [1, 2]  # Moderate predicted once, Severe never
    probs = np.eye(3)[pred]
    m = classification_metrics(y, probs)
    assert m["pred_counts"] == [6, 2, 0] and m["dead_classes"] == [1, 2]
    no_severe = classification_metrics(np.array([0, 1]), np.eye(3)[[0, 1]])
    assert no_severe["recall"] == [1.0, 1.0, None] and no_severe["ba"] == 1.0  # absent classes are not averaged


# ------------------------------------------------------------------------------------------------ model

@pytest.mark.parametrize("aggregator", ["weighted", "attention", "bigru"])
def test_aggregator_starts_centre_biased_and_bias_is_log_prior(aggregator):
    torch.manual_seed(0)
    prior = torch.tensor([0.878, 0.075, 0.047])
    model = build_model(tiny_cfg(aggregator=aggregator), prior).eval()
    feats = torch.randn(4, 5, model.encoder.num_features)
    w = model.aggregator.weights(feats)
    expect = torch.softmax(torch.tensor([0.0, 0, 1, 0, 0]), 0)  # v8: centre logit 1, the others 0
    assert torch.allclose(w, expect.expand(4, -1), atol=1e-6)  # content scores start at zero in attention/bigru
    assert w.argmax(1).tolist() == [2, 2, 2, 2]
    bias = model.head.net[-1].bias.detach()
    assert torch.allclose(bias, prior.log(), atol=1e-6)
    logits = model(torch.rand(2, 5, 3, 32, 32), torch.tensor([0, 4]))
    assert logits.shape == (2, 3)


@pytest.mark.parametrize("backbone", ["test_efficientnet", "mobilenetv3_small_050"])
def test_feature_width_is_what_the_backbone_emits(backbone):
    # MobileNetV3 has a pre-logits conv head: its pooled output is head_hidden_size wide, not num_features.
    model = build_model(tiny_cfg(backbone=backbone)).eval()
    feats = model.encoder(torch.rand(2, 5, 3, 32, 32))
    assert feats.shape == (2, 5, model.encoder.num_features)
    assert model(torch.rand(2, 5, 3, 32, 32), torch.tensor([0, 4])).shape == (2, 3)


def test_condition_embedding_only_with_several_conditions():
    one = build_model(tiny_cfg())
    two = build_model(tiny_cfg(conditions=(LEFT_SUB, RIGHT_SUB)))
    assert one.condition_emb is None and two.condition_emb.num_embeddings == 2
    x, lv = torch.rand(2, 5, 3, 32, 32), torch.tensor([1, 2])
    two.eval()
    a, b = two(x, lv, torch.tensor([0, 0])), two(x, lv, torch.tensor([1, 1]))
    assert not torch.allclose(a, b)  # the condition changes the prediction


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_backbone_weights_from_local_file(tmp_path, suffix):
    import safetensors.torch
    import timm

    torch.manual_seed(123)
    src = timm.create_model("test_efficientnet", num_classes=0)
    state = {k: v.clone() for k, v in src.state_dict().items()}
    path = tmp_path / f"w{suffix}"
    if suffix == ".pth":
        torch.save(state, path)
    else:
        safetensors.torch.save_file(state, str(path))
    torch.manual_seed(999)  # a different random init, so equality proves the file was loaded
    model = build_model(tiny_cfg(pretrained=True, weights=str(path)))
    got = model.encoder.backbone.state_dict()
    assert got.keys() == state.keys()
    assert all(torch.equal(got[k], state[k]) for k in state)
    with pytest.raises(FileNotFoundError, match="not found"):
        build_model(tiny_cfg(pretrained=True, weights=str(tmp_path / "missing.pth")))


def test_weight_average_ema_and_swa():
    a, b = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
    swa = WeightAverage(a)
    ema = WeightAverage(a, decay=0.9)
    for model in (a, b):
        swa.update(model)
        ema.update(model)
    assert torch.allclose(swa.module.weight, (a.weight + b.weight) / 2)
    assert torch.allclose(ema.module.weight, 0.9 * a.weight + 0.1 * b.weight)


# ------------------------------------------------------------------------------------------------ augmentation

def test_augmentation_same_transform_for_all_slices():
    torch.manual_seed(0)
    cfg = tiny_cfg(aug_p_affine=1.0, aug_p_color=1.0, aug_p_noise=0.0)
    base = torch.rand(4, 1, 3, 32, 32)
    x = base.expand(-1, 5, -1, -1, -1).contiguous()  # every slice of a sample is the same image
    g = torch.Generator().manual_seed(1)
    out, cond = augment_batch(x, torch.zeros(4, dtype=torch.long), cfg, g)
    assert out.shape == x.shape and cond.tolist() == [0, 0, 0, 0]
    for s in range(1, 5):  # the same transform on every slice: the slices stay identical
        assert torch.equal(out[:, s], out[:, 0])
    assert (out - x).abs().mean() > 0.02  # and it did transform
    assert not torch.allclose(out[0, 0], out[1, 0])  # samples get their own draws
    again, _ = augment_batch(x, torch.zeros(4, dtype=torch.long), cfg, torch.Generator().manual_seed(1))
    assert torch.equal(again, out)  # reproducible from the generator
    noisy, _ = augment_batch(x, torch.zeros(4, dtype=torch.long), tiny_cfg(aug_p_noise=1.0), g)
    assert 0.0 <= noisy.min() and noisy.max() <= 1.0


def test_hflip_swaps_side_of_axial_condition():
    cfg = tiny_cfg(conditions=(LEFT_SUB, RIGHT_SUB), hflip=True, aug_p_affine=0, aug_p_color=0, aug_p_noise=0,
                   aug_center_jitter=0.0)
    x = torch.zeros(64, 5, 3, 32, 32)
    x[..., :8] = 1.0  # a bright band on the image's left edge
    cond = torch.zeros(64, dtype=torch.long)
    out, new = augment_batch(x, cond, cfg, torch.Generator().manual_seed(0))
    flipped = out[:, 0, 0, 16, -4] > 0.5  # the band moved to the right edge
    assert flipped.any() and (~flipped).any()
    assert torch.equal(new, flipped.long())  # exactly the flipped samples became Right Subarticular


# ------------------------------------------------------------------------------------------------ folds

def _index(n_studies: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = [(1000 + s, SPINAL, lv) for s in range(n_studies) for lv in ("L1/L2", "L2/L3", "L3/L4", "L4/L5", "L5/S1")]
    df = pd.DataFrame(rows, columns=["study_id", "condition", "level"])
    df["label"] = pd.array(rng.choice(3, len(df), p=[0.7, 0.2, 0.1]), dtype="Int8")
    return df


def test_folds_grouped_by_study_deterministic_and_order_free():
    idx = _index(40)
    folds = make_folds(idx, 5, 42)
    assert folds["study_id"].is_unique and set(folds["study_id"]) == set(idx["study_id"])
    assert sorted(folds["fold"].unique()) == [0, 1, 2, 3, 4]
    assert folds["fold"].value_counts().min() >= 6  # roughly balanced
    pd.testing.assert_frame_equal(folds, make_folds(idx, 5, 42))
    pd.testing.assert_frame_equal(folds, make_folds(idx.sample(frac=1, random_state=1), 5, 42))
    merged = idx.merge(folds, on="study_id")
    assert (merged.groupby("study_id")["fold"].nunique() == 1).all()  # no study in two folds
    for k in range(5):  # stratified: every validation fold has every class
        assert set(merged.loc[merged["fold"] == k, "label"].astype(int)) == {0, 1, 2}
    assert not make_folds(idx, 5, 7)["fold"].equals(folds["fold"])
    with pytest.raises(ValueError, match="at least 5 studies"):
        make_folds(_index(3), 5, 42)


def test_a_study_without_trained_samples_needs_no_fold():
    idx = _index(6)
    folds = make_folds(idx[idx["study_id"] != 1005], 5, 42)  # study 1005: nothing of the trained conditions
    trained = np.flatnonzero(idx["study_id"] != 1005)
    fold = fold_of_samples(idx, folds, trained)
    assert (fold[idx["study_id"] == 1005] == -1).all() and (fold[trained] >= 0).all()
    assert (fold[trained] == idx.iloc[trained]["study_id"].map(folds.set_index("study_id")["fold"])).all()
    with pytest.raises(ValueError, match=r"studies \[1005\] are not in folds.parquet"):
        fold_of_samples(idx, folds, np.arange(len(idx)))  # a trained row without a fold: another cache


# ------------------------------------------------------------------------------------------------ imports

def test_train_imports_neither_pydicom_nor_dask():
    code = ("import sys, train, train.loop, train.infer, train.report, train.data, train.augment\n"
            "bad = [m for m in ('pydicom', 'dask', 'prep', 'distributed', 'cv2') if m in sys.modules]\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------------------------------------------ data

def test_dataset_streaming_equals_in_memory_and_uint8_becomes_float_on_device(tmp_path):
    import cache
    from tiny_cache import make_tiny_cache
    from train.data import CacheDataset, make_loader, select_samples, to_device

    reader = cache.open(make_tiny_cache(tmp_path / "c", n_studies=2, unlabelled=3))
    pos = select_samples(reader.index, (SPINAL,))
    assert len(pos) == 10 - 3  # unlabelled samples are not trained on
    stream, ram = CacheDataset(reader, pos, (SPINAL,)), CacheDataset(reader, pos, (SPINAL,), in_memory=True)
    assert ram.images.shape == (7, 3, 3, 32, 32)
    for i in range(len(stream)):
        a, b = stream[i], ram[i]
        assert a["image"].dtype == torch.uint8 and all(torch.equal(a[k], b[k]) for k in a)
        assert np.array_equal(a["image"].numpy(), reader[int(pos[i])])
        row = reader.index.iloc[int(pos[i])]
        assert (a["row"].item(), a["label"].item()) == (row["row"], row["label"])
        assert a["level"].item() == ("L1/L2", "L2/L3", "L3/L4", "L4/L5", "L5/S1").index(row["level"])
    batch = next(iter(make_loader(stream, 4, workers=0, train=False, seed=0)))
    x = to_device(batch, torch.device("cpu"))["image"]
    assert x.dtype == torch.float32 and torch.allclose(x * 255, batch["image"].float())
    assert to_device(batch, torch.device("cpu"), image_size=48)["image"].shape == (4, 3, 3, 48, 48)


def test_best_checkpoint_rules_and_early_stop():
    from types import SimpleNamespace

    from train.grade import GraderTask
    from train.loop import FoldState, lr_factor, select

    def rec(epoch, ba, recall, score):
        return {"fold": 0, "epoch": epoch, "ba": ba, "recall": recall, "score": score, "dead_classes": [],
                "pred_counts": [5, 5, 5]}

    reader = SimpleNamespace(index=None)
    history = [rec(0, 0.70, [0.9, 0.10, 0.9], 0.9), rec(1, 0.60, [0.8, 0.25, 0.5], 0.8),
               rec(2, 0.65, [0.8, 0.30, 0.6], 1.0), rec(3, 0.90, [1.0, 0.15, 1.0], 0.5)]
    for rule, best in (("v8", [True, True, True, False]), ("score", [True, True, False, True])):
        task, state = GraderTask(TrainConfig(best_rule=rule, patience=3), reader), FoldState()
        marks = []
        for r in history:
            is_best, stop = select(task.selection_key(r), r["epoch"], state, 3, task.selection)
            assert stop is None
            marks.append(is_best)
        assert marks == best  # v8: epoch 3's 0.90 BA loses, its Moderate recall 0.15 is under the 0.20 floor
    task, state = GraderTask(TrainConfig(patience=2), reader), FoldState()
    reasons = [select(task.selection_key(history[0]), e, state, 2, task.selection)[1] for e in range(3)]
    assert reasons == [None, None, "no better v8 selection metric for 2 epochs"]
    assert (state.best_epoch, state.bad_epochs) == (0, 2)

    cfg = TrainConfig(epochs=10, warmup_epochs=2, swa_start=8, swa_lr=5e-6)
    f = [lr_factor(s, 10, cfg, 1e-4) for s in range(100)]
    assert f[0] == pytest.approx(0.05) and f[19] == pytest.approx(1.0)  # linear warm-up over 2 epochs
    assert f[20] == pytest.approx(1.0) and f[79] < 0.01 and all(a >= b for a, b in zip(f[20:80], f[21:80]))
    assert f[80] == pytest.approx(0.05) and f[99] == pytest.approx(0.05)  # SWA: constant 5e-6 / 1e-4


def test_conditions_are_named_as_everywhere_in_lsdc():
    assert TrainConfig(conditions=("foraminal",)).conditions == ("Left Neural Foraminal Narrowing",
                                                                 "Right Neural Foraminal Narrowing")
    assert len(TrainConfig().with_overrides(["conditions=all"]).conditions) == 5
    mixed = TrainConfig().with_overrides(["conditions=left_subarticular_stenosis,Spinal Canal Stenosis"]).conditions
    assert mixed == ("Left Subarticular Stenosis", "Spinal Canal Stenosis")  # the order given: the embedding's order
    with pytest.raises(ValueError, match="unknown condition 'spinl'.*a group"):
        TrainConfig().with_overrides(["conditions=spinl"])
    with pytest.raises(ValueError, match="without repeats"):
        TrainConfig(conditions=("foraminal", "Left Neural Foraminal Narrowing"))


def test_training_on_a_cache_without_labels_says_what_to_build():
    from types import SimpleNamespace

    from train.grade import GraderTask

    index = pd.DataFrame({"row": [0, 1], "condition": "Spinal Canal Stenosis", "level": ["L1/L2", "L2/L3"],
                          "label": pd.array([None, None], dtype="Int8")})
    reader = SimpleNamespace(index=index, manifest={"config": {"split": "test"}})
    with pytest.raises(ValueError, match=r"no labelled samples .* test split\): train needs a cache of the train"):
        GraderTask.resolve_config(TrainConfig(), reader)


def test_an_unknown_backbone_names_close_ones():
    from train.model import create_backbone

    with pytest.raises(ValueError, match=r"timm has no model 'efficientnet_b99'; close names: .*efficientnet_b"):
        create_backbone("efficientnet_b99", pretrained=True)


def test_folds_say_once_when_a_label_is_rarer_than_the_folds(caplog, recwarn):
    idx = _index(8)
    idx["label"] = pd.array([0] * (len(idx) - 2) + [2, 2], dtype="Int8")  # two Severe samples, five folds
    with caplog.at_level("WARNING"):
        make_folds(idx, 5, 42)
    assert "labels [2] have fewer samples than the 5 folds (2: 2)" in caplog.text
    assert not [w for w in recwarn if "least populated" in str(w.message)]  # not sklearn's own, with its source
