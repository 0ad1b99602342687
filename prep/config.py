"""PrepConfig: every setting that decides the pixels in the cache, and nothing else.

Its dict is handed to ``cache.CacheWriter.create(config=...)``: the cache is named and checked by these values, so a
change of window, crop or slice count can never be mistaken for an old cache. Run-time knobs that do not change
the pixels (workers, scheduler, progress) are deliberately not here.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

from cache.errors import SettingError
from cache.rsna import CONDITIONS, SERIES_DESCRIPTIONS


@dataclass(frozen=True)
class Window:
    """An MRI intensity window given by two percentiles of the stack's own intensities.

    MRI has no Hounsfield scale, so a fixed centre/width (the v8 notebook's CT 50/350) means something different on
    every scanner; percentiles of the stack mean the same thing everywhere. lo/hi are percentiles in [0, 100].
    """

    name: str
    lo: float
    hi: float

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise SettingError(f"window name must be a non-empty string, got {self.name!r}")
        if not (_is_number(self.lo) and _is_number(self.hi) and 0.0 <= self.lo < self.hi <= 100.0):
            raise SettingError(f"window {self.name!r}: need 0 <= lo < hi <= 100 percentiles, got {self.lo!r}, "
                               f"{self.hi!r}")

    @classmethod
    def parse(cls, text: str) -> Window:
        """'soft:40:99.5' -> Window('soft', 40.0, 99.5)."""
        try:
            name, lo, hi = text.split(":")
            return cls(name.strip(), float(lo), float(hi))
        except SettingError:
            raise
        except ValueError as e:
            raise SettingError(f"bad window {text!r}: expected NAME:LO_PERCENTILE:HI_PERCENTILE ({e})") from None


def _is_number(v: object) -> bool:
    """A finite int or float (not a bool, not NaN or infinite): what every numeric setting must be."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_whole(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _in_range(name: str, value: object, low: float, high: float, whole: bool = False) -> None:
    """A SettingError naming the setting unless ``value`` is a finite number (a whole one) within [low, high]."""
    ok = _is_whole(value) if whole else _is_number(value)
    if not ok or not low <= value <= high:  # type: ignore[operator]
        kind = "a whole number" if whole else "a finite number"
        raise SettingError(f"{name} must be {kind} in {low:g}..{high:g}, got {value!r}")


# Three views of one stack (see docs/prep.md for the figure):
#   soft  - the upper half of the intensity distribution: background air and dark cortical bone go black and the
#           contrast is spent on discs, canal/CSF, nerve roots and fat, which is where stenosis is seen;
#   wide  - a robust min-max: everything but the extreme 0.5 % tails, so bright fat/flow artefacts don't squash it;
#   full  - the complete range of the stack, the closest thing MRI has to "the original image".
DEFAULT_WINDOWS: tuple[Window, ...] = (Window("soft", 50.0, 99.5), Window("wide", 0.5, 99.5),
                                       Window("full", 0.0, 100.0))


# Ranges of the settings (PrepConfig.__post_init__). Wide enough for any sensible build, narrow enough that no value
# makes a worker allocate without bound: a 500 mm half side at the finest accepted pixel spacing is still refused per
# sample by the crop (prep.series.MAX_BOX_PX), never attempted.
MAX_SLICES = 63
MAX_SIZE = 2048
HALF_SIZE_MM = (1.0, 500.0)
MAX_CLAHE_CLIP = 1000.0
MAX_CLAHE_TILES = 64
MAX_STRIDE = 64


@dataclass(frozen=True)
class PrepConfig:
    """Settings of one cache build; defaults reproduce the v8 notebook's sample with its bugs fixed."""

    split: str = "train"  # 'train' (labels + coordinates from the competition tables) or 'test' (coords CSV given)
    conditions: tuple[str, ...] = CONDITIONS  # which conditions' coordinate rows become samples
    studies: int | None = None  # first N study ids (ascending) of the split; None = all
    coords: str | None = None  # test split: the user's coordinates CSV (train_label_coordinates.csv columns)
    slices: int = 7  # S slices centred on the labelled one, in spatial order
    size: int = 256  # output crop side in pixels
    # The crop's half-side in mm is crop_scale * crop_base_mm. The seed cropped a half-size of 0.75 * 256 = 192 px;
    # on a typical RSNA sagittal scan (512 px at ~0.66 mm) that is ~127 mm, so crop_base_mm = 170 reproduces it
    # (0.75 * 170 = 127.5 mm = 192 px at 0.664 mm/px) while staying the same size in mm on every scan.
    # Top solutions use ~50 mm boxes: crop_scale=1, crop_base_mm=25.
    crop_scale: float = 0.75  # the crop's half-side in mm is crop_scale x crop_base_mm (seed: 0.75)
    crop_base_mm: float = 170.0  # base half-side in mm (170: the seed's 192 px on a 0.66 mm scan)
    windows: tuple[Window, ...] = DEFAULT_WINDOWS  # three NAME:LO:HI percentile windows of the stack's intensities
    clahe_clip: float = 2.0  # per window channel; 0 disables CLAHE
    clahe_tiles: int = 8  # tiles per side (8 x 8)
    percentile_stride: int = 2  # window percentiles from every k-th row of the stack's slices (2: within ~1 % of range)
    codec: str = "crc32c"  # the cache's chunk codec (cache.format.CODECS; measured in docs/cache_format.md)

    def __post_init__(self) -> None:
        """Refuse, before anything runs, every value that cannot be right: a wrong kind, a non-finite number (NaN
        would reach the manifest as a literal strict JSON readers reject), or a number out of range."""
        if self.split not in ("train", "test"):
            raise SettingError(f"split must be 'train' or 'test', got {self.split!r}")
        unknown = [c for c in self.conditions if c not in CONDITIONS]
        if unknown or not self.conditions or len(set(self.conditions)) != len(self.conditions):
            raise SettingError(f"conditions must be some of {CONDITIONS}, each once; got {list(self.conditions)}")
        if self.studies is not None and (not _is_whole(self.studies) or self.studies < 1):
            raise SettingError(f"studies must be a whole number >= 1 (or None: all), got {self.studies!r}")
        if self.coords is not None and (not isinstance(self.coords, str) or not self.coords):
            raise SettingError(f"coords must be the path of a coordinates CSV, got {self.coords!r}")
        _in_range("slices", self.slices, 1, MAX_SLICES, whole=True)
        if self.slices % 2 == 0:
            raise SettingError(f"slices must be odd (centred on the labelled slice), got {self.slices}")
        _in_range("size", self.size, 8, MAX_SIZE, whole=True)
        for name in ("crop_scale", "crop_base_mm"):
            if not _is_number(getattr(self, name)) or getattr(self, name) <= 0:
                raise SettingError(f"{name} must be a finite number > 0, got {getattr(self, name)!r}")
        if not HALF_SIZE_MM[0] <= self.half_size_mm <= HALF_SIZE_MM[1]:
            raise SettingError(f"the crop's half side crop_scale x crop_base_mm must be {HALF_SIZE_MM[0]:g}.."
                               f"{HALF_SIZE_MM[1]:g} mm, got {self.crop_scale!r} x {self.crop_base_mm!r}")
        if not isinstance(self.windows, (tuple, list)) or not all(isinstance(w, Window) for w in self.windows) \
                or len(self.windows) != 3 or len({w.name for w in self.windows}) != 3:
            raise SettingError(f"need exactly 3 windows with distinct names, got {self.windows!r}")
        _in_range("clahe_clip", self.clahe_clip, 0, MAX_CLAHE_CLIP)
        _in_range("clahe_tiles", self.clahe_tiles, 1, MAX_CLAHE_TILES, whole=True)
        _in_range("percentile_stride", self.percentile_stride, 1, MAX_STRIDE, whole=True)
        from cache.format import CODECS

        if self.codec not in CODECS:
            raise SettingError(f"unknown codec {self.codec!r}; choose one of {list(CODECS)}")

    @property
    def half_size_mm(self) -> float:
        return self.crop_scale * self.crop_base_mm

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (windows as dicts, tuples as lists): the cache's identity."""
        d = asdict(self)
        d["conditions"] = list(self.conditions)
        d["windows"] = [asdict(w) for w in self.windows]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PrepConfig:
        known = {f.name for f in fields(cls)}
        extra = set(d) - known
        if extra:
            raise SettingError(f"unknown PrepConfig keys {sorted(extra)}")
        d = dict(d)
        if "conditions" in d:
            d["conditions"] = tuple(d["conditions"])
        if "windows" in d:
            try:
                d["windows"] = tuple(w if isinstance(w, Window) else Window(**w) for w in d["windows"])
            except TypeError as e:
                raise SettingError(f"windows must be a list of {{name, lo, hi}}, got {d['windows']!r} ({e})") from None
        return cls(**d)


@dataclass(frozen=True)
class VolumeConfig:
    """Settings of one volume-cache build (the localiser's input): every setting that decides its voxels."""

    split: str = "train"  # 'train' or 'test': which {split}_series_descriptions.csv and {split}_images/ to read
    studies: int | None = None  # first N study ids (ascending) of the split; None = all
    coords: str | None = None  # coordinates CSV whose points become targets (train: train_label_coordinates.csv)
    descriptions: tuple[str, ...] = SERIES_DESCRIPTIONS  # which series to build, by series description
    grid: int = 256  # G: every slice resampled onto G x G cells (aspect kept in mm, padded)
    window: Window = Window("wide", 0.5, 99.5)  # the one intensity window, percentiles of the volume's own voxels
    percentile_stride: int = 2  # window percentiles from every k-th row of the slices
    codec: str = "crc32c"  # chunk codec (cache.format.CODECS)

    def __post_init__(self) -> None:
        if self.split not in ("train", "test"):
            raise SettingError(f"split must be 'train' or 'test', got {self.split!r}")
        unknown = [d for d in self.descriptions if d not in SERIES_DESCRIPTIONS]
        if unknown or not self.descriptions:
            raise SettingError(f"unknown series descriptions {unknown}; expected some of {SERIES_DESCRIPTIONS}")
        if not 16 <= self.grid <= 2048:
            raise SettingError(f"grid must be 16..2048 cells, got {self.grid}")
        if self.percentile_stride < 1 or (self.studies is not None and self.studies < 1):
            raise SettingError("percentile_stride and studies must be >= 1")
        from cache.format import CODECS

        if self.codec not in CODECS:
            raise SettingError(f"unknown codec {self.codec!r}; choose one of {list(CODECS)}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["descriptions"] = list(self.descriptions)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VolumeConfig:
        d = dict(d)
        if extra := set(d) - {f.name for f in fields(cls)}:
            raise SettingError(f"unknown VolumeConfig keys {sorted(extra)}")
        if "descriptions" in d:
            d["descriptions"] = tuple(d["descriptions"])
        if isinstance(d.get("window"), dict):
            d["window"] = Window(**d["window"])
        return cls(**d)


def parse_conditions(text: str) -> tuple[str, ...]:
    """'spinal_canal_stenosis,Left Neural Foraminal Narrowing', a group ('spinal', 'foraminal', 'subarticular') or
    'all' (cache.rsna.expand_conditions), in competition order whatever order the user typed."""
    from cache.rsna import expand_conditions

    given = expand_conditions(text)
    return tuple(c for c in CONDITIONS if c in given)


def parse_windows(text: str) -> tuple[Window, ...]:
    """'soft:50:99.5,wide:0.5:99.5,full:0:100' -> three Windows."""
    return tuple(Window.parse(p) for p in text.split(",") if p.strip())


__all__ = ["DEFAULT_WINDOWS", "PrepConfig", "VolumeConfig", "Window", "parse_conditions", "parse_windows"]
