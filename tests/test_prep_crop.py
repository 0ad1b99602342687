"""prep.crop / prep.windows / prep.series: marker at the crop centre, mm-sized boxes, padding, stack windows, CLAHE."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from prep.config import PrepConfig
from prep.crop import crop_box, crop_slice
from prep.series import process_series
from prep.windows import apply_windows, clahe_channels, stack_bounds
from prep_fixtures import phantom, write_series

SMALL = PrepConfig(size=32, crop_scale=1.0, crop_base_mm=16.0, clahe_clip=0.0)  # 32 mm box -> 32 px


def _sample(row=0, instance=1, x=40.0, y=50.0) -> dict:
    return dict(row=row, study_id=1, series_id=2, series_description="Sagittal T2/STIR",
                condition="Spinal Canal Stenosis", level="L4/L5", instance_number=instance, x=x, y=y, label=0)


def _run(series_dir, samples, config):
    written: dict[int, np.ndarray] = {}

    def write(row, stack):
        written[row] = stack.copy()
        return f"{row:032x}"

    return process_series(series_dir, samples, config, write), written


def test_marker_on_labelled_slice_lands_at_crop_centre_of_middle_slice(tmp_path):
    rng = np.random.default_rng(0)
    instances = [int(i) for i in rng.permutation(9) + 101]
    images = [phantom(96, seed=k) for k in range(9)]
    x, y = 40.0, 57.0
    images[4][int(y) - 1:int(y) + 2, int(x) - 1:int(x) + 2] = 4095  # a 3x3 marker on the labelled slice only
    write_series(tmp_path, images, instances, spacing=(0.8, 0.8))
    records, written = _run(tmp_path, [_sample(instance=instances[4], x=x, y=y)], SMALL)
    assert records[0]["ok"], records
    stack = written[0]
    assert stack.shape == (7, 3, 32, 32) and stack.dtype == np.uint8
    full = stack[:, 2].astype(float)  # the full-range window keeps the marker as the brightest thing
    cy, cx = np.unravel_index(np.argmax(full[3]), full[3].shape)
    assert abs(cy - 15.5) <= 1 and abs(cx - 15.5) <= 1
    assert full[3].max() == 255 and all(full[k].max() < 255 for k in (0, 1, 2, 4, 5, 6))
    assert records[0]["slice_instances"] == instances[1:8]
    assert records[0]["half_size_mm"] == 16.0 and records[0]["half_size_px"] == 20.0  # 16 mm / 0.8 mm


def _disc_image(spacing_mm: float, fov_mm: float = 64.0) -> np.ndarray:
    """A 10 mm-radius bright disc at the FOV centre, rendered at the given pixel spacing."""
    n = round(fov_mm / spacing_mm)
    c = (np.arange(n) + 0.5) * spacing_mm - fov_mm / 2
    yy, xx = np.meshgrid(c, c, indexing="ij")
    return np.where(xx**2 + yy**2 < 100.0, 1000.0, 100.0).astype(np.float32)


def test_crop_covers_the_same_millimetres_at_every_pixel_spacing():
    crops = []
    for sp in (0.5, 1.0, 0.25):
        img = _disc_image(sp)
        centre = img.shape[0] / 2 - 0.5
        box = crop_box(centre, centre, (sp, sp), 16.0)
        assert box.w * sp == 32.0
        crops.append(crop_slice(img, box, 64, pad=0.0))
    for c in crops[1:]:
        assert np.abs(c - crops[0]).mean() < 15  # same anatomy, same scale (only edge antialiasing differs)
    radius_px = [np.sqrt((c > 550).sum() / np.pi) for c in crops]  # 10 mm of a 32 mm box at 64 px = 20 px
    np.testing.assert_allclose(radius_px, 20.0, atol=0.8)


def test_border_is_padded_not_stretched():
    img = np.full((40, 40), 500.0, dtype=np.float32)
    box = crop_box(2.0, 20.0, (1.0, 1.0), 10.0)  # 20 px box centred near the left edge
    out = crop_slice(img, box, 20, pad=-1.0)
    assert box.x0 == -7 and box.w == 20
    assert (out[:, :7] == -1.0).all() and (out[:, 7:] == 500.0).all()  # 7 padded columns, the rest unscaled
    below = crop_slice(img, crop_box(20.0, 38.0, (1.0, 1.0), 10.0), 20, pad=-1.0)
    assert (below[:11] == 500.0).all() and (below[11:] == -1.0).all()


def test_windows_are_shared_by_the_stack_not_per_slice():
    base = phantom(48, seed=2).astype(np.float32)
    slices = [base * f for f in (1.0, 1.5, 2.0)]
    bounds, pad = stack_bounds(slices, SMALL.windows, stride=1)
    assert bounds.shape == (3, 2) and pad == 0.0
    out = apply_windows(np.stack(slices), bounds)
    means = out[:, 1].reshape(3, -1).mean(axis=1)
    assert means[0] < means[1] < means[2]  # per-slice normalisation would make them equal


def test_three_channels_still_differ_after_clahe(tmp_path):
    write_series(tmp_path, [phantom(96, seed=k) for k in range(7)], list(range(1, 8)), spacing=(0.8, 0.8))
    config = replace(SMALL, size=64, clahe_clip=2.0)
    records, written = _run(tmp_path, [_sample(instance=4, x=48.0, y=48.0)], config)
    assert records[0]["ok"]
    stack = written[0].astype(float)
    for a, b in ((0, 1), (0, 2), (1, 2)):
        assert np.abs(stack[:, a] - stack[:, b]).mean() > 5, (a, b)
    unclahed = apply_windows(np.ones((1, 64, 64), np.float32) * np.linspace(0, 1, 64, dtype=np.float32),
                             np.array([[0, 1], [0, 1], [0, 1]], np.float32))
    assert not np.array_equal(clahe_channels(unclahed.copy(), 2.0, 8), unclahed)  # CLAHE really ran


def test_monochrome1_and_rescale_give_the_same_cache_pixels(tmp_path):
    images = [phantom(64, seed=k) for k in range(5)]
    write_series(tmp_path / "m2", images, [1, 2, 3, 4, 5])
    write_series(tmp_path / "m1", [4095 - im for im in images], [1, 2, 3, 4, 5], monochrome1=True)
    write_series(tmp_path / "rs", [im // 2 for im in images], [1, 2, 3, 4, 5], slope=2.0, intercept=7.0)
    config = replace(SMALL, size=32, clahe_clip=2.0)
    outs = {k: _run(tmp_path / k, [_sample(instance=3, x=30.0, y=30.0)], config)[1][0] for k in ("m2", "m1")}
    np.testing.assert_array_equal(outs["m1"], outs["m2"])
    rescaled = _run(tmp_path / "rs", [_sample(instance=3, x=30.0, y=30.0)], config)[1][0]
    halved = [(im // 2) * 2 + 7 for im in images]  # what the rescaled series means in output units
    write_series(tmp_path / "ref", halved, [1, 2, 3, 4, 5])
    np.testing.assert_array_equal(rescaled, _run(tmp_path / "ref", [_sample(instance=3, x=30.0, y=30.0)],
                                                 config)[1][0])


def test_resize_area_matches_opencv_area_at_every_scale():
    """resize_area (exact halvings, then bilinear to 2x + exact halving) against OpenCV's general INTER_AREA: the same
    picture (< 1 % of the signal) and about the same noise suppression, where a plain bilinear resize aliases."""
    import cv2

    from prep.crop import resize_area

    rng = np.random.default_rng(0)
    for n in (300, 412, 638, 1100):  # last factor only; one halving + last factor; two halvings + last factor
        yy, xx = np.mgrid[0:n, 0:n] * (412 / n)  # the same anatomy at every grid size
        smooth = (500 + 300 * np.sin(xx / 7.0) * np.cos(yy / 11.0)).astype(np.float32)
        ref = cv2.resize(smooth, (64 * 4, 64 * 4), interpolation=cv2.INTER_AREA)
        out = resize_area(smooth, 256)
        assert out.shape == (256, 256) and out.dtype == np.float32
        assert np.abs(out - ref).mean() < 0.01 * ref.std(), n
        noise = rng.normal(0, 100, (n, n)).astype(np.float32)
        area, ours = cv2.resize(noise, (256, 256), interpolation=cv2.INTER_AREA).std(), resize_area(noise, 256).std()
        assert abs(ours - area) < 0.2 * area, (n, ours, area)
        if n > 300:
            assert cv2.resize(noise, (256, 256), interpolation=cv2.INTER_LINEAR).std() > 1.25 * ours
        fine = (500 + 300 * np.sin(xx / 3.0) * np.cos(yy / 4.0)).astype(np.float32)  # detail of a few pixels
        kept = resize_area(fine, 256).std() / cv2.resize(fine, (256, 256), interpolation=cv2.INTER_AREA).std()
        assert abs(kept - 1) < 0.05, (n, kept)  # fine detail keeps its contrast, as with INTER_AREA
    small = rng.random((100, 100)).astype(np.float32)  # an upscale is INTER_AREA itself
    np.testing.assert_array_equal(resize_area(small, 256), cv2.resize(small, (256, 256), interpolation=cv2.INTER_AREA))


def test_apply_windows_maps_bounds_to_0_255_linearly():
    ramp = np.linspace(-50, 1050, 7 * 16 * 16, dtype=np.float32).reshape(7, 16, 16)
    bounds = np.array([[500, 1000], [0, 1000], [-50, 1050]], np.float32)
    out = apply_windows(ramp, bounds)
    assert out.shape == (7, 3, 16, 16) and out.dtype == np.uint8
    for c, (lo, hi) in enumerate(bounds):
        want = np.clip(np.rint((ramp - lo) * (255 / (hi - lo))), 0, 255)
        assert np.abs(out[:, c].astype(float) - want).max() <= 1  # rounding of exact .5 values may differ
        assert (out[:, c] == want).mean() > 0.99
    assert out[:, 0][ramp <= 500].max() == 0 and out[:, 0][ramp >= 1000].min() == 255
    flat = apply_windows(ramp, np.array([[100, 100]] * 3, np.float32))  # coinciding bounds: a threshold
    assert set(np.unique(flat)) == {0, 255}


def test_resize_area_anisotropic_and_odd_boxes_do_not_alias():
    import cv2

    from prep.crop import resize_area

    rng = np.random.default_rng(1)
    for shape in ((300, 3000), (3000, 300), (801, 801), (500, 1201)):
        noise = rng.normal(0, 100, shape).astype(np.float32)
        area = cv2.resize(noise, (64, 64), interpolation=cv2.INTER_AREA).std()
        ours = resize_area(noise, 64)
        assert ours.shape == (64, 64) and abs(ours.std() - area) < 0.25 * area, (shape, ours.std(), area)


def test_stack_bounds_keeps_the_maximum():
    from prep.config import Window

    narrow = np.full((64, 64), 1001, np.float32)  # a spread far below the float32 rounding of the histogram's edge
    narrow[:25] = 1000
    windows = [Window("a", 1, 99), Window("b", 50, 99.5), Window("c", 0, 100)]
    bounds, pad = stack_bounds([narrow], windows, stride=1)
    np.testing.assert_allclose(bounds, np.percentile(narrow, [[1, 99], [50, 99.5], [0, 100]]), atol=1e-3)
    rows = np.full((64, 64), 2001, np.float32)
    rows[1::2] = 2000  # the maximum only on the rows that stride 2 samples
    assert np.isfinite(stack_bounds([rows], windows, stride=2)[0]).all()


def test_a_box_too_large_in_pixels_is_refused_not_allocated(tmp_path):
    """A 1 m box at the finest accepted spacing (0.05 mm) would be 20,000 px a side: a crop error, never gigabytes."""
    from prep.series import MAX_BOX_PX

    write_series(tmp_path / "s", [phantom(64, seed=k) for k in range(3)], [1, 2, 3], spacing=(0.05, 0.05))
    huge = replace(SMALL, crop_scale=1.0, crop_base_mm=500.0)
    records, written = _run(tmp_path / "s", [_sample(instance=2, x=30, y=30)], huge)
    (r,) = records
    assert not r["ok"] and r["stage"] == "crop" and not written
    assert r["reason"] == f"crop box 20000x20000 px (1000 mm at 0.05x0.05 mm/px) is over {MAX_BOX_PX} px a side"
    records, written = _run(tmp_path / "s", [_sample(instance=2, x=30, y=30)], replace(huge, crop_base_mm=100.0))
    assert records[0]["ok"] and len(written) == 1  # 4,000 px: built
