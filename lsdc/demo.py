"""`lsdc demo`: the whole pipeline, small, on the CPU — synth -> prep -> train -> evaluate -> predict -> report.

This is the README's main command: on a fresh machine it shows every stage working end to end and that the model
really learns the synthetic signal. Each stage is the same plain function the CLI and notebooks call; the demo only
chooses small settings (and says which in demo_report.md).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cache.errors import InputError
from cache.io import atomic_write_json, atomic_write_text, read_jsonl
from cache.rsna import CONDITIONS


@dataclass
class DemoConfig:
    studies: int = 80  # synthetic training studies (the test split adds 10 %)
    seed: int = 0  # seed of the synthetic data
    image_size: tuple[int, int] = (256, 384)  # synthetic DICOM sizes (the real data is 320-640 px; smaller = faster)
    difficulty: float = 0.2  # grade overlap: at 0.5 neighbouring grades overlap enough to cap BA near 0.9
    conditions: tuple[str, ...] = CONDITIONS  # one model for all 5 (condition embedding): 25 samples per study
    crop_size: int = 64  # crop side in pixels (v8: 256); the CPU pays per pixel
    crop_scale: float = 1.0  # PrepConfig's: the crop's half-side is crop_scale x crop_base_mm
    crop_base_mm: float = 24.0  # a 48 mm box, as top solutions use (~50 mm); v8's is 0.75 x 170 mm
    backbone: str = "mobilenetv3_small_050"  # timm model trained from scratch (~0.6 M parameters: fast on 2 cores)
    epochs: int = 25  # training epochs of the grader (its best epoch is usually 15-20)
    lr: float = 2e-3  # from scratch (no pretrained weights offline), so much higher than v8's fine-tuning rates
    batch_size: int = 16
    # a grader robust to localisation error (docs/locate.md#the-oracle-gap): crops of 7 + 2 x slice_shift slices, of
    # which training reads 7 around a centre moved by up to slice_shift, and the crop centre jittered by jitter_mm
    slice_shift: int = 1
    jitter_mm: float = 2.0
    workers: int = 2  # processes for synth and prep
    train_overrides: dict[str, Any] = field(default_factory=dict)
    # the localisers, and grading the test split from its DICOMs alone (its coordinates only score them)
    volume_grid: int = 128  # cells per side of the series volumes the localisers read
    locator_backbone: str = "mobilenetv3_small_050"  # timm model of the localisers, from scratch
    locator_epochs: int = 10  # training epochs of each localiser (they level off by 8-12)
    locator_lr: float = 3e-3  # from scratch, as the grader's
    locator_overrides: dict[str, Any] = field(default_factory=dict)


def _stage(name: str, log: list[dict], fn, *args, **kwargs):
    print(f"\n== {name} ==", flush=True)
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    log.append({"stage": name, "seconds": round(time.perf_counter() - t0, 1)})
    print(f"   {name}: {log[-1]['seconds']} s", flush=True)
    return out


def run_demo(out: str | Path, cfg: DemoConfig | None = None) -> dict[str, Any]:
    """Run every stage into ``out`` and return the headline figures (also written to out/demo_report.md)."""
    from lsdc.locate import predict_from_dicoms, train_locator, work_dir
    from prep.build import build
    from prep.config import PrepConfig, VolumeConfig
    from prep.synth import synth
    from prep.volumes import build_volumes
    from train.config import TrainConfig
    from train.evaluate import evaluate
    from train.locate_metrics import score_coordinates
    from train.loop import fit
    from train.predict import predict
    from train.score import oracle_gap, score_submission

    cfg = cfg or DemoConfig()
    out = Path(out).resolve()  # the test cache's config names its coordinates file: one spelling for every rerun
    data, train_cache, test_cache, run = out / "data", out / "cache_train", out / "cache_test", out / "run"
    volumes, locator = out / "volumes_train", out / "locator"
    timings: list[dict] = []
    started = time.perf_counter()
    rerun = _claim(out, cfg)
    atomic_write_json(out / "demo_config.json", asdict(cfg))  # the demo's own settings; each stage records its own

    # A rerun continues: synth's manifest is written last, so its presence means the data is complete; prep resumes
    # its caches (nothing to do when finalised) and training resumes from its last checkpoint.
    if rerun and (data / "synth_manifest.json").exists():
        print("\n== synth ==\n   already made with these settings", flush=True)
        timings.append({"stage": "synth", "seconds": 0.0, "reused": True})
    else:
        _stage("synth", timings, synth, data, studies=cfg.studies, seed=cfg.seed, image_size=cfg.image_size,
               difficulty=cfg.difficulty, workers=cfg.workers)
    crop = {"crop_scale": cfg.crop_scale, "crop_base_mm": cfg.crop_base_mm, "slices": 7 + 2 * cfg.slice_shift}
    prep_cfg = PrepConfig(conditions=cfg.conditions, size=cfg.crop_size, **crop)
    built = _stage("prep (train split)", timings, build, data, train_cache, prep_cfg, workers=cfg.workers)
    print(built.summary())
    _stage("prep-volumes (train split)", timings, build_volumes, data, volumes, VolumeConfig(grid=cfg.volume_grid),
           workers=cfg.workers)

    train_cfg = TrainConfig(
        conditions=cfg.conditions, backbone=cfg.backbone, pretrained=False, epochs=cfg.epochs,
        batch_size=cfg.batch_size, workers=0, fold=0, warmup_epochs=1, freeze_epochs=0, swa_start=None,
        lr_backbone=cfg.lr, lr_head=cfg.lr, patience=None, best_rule="v8", device="cpu", slices=7,
        aug_slice_shift=cfg.slice_shift, aug_jitter_mm=cfg.jitter_mm,
        extra={"why": "demo: no pretrained weights offline, so the backbone learns from scratch at a higher lr"},
    ).with_overrides([f"{k}={v}" for k, v in cfg.train_overrides.items()])
    _stage("train", timings, fit, train_cache, run, train_cfg, resume=rerun and (run / "config.json").exists())
    locate_opts = {"backbone": cfg.locator_backbone, "epochs": cfg.locator_epochs, "device": "cpu", "fold": 0}
    locate_sets = ["pretrained=false", f"lr_backbone={cfg.locator_lr}", f"lr_head={cfg.locator_lr}", "workers=0",
                   *(f"{k}={v}" for k, v in cfg.locator_overrides.items())]
    _stage("train localisers", timings, train_locator, volumes, locator, options=locate_opts, overrides=locate_sets,
           resume=rerun)
    result = _stage("evaluate", timings, evaluate, [run])
    # The test split graded from its DICOMs alone (test_label_coordinates.csv is never read), then, for the oracle
    # gap only, from the true points.
    sub = _stage("predict (located points)", timings, predict_from_dicoms, [run], locator, data,
                 out / "submission.csv", "test", data / "sample_submission.csv", "cpu", workers=cfg.workers)
    test_cfg = PrepConfig(split="test", coords=str(data / "test_label_coordinates.csv"), conditions=cfg.conditions,
                          size=cfg.crop_size, **crop)
    _stage("prep (test split, true points)", timings, build, data, test_cache, test_cfg, workers=cfg.workers)
    _stage("predict (true points)", timings, predict, [run], test_cache, out / "submission_oracle.csv",
           sample_submission=data / "sample_submission.csv", device="cpu")
    # The official metric on held-out studies, from the submission files themselves (what Kaggle would score).
    test_score = score_submission(data / "test_labels.csv", out / "submission.csv", details=True)
    oracle = score_submission(data / "test_labels.csv", out / "submission_oracle.csv", details=True)
    gap = oracle_gap(data / "test_labels.csv", out / "submission.csv", out / "submission_oracle.csv")
    located = score_coordinates(work_dir(out / "submission.csv") / "coords.csv", data / "test_label_coordinates.csv")
    total = round(time.perf_counter() - started, 1)

    best = _best_epoch(run / "metrics.jsonl")
    figures = {
        "oof_score": result["score"]["score"],
        "oof_balanced_accuracy": result["overall"]["balanced_accuracy"],
        "oof_recall": result["overall"]["recall"],
        "best_ba": best["ba"],
        "best_dead_classes": best["dead_classes"],
        "best_epoch": best,
        "test_score": test_score["score"],
        "test_parts": {k: test_score[k] for k in ("spinal", "foraminal", "subarticular", "any_severe_spinal")},
        "oracle_score": oracle["score"],
        "oracle_parts": {k: oracle[k] for k in ("spinal", "foraminal", "subarticular", "any_severe_spinal")},
        "oracle_gap": gap["gap"],
        "oracle_gap_interval": [gap["low"], gap["high"]],
        "test_studies": gap["studies"],
        "localisation": located,
        "localisation_oof": {t: json.loads((locator / t / "locate_metrics.json").read_text())
                             for t in ("spinal", "foraminal", "subarticular")},
        "submission_rows": len(sub),
        "seconds": total,
        "timings": timings,
    }
    _write_report(out, cfg, figures)
    return figures


class DemoSettingsDiffer(InputError):
    """The output folder holds a demo made with other settings."""


def _claim(out: Path, cfg: DemoConfig) -> bool:
    """True when ``out`` holds a demo with these settings (a rerun continues it); refuse one with other settings,
    whose data, caches and run would not match. The worker count changes no result, so it may differ."""
    saved = out / "demo_config.json"
    if not saved.exists():
        return False
    if {p.name for p in out.iterdir()} == {saved.name}:  # it failed before its first stage wrote anything
        return False
    mine = json.loads(json.dumps(asdict(cfg)))
    theirs = json.loads(saved.read_text())
    if {k: v for k, v in theirs.items() if k != "workers"} != {k: v for k, v in mine.items() if k != "workers"}:
        changed = sorted(k for k in set(mine) | set(theirs) if k != "workers" and mine.get(k) != theirs.get(k))
        raise DemoSettingsDiffer(f"{out} holds a demo made with other settings ({', '.join(changed)} differ): "
                                 f"choose another --out, or delete {out} to start again")
    return True


def _best_epoch(metrics_path: Path) -> dict[str, Any]:
    """The epoch record that produced best.pt (the last one flagged best), with its dead-class events."""
    records = read_jsonl(metrics_path)
    epochs = [r for r in records if r["type"] == "epoch"]
    best = [r for r in epochs if r.get("best")]
    if not best:
        raise RuntimeError(f"{metrics_path} holds no epoch flagged best: the run did not finish an epoch")
    return {**best[-1], "dead_class_events": sum(r["type"] == "dead_class" for r in records)}


def _write_report(out: Path, cfg: DemoConfig, f: dict[str, Any]) -> None:
    from train.locate_metrics import metrics_markdown

    b = f["best_epoch"]
    oof = {t: m.get(t, {}) for t, m in f["localisation_oof"].items()}
    lo, hi = f["oracle_gap_interval"]
    n_test = f["test_studies"]
    lines = [
        "# lsdc demo", "",
        f"{cfg.studies} synthetic studies (seed {cfg.seed}), conditions: {', '.join(cfg.conditions)}; "
        f"crops {cfg.crop_size} px over {2 * cfg.crop_scale * cfg.crop_base_mm:g} mm; backbone {cfg.backbone} from "
        f"scratch, {cfg.epochs} epochs on the CPU, fold 0, trained for located points (stack centre moved by up to "
        f"±{cfg.slice_shift} slice, crop centre jittered by up to {cfg.jitter_mm:g} mm). Localisers: "
        f"{cfg.locator_backbone} from scratch, "
        f"{cfg.locator_epochs} epochs each, on {cfg.volume_grid}-cell volumes.", "",
        "## Grading", "",
        "| figure | value |", "|---|---|",
        f"| validation balanced accuracy (best epoch, {b['epoch']}) | {b['ba']:.3f} |",
        f"| validation recall Normal/Mild, Moderate, Severe | {', '.join(f'{r:.2f}' for r in b['recall'])} |",
        f"| validation predicted counts | {b['pred_counts']} (dead class: {'yes' if b['dead_classes'] else 'no'}) |",
        f"| dead-class events over the run | {b['dead_class_events']} |",
        f"| out-of-fold competition score (lower is better) | {f['oof_score']:.4f} |",
        f"| **test split score, points located from the DICOMs alone** | **{f['test_score']:.4f}** |",
        f"| its parts | {', '.join(f'{k} {v:.4f}' for k, v in f['test_parts'].items())} |",
        f"| test split score from the true points (the oracle) | {f['oracle_score']:.4f} |",
        f"| its parts | {', '.join(f'{k} {v:.4f}' for k, v in f['oracle_parts'].items())} |",
        f"| **oracle gap** (located − true; ≤ 0.02 wanted) | **{f['oracle_gap']:+.4f}** (90 % interval over "
        f"the {n_test} test studies, paired bootstrap: {lo:+.3f} .. {hi:+.3f}) |",
        f"| submission rows | {f['submission_rows']} |",
        f"| total time | {f['seconds']} s |", "",
        "## Localisation", "",
        "The test split's located points against its true ones (`submission_work/coords.csv` vs "
        "`test_label_coordinates.csv`):", "",
        *metrics_markdown(f["localisation"]), "",
        "Out-of-fold, on the validation studies of each localiser (fold 0; each alone, so the foramina are not "
        "anchored on the canal as `lsdc locate` does):", "",
        *metrics_markdown(oof), "",
        "## Time", "",
        "| stage | seconds |", "|---|---|",
        *[f"| {t['stage']} | {'reused' if t.get('reused') else t['seconds']} |" for t in f["timings"]], "",
        "Runs: `run/` (the grader) and `locator/{spinal,foraminal,subarticular}/` (config, metrics.jsonl, "
        "checkpoints, report.md). Submissions: `submission.csv` (located points; its intermediates in "
        "`submission_work/`) and `submission_oracle.csv` (true points).",
    ]
    atomic_write_text(out / "demo_report.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
