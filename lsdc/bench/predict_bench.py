"""`lsdc bench predict`: where the time of coordinate-free prediction goes, per study, from a DICOM folder to a
submission (volumes, localisers, crops, grading), and the volume build's rate against the crop build's."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from lsdc.bench.common import log, machine_info

TARGETS = {"seconds_per_study": ("<=", 2.0), "volume_series_over_crop_samples_per_s": (">=", 1.0)}


def bench_predict(graders: list[str | Path], locator: str | Path, data_dir: str | Path, *, split: str = "test",
                  workers: int = 1, scheduler: str | None = "synchronous", device: str = "cpu",
                  command: str | None = None) -> dict[str, Any]:
    """Time `lsdc predict --locator` on a split (fresh intermediates), per stage and per study; then one worker's
    volume build (series/s) against one worker's crop build (samples/s) on the same studies."""
    import pandas as pd

    from lsdc.bench.prep_bench import _verdict
    from lsdc.locate import predict_from_dicoms, work_dir
    from prep.build import build
    from prep.config import PrepConfig
    from prep.volumes import build_volumes
    from train.locator import load_locator, volume_settings

    data_dir = Path(data_dir)
    studies = pd.read_csv(data_dir / f"{split}_series_descriptions.csv")["study_id"].nunique()
    with tempfile.TemporaryDirectory(prefix="lsdc-bench-predict-") as tmp:
        tmp = Path(tmp)
        timings: dict[str, float] = {}
        log(f"bench predict: {studies} studies of the {split} split from their DICOMs alone")
        start = time.perf_counter()
        predict_from_dicoms(graders, locator, data_dir, tmp / "submission.csv", split, None, device, workers,
                            scheduler, progress=False, timings=timings)
        total = time.perf_counter() - start
        coords = work_dir(tmp / "submission.csv") / "coords.csv"
        log("bench predict: volume build vs crop build, one worker each")
        from prep.config import VolumeConfig

        grid = int(volume_settings(load_locator(locator, device)).get("grid", 256))
        t0 = time.perf_counter()
        volumes = build_volumes(data_dir, tmp / "v", VolumeConfig(split=split, grid=grid), workers=1,
                                scheduler="synchronous", progress=False)
        t1 = time.perf_counter()
        crops = build(data_dir, tmp / "c", PrepConfig(split=split, coords=str(coords)), workers=1,
                      scheduler="synchronous", progress=False)
        t2 = time.perf_counter()
    series_per_s, samples_per_s = volumes.tasks / (t1 - t0), crops.built / (t2 - t1)
    per_study = {k: v / studies for k, v in timings.items()}
    ratios = {"seconds_per_study": total / studies,
              "volume_series_over_crop_samples_per_s": series_per_s / samples_per_s}
    return {"bench": "predict", "command": command, "machine": machine_info(), "studies": studies, "split": split,
            "device": device, "workers": workers, "scheduler": scheduler, "seconds": total,
            "seconds_per_study_by_stage": per_study, "volume_series_per_s": series_per_s,
            "crop_samples_per_s": samples_per_s, "ratios": ratios,
            "targets": {k: _verdict(ratios[k], *TARGETS[k]) for k in TARGETS},
            "machine_end": {"load_avg": machine_info()["load_avg"]}}
