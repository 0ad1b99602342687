"""The localiser's task for the training loop: volume cache in, each condition-level's slice and point out.

One localiser per condition group (LocateConfig.target), each a run of the one loop:

    spinal        Sagittal T2/STIR volumes -> 5 points (the canal at each level) and their slices
    foraminal     Sagittal T1 volumes      -> 10 points (left and right foramen at each level) and their slices
    subarticular  an Axial T2 slice (with its neighbours) -> 2 points (left and right recess); the slice of each
                  level comes from geometry at inference (train.locator), the true one in training

Validation decodes every volume, maps the points back to DICOM pixels and scores them in millimetres
(train.locate_metrics); the best epoch has the lowest validation loss.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from cache.errors import InputError
from cache.io import atomic_write, atomic_write_json, atomic_write_text, json_safe
from cache.rsna import CONDITION_GROUP, CONDITION_SERIES, CONDITIONS, LEVELS
from cache.volumes import geometry_of
from train.checkpoint import load_checkpoint, model_from_checkpoint
from train.config import LocateConfig
from train.data import make_loader
from train.locate_metrics import localisation_metrics, metrics_markdown
from train.locate_net import LocaliserNet, decode, gaussian_targets, heatmap_loss, neighbours, sigma_in_cells
from train.tasks import FoldData, Task

# The points each localiser finds, in its heatmap channel order.
POINTS: dict[str, list[tuple[str, str]]] = {
    "spinal": [("Spinal Canal Stenosis", lv) for lv in LEVELS],
    "foraminal": [(c, lv) for c in CONDITIONS if CONDITION_GROUP[c] == "foraminal" for lv in LEVELS],
    "subarticular": [(c, None) for c in CONDITIONS if CONDITION_GROUP[c] == "subarticular"],  # left, right
}
DESCRIPTION = {t: CONDITION_SERIES[POINTS[t][0][0]] for t in POINTS}


def items_of(reader: Any, target: str) -> pd.DataFrame:
    """What one localiser trains on, one row per item: a volume (sagittal targets: its points) or a volume and a
    level (subarticular: that level's axial slice and its left and right points). Columns: study_id, vol (index
    position), level, k (the item's slice: subarticular), and per point channel c: k{c}, u{c}, v{c}."""
    index, targets = reader.index, reader.targets
    volumes = index.index[index["series_description"] == DESCRIPTION[target]]
    t = targets.merge(index[["key"]].reset_index().rename(columns={"index": "vol"}), on="key")
    t = t[t["vol"].isin(volumes)]
    points = POINTS[target]
    rows = []
    groups = t.groupby(["vol", "level"]) if target == "subarticular" else t.groupby(["vol"])
    for key, g in groups:
        vol = int(key[0])
        row: dict[str, Any] = {"study_id": int(index.at[vol, "study_id"]), "vol": vol,
                               "level": key[1] if target == "subarticular" else None}
        by = {(r.condition, r.level if target != "subarticular" else None): r for r in g.itertuples()}
        row["k"] = int(g["k"].iloc[0])
        for c, point in enumerate(points):
            r = by.get(point)
            same_slice = r is not None and (target != "subarticular" or int(r.k) == row["k"])
            row.update({f"k{c}": int(r.k) if same_slice else -1, f"u{c}": float(r.u) if same_slice else np.nan,
                        f"v{c}": float(r.v) if same_slice else np.nan})
        rows.append(row)
    return pd.DataFrame(rows)


class VolumeItems(torch.utils.data.Dataset):
    """Items as uint8 stacks padded to one depth, with their points in grid cells and masks."""

    def __init__(self, reader: Any, items: pd.DataFrame, target: str, volumes: dict[int, np.ndarray]):
        self.items, self.target, self.volumes = items.reset_index(drop=True), target, volumes
        self.channels = len(POINTS[target])
        self.depth = 1 if target == "subarticular" else max((volumes[v].shape[0] for v in items["vol"]), default=1)
        self.mm_per_cell = {v: geometry_of(reader.index.loc[v]).mm_per_cell() for v in set(items["vol"])}

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        r = self.items.iloc[i]
        volume = self.volumes[int(r["vol"])]
        if self.target == "subarticular":  # the item's slice and its two neighbours (edges repeated)
            k = int(r["k"])
            stack = volume[[max(k - 1, 0), k, min(k + 1, len(volume) - 1)]][None]  # (1, 3, G, G)
            ks = np.zeros(self.channels, dtype=np.int64)
        else:
            stack = volume
            ks = np.array([r[f"k{c}"] for c in range(self.channels)], dtype=np.int64)
        depth = len(stack)
        pad = np.zeros((self.depth - depth, *stack.shape[1:]), dtype=np.uint8)
        u = np.array([r[f"u{c}"] for c in range(self.channels)], dtype=np.float32)
        v = np.array([r[f"v{c}"] for c in range(self.channels)], dtype=np.float32)
        return {"volume": torch.from_numpy(np.concatenate([stack, pad])), "k": torch.from_numpy(ks.clip(0)),
                "u": torch.from_numpy(np.nan_to_num(u)), "v": torch.from_numpy(np.nan_to_num(v)),
                "point_mask": torch.from_numpy(np.isfinite(u) & (np.array([r[f"k{c}"] for c in
                                                                            range(self.channels)]) >= 0)),
                "slice_mask": torch.arange(self.depth) < depth,
                "mm_per_cell": torch.tensor(self.mm_per_cell[int(r["vol"])], dtype=torch.float32),
                "item": torch.tensor(i)}


def prepare(batch: dict[str, torch.Tensor], device: torch.device, size: int | None, target: str
            ) -> dict[str, torch.Tensor]:
    """On the device: uint8 -> float in [0, 1], resized to `size` cells (points scaled with it), and each slice with
    its neighbours as channels; returns x (B, D, 3, S, S) and the points in input cells."""
    b = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    x = b["volume"].float().div_(255)
    grid = x.shape[-1]
    if target == "subarticular":
        x = x.squeeze(1)[:, None]  # (B, 1, 3, G, G): the slice's channels are already its neighbours
    if size is not None and size != grid:
        bs, d = x.shape[:2]
        x = F.interpolate(x.flatten(0, 1) if target == "subarticular" else x.flatten(0, 1)[:, None],
                          size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        x = x.view(bs, d, -1, size, size) if target == "subarticular" else x.view(bs, d, size, size)
        f = size / grid
        b["u"], b["v"] = (b["u"] + 0.5) * f - 0.5, (b["v"] + 0.5) * f - 0.5
        b["mm_per_cell"] = b["mm_per_cell"] / f
    if target != "subarticular":
        x = neighbours(x)
    b["x"] = x
    return b


def augment(b: dict[str, torch.Tensor], cfg: LocateConfig, g: torch.Generator) -> dict[str, torch.Tensor]:
    """One random scale/rotation/shift per item, the same for every slice, and its points moved with it; then a
    contrast/brightness change."""
    x = b["x"]
    n, d, c, h, w = x.shape
    dev = x.device

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return torch.rand(n, generator=g, device=dev) * (hi - lo) + lo

    angle = uniform(-cfg.aug_rotate, cfg.aug_rotate) * math.pi / 180
    scale = 1 + uniform(-cfg.aug_scale, cfg.aug_scale)
    shift = torch.stack([uniform(-cfg.aug_shift, cfg.aug_shift), uniform(-cfg.aug_shift, cfg.aug_shift)], 1) * 2
    a = torch.stack([torch.stack([torch.cos(angle), -torch.sin(angle)], 1),
                     torch.stack([torch.sin(angle), torch.cos(angle)], 1)], 1) / scale[:, None, None]
    theta = torch.cat([a, shift[:, :, None]], 2)  # output -> input, in [-1, 1] coordinates
    grid = F.affine_grid(theta.repeat_interleave(d, 0), [n * d, c, h, w], align_corners=False)
    x = F.grid_sample(x.flatten(0, 1), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    # a point at input coordinates q lands at a^-1 (q - shift)
    q = torch.stack([(2 * b["u"] + 1) / w - 1, (2 * b["v"] + 1) / h - 1], -1)  # (B, C, 2)
    out = torch.einsum("bij,bcj->bci", torch.linalg.inv(a), q - shift[:, None, :])
    b["u"], b["v"] = ((out[..., 0] + 1) * w - 1) / 2, ((out[..., 1] + 1) * h - 1) / 2
    inside = (b["u"] > -0.5) & (b["u"] < w - 0.5) & (b["v"] > -0.5) & (b["v"] < h - 0.5)
    b["point_mask"] = b["point_mask"] & inside  # a point pushed out of the image is not asked for
    contrast = (1 + uniform(-cfg.aug_contrast, cfg.aug_contrast)).view(n, 1, 1, 1)
    brightness = uniform(-cfg.aug_brightness, cfg.aug_brightness).view(n, 1, 1, 1)
    b["x"] = (x * contrast.repeat_interleave(d, 0) + brightness.repeat_interleave(d, 0)).clamp(0, 1).view(
        n, d, c, h, w)
    return b


class LocaliserTask(Task):
    config_class = LocateConfig
    cfg: LocateConfig
    selection = "validation loss"

    def __init__(self, cfg: LocateConfig, reader: Any):
        super().__init__(cfg, reader)
        self.items = items_of(reader, cfg.target)
        self._volumes: dict[int, np.ndarray] = {}

    @classmethod
    def resolve_config(cls, cfg: LocateConfig, reader: Any) -> LocateConfig:
        if reader.targets.empty:
            split = (reader.manifest.get("config") or {}).get("split")
            raise InputError(f"the volume cache {reader.path} holds no targets (split {split!r}): the localiser "
                             "trains on a train split's volumes (lsdc prep-volumes DATA OUT)")
        if items_of(reader, cfg.target).empty:
            raise InputError(f"the volume cache {reader.path} has no {DESCRIPTION[cfg.target]} volume with "
                             f"{cfg.target} points")
        return LocateConfig.from_dict({**cfg.to_dict(), "image_size": cfg.image_size or reader.grid})

    @property
    def index(self) -> pd.DataFrame:
        return self.items

    def trained_positions(self) -> np.ndarray:
        return np.arange(len(self.items))

    def _dataset(self, positions: np.ndarray) -> VolumeItems:
        items = self.items.iloc[positions]
        for v in set(items["vol"]) - set(self._volumes):
            self._volumes[v] = self.reader[v]  # every volume read once; a run holds them all (~1 MB each)
        return VolumeItems(self.reader, items, self.cfg.target, self._volumes)

    def fold_data(self, train_pos, val_pos, rank, world_size, device) -> FoldData:
        pin = device.type == "cuda"
        train = make_loader(self._dataset(train_pos), self.cfg.batch_size, 0, True, self.cfg.seed, rank, world_size,
                            pin)
        val = make_loader(self._dataset(val_pos), self.cfg.batch_size, 0, False, self.cfg.seed, pin_memory=pin)
        return FoldData(train, val, np.asarray(val_pos))

    def describe(self, data: FoldData) -> str:
        return (f"{self.cfg.target} localiser on {DESCRIPTION[self.cfg.target]}: {len(data.train_loader.dataset)} "
                f"train / {len(data.val_loader.dataset)} val items")

    # --- model ---
    @classmethod
    def model_from_config(cls, config: dict[str, Any]) -> LocaliserNet:
        cfg = LocateConfig.from_dict(config)
        return LocaliserNet(cfg.backbone, len(POINTS[cfg.target]), cfg.decoder)

    def build_model(self, data: FoldData) -> LocaliserNet:
        cfg = self.cfg
        try:
            return LocaliserNet(cfg.backbone, len(POINTS[cfg.target]), cfg.decoder, cfg.pretrained, cfg.weights)
        except Exception as e:  # the hub is unreachable: say how to train without it
            if not cfg.pretrained or cfg.weights is not None:
                raise
            raise InputError(f"could not get pretrained weights for {cfg.backbone!r} ({type(e).__name__}); pass a "
                             "local file with --set weights=FILE, or --set pretrained=false") from None

    def checkpoint_meta(self, data: FoldData) -> dict[str, Any]:
        """The volume cache's settings: locate builds the volumes of new studies the same way."""
        return {"volume_settings": json_safe(self.reader.manifest.get("config") or {})}

    def _forward(self, model, b: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(b["x"])

    def loss(self, model, batch, generator, device) -> tuple[torch.Tensor, int]:
        b = augment(prepare(batch, device, self.cfg.image_size, self.cfg.target), self.cfg, generator)
        logits = self._forward(model, b)
        return self._heatmap_loss(logits, b), len(logits)

    def _heatmap_loss(self, logits: torch.Tensor, b: dict[str, torch.Tensor]) -> torch.Tensor:
        _, _, d, h, w = logits.shape
        sigma = sigma_in_cells(self.cfg.sigma_mm, b["mm_per_cell"])
        target = gaussian_targets(b["k"], b["u"], b["v"], d, h, w, sigma, self.cfg.sigma_slices, b["slice_mask"])
        return heatmap_loss(logits, target, b["point_mask"], b["slice_mask"])

    # --- validation and selection ---
    @torch.no_grad()
    def predict_items(self, model, loader, device, autocast) -> tuple[pd.DataFrame, float]:
        """Decoded points of every item of a loader as coordinate rows (source pixels), and the mean loss."""
        model.eval()
        rows, losses, n = [], 0.0, 0
        for batch in loader:
            b = prepare(batch, device, self.cfg.image_size, self.cfg.target)
            with autocast:
                logits = self._forward(model, b)
            losses += float(self._heatmap_loss(logits.float(), b)) * len(logits)
            n += len(logits)
            k, u, v, conf = (t.cpu().numpy() for t in decode(logits.float(), b["slice_mask"],
                                                             shared_slice=self.cfg.target == "spinal"))
            scale = loader.dataset.volumes[int(loader.dataset.items["vol"].iat[0])].shape[-1] / b["x"].shape[-1]
            for j, i in enumerate(batch["item"].tolist()):
                item = loader.dataset.items.iloc[i]
                rows += points_to_rows(self.reader.index.loc[int(item["vol"])], self.cfg.target, item["level"],
                                       k[j] if self.cfg.target != "subarticular" else np.full(len(k[j]), item["k"]),
                                       (u[j] + 0.5) * scale - 0.5, (v[j] + 0.5) * scale - 0.5, conf[j])
        return pd.DataFrame(rows), losses / max(n, 1)

    def truth_rows(self, positions: np.ndarray) -> pd.DataFrame:
        """The true coordinate rows of the items at `positions`."""
        items = self.items.iloc[positions]
        keys = set(self.reader.index.loc[items["vol"].unique(), "key"])
        t = self.reader.targets[self.reader.targets["key"].isin(keys)]
        if self.cfg.target == "subarticular":
            t = t[t["condition"].map(CONDITION_GROUP) == "subarticular"]
        else:
            t = t[t["condition"].isin({c for c, _ in POINTS[self.cfg.target]})]
        return t[["study_id", "series_id", "instance_number", "condition", "level", "x", "y"]]

    def validate(self, model, data: FoldData, device, autocast) -> dict[str, Any]:
        pred, loss = self.predict_items(model, data.val_loader, device, autocast)
        m = localisation_metrics(pred, self.truth_rows(data.val_positions), self.reader.index, self.slice_given)[
            CONDITION_GROUP[POINTS[self.cfg.target][0][0]]]
        return {"val_loss": loss, **{k: v for k, v in m.items() if k != "n"}}

    @property
    def slice_given(self) -> bool:
        """The subarticular localiser reads the true axial slice: its slice figures would be 1 by construction."""
        return self.cfg.target == "subarticular"

    def selection_key(self, record: dict[str, Any]) -> list[float]:
        return [-record["val_loss"]]

    def summary_line(self, r: dict[str, Any]) -> str:
        return (f"{self.cfg.target} fold {r['fold']} epoch {r['epoch']:>2}/{self.cfg.epochs} | train "
                f"{r['train_loss']:.4f} | val {r['val_loss']:.4f} | "
                + ("slice given" if self.slice_given else f"slice exact {r.get('slice_exact', math.nan):.3f}"
                   f" ±1 {r.get('slice_within_1', math.nan):.3f}") + " | point mm median "
                f"{r.get('point_mm_median', math.nan):.2f}"
                f" p95 {r.get('point_mm_p95', math.nan):.2f} | level {r.get('level_identity', math.nan):.3f} | "
                f"{r['samples_per_s']:.1f} items/s{' | best' if r['best'] else ''}")

    # --- outputs ---
    def fold_outputs(self, fold: int, fold_dir: Path, data: FoldData, device, autocast) -> dict[str, Any]:
        ckpt = load_checkpoint(fold_dir / "best.pt")
        pred, loss = self.predict_items(model_from_checkpoint(ckpt).to(device), data.val_loader, device, autocast)
        pred["fold"] = fold
        atomic_write(fold_dir / "oof.parquet", lambda tmp: pred.to_parquet(tmp, index=False))
        return {"best_epoch": int(ckpt["epoch"]), "val_loss": loss, "n_val": len(data.val_positions)}

    def finish(self, run_dir: Path, folds: list[int]) -> None:
        """Pooled out-of-fold points (oof.parquet), their figures (locate_metrics.json) and report.md."""
        oof = pd.concat([pd.read_parquet(run_dir / f"fold{k}" / "oof.parquet") for k in folds], ignore_index=True)
        atomic_write(run_dir / "oof.parquet", lambda tmp: oof.to_parquet(tmp, index=False))
        from train.folds import load_folds

        folds_df = load_folds(run_dir / "folds.parquet")
        studies = set(folds_df.loc[folds_df["fold"].isin(folds), "study_id"])
        positions = np.flatnonzero(self.items["study_id"].isin(studies).to_numpy())
        metrics = localisation_metrics(oof, self.truth_rows(positions), self.reader.index, self.slice_given)
        atomic_write_json(run_dir / "locate_metrics.json", json_safe(metrics))
        lines = [f"# {self.cfg.target} localiser", "", f"Out-of-fold points of folds {folds} against the true "
                 "coordinates (train.locate_metrics; docs/locate.md).", "", *metrics_markdown(metrics), ""]
        atomic_write_text(run_dir / "report.md", "\n".join(lines))


def points_to_rows(volume_row: pd.Series, target: str, level: str | None, k, u, v, conf) -> list[dict[str, Any]]:
    """Decoded points of one item (grid cells of its volume) -> coordinate rows in the source DICOM's pixels."""
    geo = geometry_of(volume_row)
    rows = []
    for c, (condition, point_level) in enumerate(POINTS[target]):
        instance, x, y = geo.to_source(int(k[c]), float(u[c]), float(v[c]))
        rows.append(dict(study_id=int(volume_row["study_id"]), series_id=int(volume_row["series_id"]),
                         instance_number=int(instance), condition=condition, level=point_level or level,
                         x=float(x), y=float(y), confidence=float(conf[c])))
    return rows
