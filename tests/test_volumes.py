"""The series-volume cache (the localiser's input): geometry round trips, spatial order, canonical orientation,
a dot landing where the mapping says, sub-stacks, the Dask build with resume and errors, and the reader."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from cache.volume_geometry import GridMap, VolumeGeometry, canonical_sign, slice_normal
from cache.volumes import VolumeWriter, geometry_of, open_volumes
from prep.config import VolumeConfig
from prep.volumes import build_volumes, process_series_volumes
from prep_fixtures import AXIAL, SAGITTAL, phantom, write_series, write_slice


def _build(series_dir, grid=64, description="Sagittal T2/STIR"):
    """process_series_volumes with an in-memory writer -> (volumes by key, records)."""
    stored = {}

    def write(key, volume):
        stored[key] = volume
        return "x"

    records = process_series_volumes(series_dir, {"study_id": 1, "series_id": 2, "series_description": description},
                                     VolumeConfig(grid=grid), write)
    return stored, records


@pytest.mark.parametrize("flip_x, flip_y", [(False, False), (True, False), (False, True), (True, True)])
def test_grid_map_round_trips_and_keeps_the_aspect(flip_x, flip_y):
    g = GridMap.fit(rows=80, cols=48, spacing=(1.2, 0.8), grid=64, flip_x=flip_x, flip_y=flip_y)
    x, y = np.array([0.0, 13.25, 47.0]), np.array([0.0, 40.5, 79.0])
    u, v = g.to_grid(x, y)
    np.testing.assert_allclose(g.to_pixel(u, v), (x, y), atol=1e-9)
    assert abs(g.scale_x) * 1.2 == pytest.approx(abs(g.scale_y) * 0.8)  # one mm scale on both axes
    assert u.min() >= -0.5 and u.max() <= 63.5 and v.min() >= -0.5 and v.max() <= 63.5  # the slice fits the grid
    assert (np.diff(u) < 0).all() == flip_x and (np.diff(v) < 0).all() == flip_y


def test_a_dot_lands_where_the_mapping_says_on_a_flipped_anisotropic_slice(tmp_path):
    # rows run posterior -> anterior (flipped against the radiological view), 1.2 x 0.8 mm pixels, 48 x 80
    orientation = (0.0, -1.0, 0.0, 0.0, 0.0, -1.0)
    images = []
    for k in range(5):
        img = np.full((80, 48), 200, np.uint16)
        if k == 2:
            img[50:53, 10:13] = 3000  # a 3 x 3 dot centred at (x, y) = (11, 51)
        images.append(img)
    write_series(tmp_path / "s", images, [5, 4, 3, 2, 1], orientation=orientation, spacing=(1.2, 0.8))
    volumes, records = _build(tmp_path / "s")
    (rec,) = [r for r in records if r["ok"]]
    volume, geo = volumes[rec["key"]], geometry_of(rec)
    k, u, v = geo.to_volume(3, 11.0, 51.0)  # instance 3 holds the dot (third slice written)
    peak = np.unravel_index(np.argmax(volume[k]), volume[k].shape)
    weights = volume[k].astype(float) * (volume[k] > 128)
    vv, uu = np.mgrid[:64, :64]
    centroid = (weights * uu).sum() / weights.sum(), (weights * vv).sum() / weights.sum()
    assert abs(centroid[0] - u) < 0.5 and abs(centroid[1] - v) < 0.5, (centroid, (u, v), peak)
    assert geo.grid.scale_x < 0  # flipped so that u runs posterior, as on every sagittal volume
    inst, x, y = geo.to_source(k, u, v)
    assert inst == 3 and abs(x - 11.0) < 1e-9 and abs(y - 51.0) < 1e-9


def test_slices_are_in_spatial_order_whatever_their_numbers(tmp_path):
    # instance numbers shuffled; each slice's brightness encodes its position along the normal
    order = [4, 1, 5, 3, 2]
    images = [np.full((32, 32), 500 + 300 * k, np.uint16) for k in range(5)]
    write_series(tmp_path / "s", images, order, orientation=SAGITTAL)
    volumes, records = _build(tmp_path / "s", grid=32)
    (rec,) = [r for r in records if r["ok"]]
    geo = geometry_of(rec)
    assert (np.diff(geo.depths) > 0).all()
    assert slice_normal(SAGITTAL) @ np.array([1.0, 0, 0]) > 0  # sagittal volumes run towards the patient's left
    # the fixture's sagittal normal is -x, so slice k was written k x 4 mm to the patient's right: the volume,
    # which runs to the left, holds them in reverse, the brightest (rightmost) first
    means = volumes[rec["key"]].reshape(5, -1).mean(axis=1)
    assert (np.diff(means) < 0).all()
    assert rec["instance_numbers"] == order[::-1]


def test_two_tilted_sub_stacks_become_two_volumes_and_points_find_their_slice(tmp_path):
    tilt = np.deg2rad(12)
    tilted = (1.0, 0.0, 0.0, 0.0, float(np.cos(tilt)), float(np.sin(tilt)))
    write_series(tmp_path / "s", [phantom(40, seed=k) for k in range(6)], [1, 2, 3, 4, 5, 6], orientation=AXIAL,
                 spacing=(0.7, 0.7), origin=(-14, -14, 0), description="Axial T2")
    write_series(tmp_path / "s", [phantom(40, seed=9 + k) for k in range(6)], [7, 8, 9, 10, 11, 12],
                 orientation=tilted, spacing=(0.7, 0.7), origin=(-14, -14, 40), description="Axial T2")
    volumes, records = _build(tmp_path / "s", grid=40, description="Axial T2")
    ok = sorted((r for r in records if r["ok"]), key=lambda r: r["stack"])
    assert [r["instance_numbers"] for r in ok] == [[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12]]
    geo = geometry_of(ok[1])
    for k in range(6):  # a point on each tilted slice maps back to that slice, within a hair of where it was
        p = geo.patient(k, 12.3, 20.7)[0]
        kk, dist, u, v = geo.nearest(p)
        assert kk == k and abs(dist) < 1e-6 and abs(u - 12.3) < 1e-6 and abs(v - 20.7) < 1e-6


def test_geometry_round_trips_on_synthetic_studies_and_points_sit_on_their_structure(tmp_path):
    from prep.synth import load_phantom, synth

    synth(tmp_path / "d", studies=3, seed=5, image_size=(64, 96), workers=1, progress=False)
    build_volumes(tmp_path / "d", tmp_path / "v", VolumeConfig(grid=64), workers=1, scheduler="synchronous",
                  progress=False)
    reader = open_volumes(tmp_path / "v")
    coords = pd.read_csv(tmp_path / "d" / "train_label_coordinates.csv")
    assert len(coords) > 30
    for r in coords.itertuples():
        hits = reader.index.index[(reader.index["series_id"] == r.series_id)
                                  & reader.index["instance_numbers"].map(lambda n, i=r.instance_number: i in n)]
        geo = reader.geometry(hits[0])
        k, u, v = geo.to_volume(r.instance_number, r.x, r.y)
        inst, x, y = geo.to_source(k, u, v)
        assert inst == r.instance_number and abs(x - r.x) < 0.5 and abs(y - r.y) < 0.5  # the 0.5 px
        assert abs(x - r.x) < 1e-6 and abs(y - r.y) < 1e-6  # in fact exact
        assert -0.5 <= u <= 63.5 and -0.5 <= v <= 63.5
        centre = load_phantom(tmp_path / "d", r.study_id).centre(r.condition, r.level)
        p = geo.patient(k, u, v)[0]
        normal = np.cross(geo.orientations[k][:3], geo.orientations[k][3:])
        in_plane = (p - centre) - ((p - centre) @ normal) * normal
        assert np.linalg.norm(in_plane) < 1e-3  # the coordinate is the structure's centre, seen on its slice
        # on the slice nearest the structure; the canal's five points share the mid-sagittal slice (docs/synth.md)
        slack = 1.5 if r.condition == "Spinal Canal Stenosis" else 0.5
        assert abs((p - centre) @ normal) < slack * np.diff(geo.depths).max() + 1e-6


def test_the_build_resumes_names_bad_files_and_reads_back(tmp_path):
    from prep.synth import synth

    synth(tmp_path / "d", studies=3, seed=6, image_size=(48, 64), workers=1, progress=False)
    series = pd.read_csv(tmp_path / "d" / "train_series_descriptions.csv").iloc[0]
    bad = next((tmp_path / "d" / "train_images" / str(series.study_id) / str(series.series_id)).glob("*.dcm"))
    bad.write_bytes(b"not a dicom")
    cfg = VolumeConfig(grid=32)
    first = build_volumes(tmp_path / "d", tmp_path / "v", cfg, workers=1, scheduler="synchronous", progress=False,
                          stop_after=2)
    assert not first.finalised and first.built >= 2
    done = build_volumes(tmp_path / "d", tmp_path / "v", cfg, workers=1, scheduler="synchronous", progress=False)
    assert done.finalised and done.resumed == 2 and done.built >= done.tasks
    reader = open_volumes(tmp_path / "v")
    assert len(reader) == done.built and reader.grid == 32
    (err,) = reader.errors.itertuples()
    assert err.path == str(bad) and err.stage == "read" and "not a DICOM file" in err.reason
    assert int(bad.stem) not in reader.index["instance_numbers"].iat[0]  # the volume holds the other slices
    for i in range(len(reader)):
        volume = reader[i]
        assert volume.shape == (reader.index["n_slices"].iat[i], 32, 32) and volume.dtype == np.uint8
        assert volume.max() == 255 and volume.min() <= 5  # the window spans the volume's own intensities
    manifest = json.loads((tmp_path / "v" / "manifest.json").read_text())
    assert manifest["kind"] == "volumes" and manifest["config"]["grid"] == 32 and manifest["counts"]["errors"] == 1
    from cache.volumes import verify_volumes

    assert verify_volumes(reader).empty
    with pytest.raises(Exception, match="other"):  # another grid on the same folder: refused, not mixed
        build_volumes(tmp_path / "d", tmp_path / "v", VolumeConfig(grid=48), workers=1, scheduler="synchronous",
                      progress=False)


def test_each_reader_refuses_the_other_kind_of_cache(tmp_path):
    import cache
    from cache import CacheError
    from prep.synth import synth

    synth(tmp_path / "d", studies=2, seed=7, image_size=(48, 64), workers=1, progress=False)
    build_volumes(tmp_path / "d", tmp_path / "v", VolumeConfig(grid=32), workers=1, scheduler="synchronous",
                  progress=False)
    with pytest.raises(CacheError, match="volume cache"):
        cache.open(tmp_path / "v")
    from prep.build import build
    from prep.config import PrepConfig

    build(tmp_path / "d", tmp_path / "c", PrepConfig(size=16), workers=1, scheduler="synchronous", progress=False)
    with pytest.raises(CacheError, match="crop cache, not a volume cache"):
        open_volumes(tmp_path / "c")


def test_canonical_signs():
    assert canonical_sign([0, 1, 0]) == 1 and canonical_sign([0, -1, 0]) == -1
    assert canonical_sign([0, 0, -1]) == 1 and canonical_sign([0.1, 0, 0.99]) == -1
    assert canonical_sign([1, 0, 0]) == 1
    assert isinstance(VolumeWriter, type) and isinstance(VolumeGeometry, type)
    assert write_slice  # (fixture import kept for the fault cases below)


def test_targets_are_the_coordinates_on_the_volumes_and_bad_rows_are_named(tmp_path):
    from prep.synth import synth

    synth(tmp_path / "d", studies=2, seed=8, image_size=(48, 64), workers=1, progress=False)
    coords_csv = tmp_path / "d" / "train_label_coordinates.csv"
    coords = pd.read_csv(coords_csv)
    bad = coords.iloc[[0]].assign(x="nan")  # a NaN coordinate: an error naming its line, not a target
    pd.concat([coords, bad]).to_csv(coords_csv, index=False)
    build_volumes(tmp_path / "d", tmp_path / "v", VolumeConfig(grid=32), workers=1, scheduler="synchronous",
                  progress=False)
    reader = open_volumes(tmp_path / "v")
    t = reader.targets
    assert len(t) == len(coords) and set(t.columns) >= {"key", "k", "u", "v", "condition", "level"}
    for r in t.itertuples():
        geo = reader.geometry(reader.index.index[reader.index["key"] == r.key][0])
        assert geo.instance_numbers[r.k] == r.instance_number
        inst, x, y = geo.to_source(r.k, r.u, r.v)
        assert abs(x - r.x) < 1e-6 and abs(y - r.y) < 1e-6
    (err,) = reader.errors.itertuples()
    assert err.path == f"train_label_coordinates.csv:{len(coords) + 2}" and "not a finite number" in err.reason
    # the test split has no coordinates: volumes without targets
    build_volumes(tmp_path / "d", tmp_path / "vt", VolumeConfig(grid=32, split="test"), workers=1,
                  scheduler="synchronous", progress=False)
    assert open_volumes(tmp_path / "vt").targets.empty


def test_a_full_disk_stops_the_volume_build_unfinalised_and_the_rerun_finishes(tmp_path, monkeypatch):
    import errno

    import zarr

    from cache.format import CacheWriteError
    from prep.synth import synth

    synth(tmp_path / "d", studies=2, seed=9, image_size=(48, 64), workers=1, progress=False)
    real, calls = zarr.create_array, []

    def full_after_two(*args, **kwargs):
        calls.append(1)
        if len(calls) > 2:
            raise OSError(errno.ENOSPC, "No space left on device", kwargs.get("name"))
        return real(*args, **kwargs)

    monkeypatch.setattr("cache.volumes.zarr.create_array", full_after_two)
    with pytest.raises(CacheWriteError, match="No space left on device"):
        build_volumes(tmp_path / "d", tmp_path / "v", VolumeConfig(grid=32), workers=1, scheduler="synchronous",
                      progress=False)
    assert not (tmp_path / "v" / "manifest.json").exists()
    monkeypatch.setattr("cache.volumes.zarr.create_array", real)
    done = build_volumes(tmp_path / "d", tmp_path / "v", VolumeConfig(grid=32), workers=1, scheduler="synchronous",
                         progress=False)
    assert done.finalised and done.resumed == 2 and len(open_volumes(tmp_path / "v")) == done.built
