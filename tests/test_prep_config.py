"""PrepConfig refuses, up front, every value that cannot be right (issue 15): a SettingError naming the setting, so
no NaN reaches a worker or the manifest, and no size makes a worker allocate without bound."""

from __future__ import annotations

import json

import pytest

from cache.errors import SettingError, UserError
from prep.config import PrepConfig, Window, parse_windows

NAN, INF = float("nan"), float("inf")

BAD = [
    ("crop_scale", NAN), ("crop_scale", INF), ("crop_scale", 0.0), ("crop_scale", -1.0), ("crop_scale", "1"),
    ("crop_base_mm", NAN), ("crop_base_mm", -INF), ("crop_base_mm", 0), ("crop_base_mm", 1e6),
    ("clahe_clip", NAN), ("clahe_clip", INF), ("clahe_clip", -0.5), ("clahe_clip", 1e9),
    ("clahe_tiles", 0), ("clahe_tiles", 1000), ("clahe_tiles", 8.0), ("clahe_tiles", True),
    ("percentile_stride", 0), ("percentile_stride", 2.5), ("percentile_stride", 10_000),
    ("size", 7), ("size", 4096), ("size", 64.0), ("size", NAN), ("size", True),
    ("slices", 0), ("slices", 4), ("slices", 101), ("slices", 7.0),
    ("studies", 0), ("studies", 1.5), ("split", "val"), ("codec", "gzip"), ("coords", ""),
    ("conditions", ()), ("conditions", ("Spinal Canal Stenosis", "Spinal Canal Stenosis")),
    ("windows", (Window("a", 0, 1), Window("b", 0, 1))),
    ("windows", (Window("a", 0, 1), Window("a", 0, 2), Window("c", 0, 3))),
]


@pytest.mark.parametrize("name,value", BAD, ids=[f"{n}={v!r}" for n, v in BAD])
def test_a_bad_value_is_a_setting_error_naming_the_setting(name, value):
    with pytest.raises(SettingError) as e:
        PrepConfig(**{name: value})
    assert isinstance(e.value, UserError) and isinstance(e.value, ValueError) and "\n" not in str(e.value)
    assert name.split("_")[0] in str(e.value) or name == "windows", str(e.value)


@pytest.mark.parametrize("text", ["soft:nan:99", "soft:0:inf", "soft:50:40", "soft:-1:99", "soft:0:101", "soft:0",
                                  "soft:a:b", ":0:100"])
def test_a_bad_window_is_a_setting_error(text):
    with pytest.raises(SettingError, match="window"):
        parse_windows(f"{text},wide:0.5:99.5,full:0:100")


def test_good_values_build_and_their_dict_is_strict_json():
    cfg = PrepConfig(size=32, crop_scale=1, crop_base_mm=25.0, clahe_clip=0, slices=1, studies=3, codec="none",
                     windows=parse_windows("a:0:100,b:1:99,c:50:99.5"))
    json.dumps(cfg.to_dict(), allow_nan=False)
    assert PrepConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(SettingError, match="unknown PrepConfig keys"):
        PrepConfig.from_dict({**cfg.to_dict(), "sizes": 3})
    with pytest.raises(SettingError, match="crop_scale"):
        PrepConfig.from_dict({**cfg.to_dict(), "crop_scale": NAN})  # e.g. a hand-edited config
