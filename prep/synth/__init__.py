"""`lsdc synth`: a synthetic dataset in the RSNA 2024 lumbar spine competition's exact layout.

One 3D phantom per study (phantom.py) is sliced by every series (series.py), rendered (render.py) and written as
valid MR DICOM files (dicom_writer.py); the tables (tables.py) point each label at its structure. ``faults=True``
adds a few dedicated studies holding a documented corpus of bad inputs (faults.py). See docs/synth.md.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from cache.errors import InputError, SettingError
from cache.io import atomic_write_bytes, atomic_write_json, progress_options
from prep.synth.tables import draw_labels, read_real, write_tables

__all__ = ["SynthConfig", "synth", "load_phantom"]


@dataclass(frozen=True)
class SynthConfig:
    """Everything that decides the bytes written (recorded in synth_manifest.json)."""

    studies: int = 50
    seed: int = 0
    image_size: tuple[int, int] = (320, 640)
    difficulty: float = 0.5
    from_tables: str | None = None
    faults: bool = False


def _study_rng(seed: int, stream: int, index: int) -> np.random.Generator:
    # One independent stream per study: adding test or fault studies never changes the train studies.
    return np.random.default_rng(np.random.SeedSequence([seed, stream, index]))


def plan(cfg: SynthConfig) -> tuple[list[dict], list[dict]]:
    """Plans of the train and test studies (ids, phantoms, series geometry, labels, coordinates)."""
    from prep.synth.study import new_ids, plan_real_study

    ids_rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, 0]))
    taken: set[int] = set()
    n_test = max(1, cfg.studies // 10)
    train: list[dict] = []
    if cfg.from_tables:
        for i, real in enumerate(read_real(cfg.from_tables, cfg.studies)):
            train.append(plan_real_study(_study_rng(cfg.seed, 1, i), real, cfg.image_size, cfg.difficulty))
            taken.update([real["study_id"], *(sid for sid, _ in real["series"])])
    else:
        for i, sid in enumerate(new_ids(ids_rng, cfg.studies, taken)):
            train.append(_synthetic(_study_rng(cfg.seed, 1, i), sid, cfg, taken))
    test = [_synthetic(_study_rng(cfg.seed, 2, j), sid, cfg, taken)
            for j, sid in enumerate(new_ids(ids_rng, n_test, taken))]
    for s in train:
        s["split"] = "train"
    for s in test:
        s["split"] = "test"
    return train, test


def _synthetic(rng: np.random.Generator, study_id: int, cfg: SynthConfig, taken: set[int]) -> dict:
    from prep.synth.study import new_ids, plan_study

    n_series = 4 if rng.random() < 0.15 else 3  # real: 15 % of studies have a second axial series
    return plan_study(rng, study_id, new_ids(rng, n_series, taken), cfg.image_size, cfg.difficulty, draw_labels(rng))


def render_study(study: dict, out: str, seed: int, difficulty: float) -> int:
    """Render and write every slice of one study; returns the number of files written."""
    import cv2

    from prep.synth.dicom_writer import dataset, encode
    from prep.synth.render import render

    cv2.setNumThreads(1)  # parallelism is across studies; threads inside would fight over the cores
    n = 0
    for number, series in enumerate(study["series_geom"], start=1):
        folder = Path(out) / f"{study['split']}_images" / str(study["study_id"]) / str(series.series_id)
        for sl in series.slices:
            rng = np.random.default_rng(np.random.SeedSequence([seed, study["study_id"], series.series_id,
                                                                sl.instance_number]))
            pixels = render(study["phantom"], series, sl, rng, difficulty)
            ds = dataset(seed, study["study_id"], series, number, sl, pixels)
            # no fsync per file: synth_manifest.json, written (and fsynced) last, is what says the data is complete
            atomic_write_bytes(folder / f"{sl.instance_number}.dcm", encode(ds), durable=False)
            n += 1
    return n


def _describe(study: dict) -> dict:
    return dict(
        split=study["split"],
        phantom=study["phantom"].to_dict(),
        series=[dict(series_id=s.series_id, description=s.description, contrast=s.contrast,
                     rows=s.slices[0].rows, cols=s.slices[0].cols, pixel_spacing=list(s.slices[0].spacing),
                     slices=len(s.slices), stacks=len({sl.stack for sl in s.slices}),
                     thickness=s.thickness, spacing=s.spacing, numbering=study["numbering"][s.series_id])
                for s in study["series_geom"]],
        repointed=study["repointed"],
    )


def synth(out_dir: str | os.PathLike, studies: int = 50, seed: int = 0, image_size: tuple[int, int] = (320, 640),
          difficulty: float = 0.5, from_tables: str | os.PathLike | None = None, faults: bool = False,
          workers: int = 1, progress: bool | None = None, overwrite: bool = False) -> dict:
    """Write a synthetic dataset in the competition layout to ``out_dir``; returns a summary dict.

    The same arguments give byte-identical files whatever ``workers`` is. A folder holding a synthetic dataset made
    with other arguments is refused unless ``overwrite`` (which deletes it first); any other non-empty folder is
    always refused, so a typo in OUT never mixes two datasets or touches someone else's files.
    """
    lo, hi = int(image_size[0]), int(image_size[1])
    if not (16 <= lo <= hi):
        raise SettingError(f"image_size must be (lo, hi) with 16 <= lo <= hi, got {image_size}")
    if studies < 1:
        raise SettingError(f"studies must be >= 1, got {studies}")
    if not 0.0 <= difficulty <= 1.0:
        raise SettingError(f"difficulty must be in [0, 1], got {difficulty}")
    cfg = SynthConfig(studies, seed, (lo, hi), float(difficulty), str(from_tables) if from_tables else None, faults)
    out = Path(out_dir)
    _claim(out, asdict(cfg), overwrite)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    train, test = plan(cfg)
    fault_studies: list[dict] = []
    if faults:
        from prep.synth.faults import plan_fault_studies

        fault_studies = plan_fault_studies(cfg, train + test)
    everything = train + fault_studies + test
    files = _render_all(everything, out, cfg, workers, progress)
    train_all = train + fault_studies
    write_tables(out, train_all, test)
    fault_list: list[dict] = []
    if faults:
        from prep.synth.faults import apply_faults

        fault_list = apply_faults(out, fault_studies, cfg)
        atomic_write_json(out / "faults.json", {"faults": fault_list})
    manifest = dict(tool="lsdc synth", format=1, config=asdict(cfg),
                    studies={str(s["study_id"]): _describe(s) for s in everything},
                    fault_studies=[s["study_id"] for s in fault_studies])
    atomic_write_bytes(out / "synth_manifest.json", (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode())
    return dict(out_dir=str(out), train_studies=len(train_all), test_studies=len(test), files=files,
                coordinates=sum(len(s["coords"]) for s in everything), faults=len(fault_list),
                seconds=round(time.perf_counter() - t0, 2))


def _render_all(studies: list[dict], out: Path, cfg: SynthConfig, workers: int, progress: bool | None) -> int:
    from tqdm import tqdm

    bar = tqdm(total=len(studies), desc="synth", unit="study", **progress_options(progress))
    total = 0
    if workers <= 1:
        for s in studies:
            total += render_study(s, str(out), cfg.seed, cfg.difficulty)
            bar.update()
    else:
        # spawn, not fork: the caller may hold threads (a Dask client, torch) that fork would copy mid-lock.
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
            futures = [pool.submit(render_study, s, str(out), cfg.seed, cfg.difficulty) for s in studies]
            for f in futures:
                total += f.result()
                bar.update()
    bar.close()
    return total


def _claim(out: Path, config: dict, overwrite: bool) -> None:
    """Refuse to write into a folder that holds something else; same settings = the same bytes again (idempotent)."""
    if not out.exists() or not any(out.iterdir()):
        return
    manifest = out / "synth_manifest.json"
    if not manifest.exists():
        raise InputError(f"{out} is not empty and holds no lsdc synthetic dataset: choose an empty or new folder")
    made_with = json.loads(manifest.read_text()).get("config")
    if made_with == json.loads(json.dumps(config)):
        return
    if not overwrite:
        raise InputError(f"{out} holds a synthetic dataset made with other settings ({made_with}); choose another "
                         "folder, or pass --overwrite (overwrite=True) to delete it and write the new one")
    shutil.rmtree(out)


def load_phantom(data_dir: str | os.PathLike, study_id: int):
    """The phantom of a study, rebuilt from synth_manifest.json (the tests ask it where structures are)."""
    from prep.synth.phantom import Phantom

    manifest = json.loads((Path(data_dir) / "synth_manifest.json").read_text())
    return Phantom.from_dict(manifest["studies"][str(study_id)]["phantom"])
