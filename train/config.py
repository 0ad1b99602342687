"""The settings of every model lsdc trains, one dataclass each, and the one way they are merged and checked.

`LoopConfig` holds what the one training loop (train/loop.py) reads: optimisation, folds, the run. Each model adds
its own settings in a subclass: `TrainConfig` (the grader; its defaults are the v8 notebook's settings) and, for the
localiser, `LocateConfig` (train/locate_config.py). A run writes its resolved config (plus the cache's config hash)
to `config.json`, so a run directory always says exactly how it was made.

Where a value comes from, lowest first: the dataclass default, a `--config` file (.json / .toml), a named CLI option,
`--set key=value` (`LoopConfig.resolve` merges them, for the CLI and notebooks alike). Every value is checked on
construction: a non-finite number or one out of range is a `SettingError` naming the setting, before anything runs.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from cache import settings as cache_settings
from cache.errors import MissingInput, SettingError
from cache.rsna import CONDITION_SERIES, CONDITION_SIDE, expand_conditions

AGGREGATORS = ("weighted", "attention", "bigru")
BEST_RULES = ("v8", "score")
AMP_MODES = ("auto", "bf16", "fp16", "off")


@dataclass
class LoopConfig:
    # --- optimisation ---
    epochs: int = 25  # training epochs
    batch_size: int = 12  # samples per step and device (v8: 12)
    lr_backbone: float = 1e-5  # peak learning rate of the backbone (AdamW)
    lr_head: float = 1e-4  # peak learning rate of everything after the backbone
    weight_decay: float = 0.03  # AdamW weight decay
    grad_clip: float = 1.0  # gradient norm clip (0 = off)
    warmup_epochs: float = 2.0  # linear warm-up, then cosine to 0
    freeze_epochs: int = 2  # backbone frozen (weights and BN statistics) for the first N epochs
    swa_start: int | None = 18  # epoch from which weights are averaged (SWA) at a constant swa_lr
    swa_lr: float = 5e-6  # constant learning rate during SWA
    ema_decay: float | None = None  # EMA instead of SWA: e.g. 0.999 (per step); set swa_start=None with it
    amp: str = "auto"  # 'auto': bf16 where supported, else fp16 + GradScaler; off on CPU
    channels_last: bool = True  # NHWC memory layout (faster convolutions on GPUs)
    compile: bool = False  # torch.compile the model
    # --- validation ---
    folds: int = 5  # cross-validation folds, grouped by study
    fold: int | None = 0  # v8 trained fold 0 only; None = every fold
    patience: int | None = 12  # early stop after N epochs without a better selection metric
    # --- run ---
    workers: int = 2  # loader worker processes (0 = read in the main process)
    seed: int = 42  # seeds folds, weights init, sampling and augmentation
    deterministic: bool = False  # deterministic kernels (slower): a resumed run then equals an uninterrupted one
    device: str = "auto"  # 'auto' | 'cuda' | 'cuda:1' | 'cpu'
    extra: dict[str, Any] = field(default_factory=dict)  # free-form notes kept with the run

    # What config.json and checkpoints call this kind of model (the loop picks its task by it).
    kind: ClassVar[str] = "loop"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Refuse what cannot be right before anything runs: non-finite numbers, counts and rates out of range."""
        for name, value in dataclasses.asdict(self).items():
            numbers = value if isinstance(value, (list, tuple)) else [value]
            if any(isinstance(v, float) and not math.isfinite(v) for v in numbers):
                raise SettingError(f"{name} must be a finite number, got {value!r}")
        for name, low in (("epochs", 1), ("batch_size", 1), ("workers", 0), ("folds", 2), ("freeze_epochs", 0),
                          ("patience", 1), ("warmup_epochs", 0), ("lr_backbone", 0), ("weight_decay", 0),
                          ("grad_clip", 0), ("lr_head", 0), ("swa_lr", 0)):
            _at_least(name, getattr(self, name), low)
        if self.amp not in AMP_MODES:
            raise SettingError(f"amp {self.amp!r} not in {AMP_MODES}")
        if self.ema_decay is not None and self.swa_start is not None:
            raise SettingError("choose EMA (ema_decay) or SWA (swa_start), not both: set the other to None")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise SettingError(f"ema_decay must be in (0, 1), got {self.ema_decay}")
        _at_least("swa_start", self.swa_start, 0)  # at or beyond `epochs`: no averaging in this run
        if self.fold is not None and not 0 <= self.fold < self.folds:
            raise SettingError(f"fold {self.fold} is outside 0..{self.folds - 1}")

    # --- (de)serialisation ---
    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types only (lists, not tuples): it goes into config.json and into checkpoints."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> typing.Self:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise SettingError(f"unknown {cls.__name__} keys {unknown}; known keys: {sorted(known)}")
        return cls(**{k: _coerce(cls, k, v) for k, v in d.items()})

    @classmethod
    def from_file(cls, path: str | Path) -> typing.Self:
        """A .json file, or a .toml file (top level or a [train] / [locate] table)."""
        path = Path(path)
        if not path.is_file():
            raise MissingInput(f"no config file at {path}")
        text = path.read_text()
        try:
            if path.suffix == ".toml":
                d = tomllib.loads(text)
                d = d.get(cls.kind, d.get("train", d))
            elif path.suffix == ".json":
                d = json.loads(text)
            else:
                raise SettingError(f"{path}: config files must be .json or .toml")
        except (tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
            raise SettingError(f"{path}: not valid {path.suffix[1:].upper()} ({e})") from None
        if not isinstance(d, dict):
            raise SettingError(f"{path}: expected a table of settings, got {type(d).__name__}")
        for written_beside in ("cache_config_hash", "cache", "kind"):  # a run's config.json holds these too
            d.pop(written_beside, None)
        try:
            return cls.from_dict(d)
        except SettingError as e:
            raise SettingError(f"{path}: {e}") from None

    def with_overrides(self, assignments: Sequence[str]) -> typing.Self:
        """Apply CLI `key=value` strings; values parse as JSON when they can ('1e-4', 'null', '[1,3,6]')."""
        d = self.to_dict()
        for a in assignments:
            key, sep, value = a.partition("=")
            key = key.strip().replace("-", "_")
            if not sep or not key:
                raise SettingError(f"--set expects key=value, got {a!r}")
            if key not in d:
                raise SettingError(f"--set {a!r}: unknown key {key!r}; known keys: {sorted(d)}")
            d[key] = _parse_value(value.strip())
        return type(self).from_dict(d)

    @classmethod
    def resolve(cls, file: str | Path | None = None, options: dict[str, Any] | None = None,
                overrides: Sequence[str] = ()) -> typing.Self:
        """The config a command runs with: the defaults, then `file`, then the named `options` that were given
        (None = not given; fold may be 'all'), then `--set` overrides. The CLI and notebooks merge the same way."""
        cfg = cls.from_file(file) if file is not None else cls()
        given = {k: v for k, v in (options or {}).items() if v is not None}
        if isinstance(given.get("fold"), str):
            given["fold"] = None if given["fold"].lower() == "all" else _parse_value(given["fold"])
        return cls.from_dict({**cfg.to_dict(), **given}).with_overrides(overrides)


def _at_least(name: str, value: float | None, low: float) -> None:
    if value is not None and value < low:
        raise SettingError(f"{name} must be at least {low}, got {value}")


@dataclass
class TrainConfig(LoopConfig):
    """The grader: every setting of the v8 model, its loss, selection rule and augmentation; v8's defaults."""

    # --- data ---
    conditions: tuple[str, ...] = ("Spinal Canal Stenosis",)  # v8 trains one condition at a time
    slices: int | None = None  # None = the cache's slice count
    image_size: int | None = None  # None = the cache's crop size; else resized on the GPU
    in_memory: str | bool = "auto"  # load the selected samples into RAM once ('auto': when they fit)
    # --- model ---
    backbone: str = "tf_efficientnetv2_s"  # any timm model name; it encodes each slice
    pretrained: bool = True  # ImageNet weights: from `weights` when given, else timm's hub (needs internet)
    weights: str | None = None  # local .safetensors / .pth file for the backbone
    aggregator: str = "weighted"  # 'weighted' (v8) | 'attention' (MIL) | 'bigru' (bi-GRU then attention)
    agg_hidden: int = 256  # attention / GRU width
    level_emb: int = 256  # width of the disc-level embedding, joined to the pooled slice features
    condition_emb: int = 64  # only used when several conditions share one model
    head_hidden: int = 512  # hidden width of the classification head
    head_dropout: float = 0.35  # dropout before the head's hidden layer
    head_dropout2: float = 0.175  # dropout before the head's output layer
    # --- loss ---
    class_weights: tuple[float, float, float] = (1.0, 2.0, 4.0)  # CE weights of Normal/Mild, Moderate, Severe
    focal_gamma: float = 0.0  # 0 = plain weighted CE; 1.5 is v8's troubleshooting option
    # --- selection ---
    best_rule: str = "v8"  # 'v8': best BA with Moderate and Severe recall >= best_min_recall | 'score': lowest score
    best_min_recall: float = 0.20  # the 'v8' rule's minimum Moderate and Severe recall
    dead_min_count: int = 3  # a class predicted fewer times than this on validation is "dead"
    dead_stop_after: int | None = None  # stop after K consecutive dead-class epochs; None = never
    tta: bool = False  # out-of-fold predictions: plain + mild brightness/contrast, averaged
    # --- augmentation (GPU, the same transform for every slice of a sample) ---
    aug_p_affine: float = 0.5  # probability of a random shift/scale/rotation
    aug_shift: float = 0.1  # fraction of the crop size
    aug_scale: float = 0.12  # scale drawn in [1 - s, 1 + s]
    aug_rotate: float = 12.0  # degrees
    aug_center_jitter: float = 16 / 256  # fraction of the crop size: v8's +-16 px at 256 px, always applied
    aug_p_color: float = 0.5  # brightness/contrast or gamma (one of the two)
    aug_brightness: float = 0.2  # brightness shift drawn in [-b, b]
    aug_contrast: float = 0.2  # contrast factor drawn in [1 - c, 1 + c]
    aug_gamma: float = 0.2  # gamma drawn in [1 - g, 1 + g]
    aug_p_noise: float = 0.3  # probability of Gaussian noise
    aug_noise_std: float = 0.03  # on the [0, 1] scale
    hflip: bool = False  # mirror left/right; sided conditions swap to their mirror condition (must be trained too)
    aug_slice_shift: int = 0  # train on the slice window moved by up to +-N slices (a localiser's slice error)
    aug_jitter_mm: float = 0.0  # extra random shift of the crop centre, up to +-N mm (a localiser's point error)

    kind: ClassVar[str] = "grader"

    def __post_init__(self) -> None:
        # names, snake_case names, groups or 'all', as everywhere in lsdc; the order given is the embedding's order
        self.conditions = expand_conditions(self.conditions)
        self.class_weights = tuple(float(w) for w in self.class_weights)  # type: ignore[assignment]
        super().__post_init__()

    def validate(self) -> None:
        super().validate()
        for name, low in (("slices", 1), ("image_size", 8), ("dead_min_count", 0), ("agg_hidden", 1),
                          ("level_emb", 1), ("condition_emb", 1), ("head_hidden", 1), ("focal_gamma", 0),
                          ("aug_shift", 0), ("aug_scale", 0), ("aug_rotate", 0), ("aug_center_jitter", 0),
                          ("aug_brightness", 0), ("aug_contrast", 0), ("aug_gamma", 0), ("aug_noise_std", 0),
                          ("dead_stop_after", 1), ("aug_slice_shift", 0), ("aug_jitter_mm", 0)):
            _at_least(name, getattr(self, name), low)
        for name in ("head_dropout", "head_dropout2", "best_min_recall", "aug_p_affine", "aug_p_color",
                     "aug_p_noise"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise SettingError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if len(self.class_weights) != 3 or min(self.class_weights) <= 0:
            raise SettingError(f"class_weights needs 3 numbers > 0, got {self.class_weights}")
        if not self.conditions or len(set(self.conditions)) != len(self.conditions):
            raise SettingError(f"conditions must be a non-empty list without repeats, got {self.conditions}")
        if len({CONDITION_SERIES[c] for c in self.conditions}) > 1 and self.hflip:
            raise SettingError("hflip with conditions read on different series planes is not supported")
        for name, allowed in (("aggregator", AGGREGATORS), ("best_rule", BEST_RULES)):
            if getattr(self, name) not in allowed:
                raise SettingError(f"{name} {getattr(self, name)!r} not in {allowed}")
        if self.in_memory not in ("auto", True, False):
            raise SettingError(f"in_memory must be 'auto', true or false, got {self.in_memory!r}")
        if self.hflip:
            for c in self.conditions:
                if CONDITION_SIDE[c] is not None and mirror_condition(c) not in self.conditions:
                    raise SettingError(f"hflip swaps the side of {c!r}, so {mirror_condition(c)!r} must be trained "
                                       "too")


LOCATE_TARGETS = ("spinal", "foraminal", "subarticular")


@dataclass
class LocateConfig(LoopConfig):
    """A localiser (docs/locate.md): one per condition group, trained on the series-volume cache."""

    # --- data ---
    target: str = "spinal"  # 'spinal' (Sagittal T2/STIR) | 'foraminal' (Sagittal T1) | 'subarticular' (Axial T2)
    image_size: int | None = None  # input cells per side; None = the volume cache's grid (else resized on the device)
    # --- model ---
    backbone: str = "resnet18d"  # any timm model with features_only at strides 4..32; it encodes each slice
    pretrained: bool = True  # ImageNet weights: from `weights` when given, else timm's hub (needs internet)
    weights: str | None = None  # local .safetensors / .pth file for the backbone
    decoder: int = 64  # channels of the decoder at stride 4
    # --- loss ---
    sigma_mm: float = 3.0  # width of each point's target heatmap in the image plane, millimetres
    sigma_slices: float = 0.7  # its width across slices, in slices
    # --- augmentation (the same transform for every slice of a volume; points move with it) ---
    aug_scale: float = 0.1  # scale drawn in [1 - s, 1 + s]
    aug_shift: float = 0.06  # fraction of the image
    aug_rotate: float = 8.0  # degrees
    aug_contrast: float = 0.2  # contrast factor drawn in [1 - c, 1 + c]
    aug_brightness: float = 0.1  # brightness shift drawn in [-b, b]
    # --- optimisation (the loop's, with the localiser's defaults) ---
    epochs: int = 30  # training epochs
    batch_size: int = 4  # volumes per step and device
    lr_backbone: float = 3e-4  # peak learning rate of the backbone (AdamW)
    lr_head: float = 1e-3  # peak learning rate of the decoder and head
    weight_decay: float = 1e-4  # AdamW weight decay
    warmup_epochs: float = 1.0  # linear warm-up, then cosine to 0
    freeze_epochs: int = 0  # backbone frozen for the first N epochs
    swa_start: int | None = None  # epoch from which weights are averaged (SWA); None = off
    patience: int | None = None  # early stop after N epochs without a lower validation loss

    kind: ClassVar[str] = "localiser"

    def validate(self) -> None:
        super().validate()
        if self.target not in LOCATE_TARGETS:
            raise SettingError(f"target {self.target!r} not in {LOCATE_TARGETS}")
        for name, low in (("image_size", 32), ("decoder", 4), ("sigma_mm", 0.1), ("sigma_slices", 0.1),
                          ("aug_scale", 0), ("aug_shift", 0), ("aug_rotate", 0), ("aug_contrast", 0),
                          ("aug_brightness", 0)):
            _at_least(name, getattr(self, name), low)
        if self.image_size is not None and self.image_size % 32:
            raise SettingError(f"image_size must be a multiple of 32 (the encoder's stride), got {self.image_size}")


def mirror_condition(condition: str) -> str:
    """'Left Neural Foraminal Narrowing' <-> 'Right ...'; a midline condition is its own mirror."""
    side = CONDITION_SIDE[condition]
    if side is None:
        return condition
    other = {"left": "Right", "right": "Left"}[side]
    return other + condition[len(side):]


def _parse_value(text: str) -> Any:
    low = text.lower()
    if low in ("none", "null"):
        return None
    if low in ("true", "false"):
        return low == "true"
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        if "," in text:  # conditions=Spinal Canal Stenosis,Left Neural Foraminal Narrowing
            return [t.strip() for t in text.split(",")]
        return text


def _coerce(cls: type, key: str, value: Any) -> Any:
    """Make a loosely typed value (from JSON, TOML or the CLI) match the field's type hint, or raise clearly."""
    hint = typing.get_type_hints(cls)[key]
    if value is None:
        if type(None) in typing.get_args(hint):
            return None
        raise SettingError(f"{key} cannot be null")
    if key == "conditions" and isinstance(value, str):
        value = [value]
    if key == "in_memory":
        return value if value in ("auto", True, False) else _bad(key, value, "'auto', true or false")
    if typing.get_origin(hint) in (tuple, dict):
        base = typing.get_origin(hint)
    else:  # 'int | None' -> int
        kinds = [t for t in typing.get_args(hint) if t is not type(None)] or [hint]
        base = typing.get_origin(kinds[0]) or kinds[0]
    if base is tuple:
        return tuple(value) if isinstance(value, (list, tuple)) else _bad(key, value, "a list")
    if base is bool:
        return value if isinstance(value, bool) else _bad(key, value, "true or false")
    if base is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else _bad(key, value, "an integer")
    if base is float:
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else _bad(
            key, value, "a number")
    if base is str:
        return value if isinstance(value, str) else _bad(key, value, "a string")
    return value


def _bad(key: str, value: Any, expected: str) -> Any:
    raise SettingError(f"{key}: expected {expected}, got {value!r}")


def settings_markdown(cls: type = TrainConfig) -> str:
    """The settings table of docs/training.md (or docs/locate.md), from the dataclass's own lines; a test keeps the
    docs equal to it."""
    return cache_settings.settings_markdown(cls)
