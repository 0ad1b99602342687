"""prep.geometry: spatial order (not instance order), fallback, edge replication, sub-stacks, neighbour mapping."""

from __future__ import annotations

import numpy as np

from prep.dicom import read_header
from prep.geometry import pixel_to_pixel, stack_around, sub_stacks
from prep.series import index_series
from prep_fixtures import AXIAL, phantom, write_series, write_slice


def _headers(series_dir):
    headers, failed = index_series(series_dir)
    assert not failed
    return headers


def test_order_by_position_with_shuffled_offset_instance_numbers(tmp_path):
    rng = np.random.default_rng(3)
    instances = [int(i) for i in rng.permutation(9) + 5001]  # shuffled, and nowhere near 1
    write_series(tmp_path, [phantom(16, seed=k) for k in range(9)], instances, gap_mm=4.0)
    stack = stack_around(_headers(tmp_path), instances[4], 7)
    assert [h.instance_number for h in stack.slices] == instances[1:8]  # spatial neighbours, whatever their numbers
    np.testing.assert_allclose(stack.offsets_mm, [-12, -8, -4, 0, 4, 8, 12])
    assert stack.ordering == "position" and not any(stack.replicated)
    assert stack.centre.instance_number == instances[4]


def test_edge_replication_is_recorded(tmp_path):
    write_series(tmp_path, [phantom(16, seed=k) for k in range(5)], [10, 11, 12, 13, 14], gap_mm=3.0)
    stack = stack_around(_headers(tmp_path), 11, 7)
    assert [h.instance_number for h in stack.slices] == [10, 10, 10, 11, 12, 13, 14]
    assert stack.replicated == (True, True, False, False, False, False, False)
    np.testing.assert_allclose(stack.offsets_mm, [-3, -3, -3, 0, 3, 6, 9])


def test_fallback_to_instance_number_without_position_tags(tmp_path):
    for k, inst in enumerate([3, 1, 2, 5, 4]):
        write_slice(tmp_path / f"{inst}.dcm", phantom(16, seed=k), instance=inst, position=None)
    stack = stack_around(_headers(tmp_path), 3, 3)
    assert [h.instance_number for h in stack.slices] == [2, 3, 4]
    assert stack.ordering == "instance_number" and all(np.isnan(stack.offsets_mm))


def test_sub_stacks_split_by_orientation(tmp_path):
    tilt = np.deg2rad(15)
    tilted = (1.0, 0.0, 0.0, 0.0, float(np.cos(tilt)), float(np.sin(tilt)))
    write_series(tmp_path, [phantom(16, seed=k) for k in range(5)], [1, 2, 3, 4, 5], orientation=AXIAL)
    write_series(tmp_path, [phantom(16, seed=k) for k in range(5)], [6, 7, 8, 9, 10], orientation=tilted,
                 origin=(0.0, 0.0, 1.0))  # interleaved in z with the first block: only orientation separates them
    headers = _headers(tmp_path)
    groups = sub_stacks(headers)
    assert sorted(sorted(h.instance_number for h in g) for g in groups) == [[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]]
    stack = stack_around(headers, 8, 5)
    assert [h.instance_number for h in stack.slices] == [6, 7, 8, 9, 10]


def test_parallel_blocks_across_a_gap_lend_no_neighbours(tmp_path):
    # one tilt, two blocks 4 mm apart inside, 44 mm apart between (e.g. an L3/L4 and an L5/S1 block)
    write_series(tmp_path, [phantom(16, seed=k) for k in range(5)], [1, 2, 3, 4, 5], orientation=AXIAL, gap_mm=4.0)
    write_series(tmp_path, [phantom(16, seed=k) for k in range(5)], [6, 7, 8, 9, 10], orientation=AXIAL, gap_mm=4.0,
                 origin=(0.0, 0.0, 60.0))
    headers = _headers(tmp_path)
    stack = stack_around(headers, 5, 7)  # the first block's last slice: the edge repeats, the other block stays out
    assert [h.instance_number for h in stack.slices] == [2, 3, 4, 5, 5, 5, 5]
    assert stack.replicated == (False, False, False, False, True, True, True)
    np.testing.assert_allclose(stack.offsets_mm, [-12, -8, -4, 0, 0, 0, 0])
    assert [h.instance_number for h in stack_around(headers, 6, 3).slices] == [6, 6, 7]


def test_near_duplicate_slices_do_not_split_a_block():
    from prep.dicom import SliceHeader
    # every position acquired twice, 0.01 mm apart (a re-acquisition): still one block of 4 mm steps
    headers = [SliceHeader(f"/x/{k}.dcm", k + 1, 16, 16, (0.0, 0.0, 4.0 * (k // 2) + 0.01 * (k % 2)),
                           AXIAL, (1.0, 1.0)) for k in range(10)]
    stack = stack_around(headers, 5, 5)
    assert [h.instance_number for h in stack.slices] == [3, 4, 5, 6, 7] and not any(stack.replicated)


def test_a_missing_slice_does_not_split_its_block(tmp_path):
    write_series(tmp_path, [phantom(16, seed=k) for k in range(7)], [1, 2, 3, 4, 5, 6, 7], gap_mm=3.0)
    (tmp_path / "4.dcm").unlink()  # a 6 mm hole in 3 mm steps: still one block
    stack = stack_around(_headers(tmp_path), 3, 5)
    assert [h.instance_number for h in stack.slices] == [1, 2, 3, 5, 6] and not any(stack.replicated)
    np.testing.assert_allclose(stack.offsets_mm, [-6, -3, 0, 6, 9])


def test_neighbour_of_another_size_maps_through_patient_space(tmp_path):
    lab = read_header(write_slice(tmp_path / "1.dcm", phantom(64), instance=1, spacing=(1.0, 1.0)))
    same = read_header(write_slice(tmp_path / "2.dcm", phantom(64), instance=2, spacing=(1.0, 1.0),
                                   position=(4.0, 0.0, 0.0)))  # 4 mm along the sagittal normal: same grid
    assert pixel_to_pixel(same, lab) is None
    fine = read_header(write_slice(tmp_path / "3.dcm", phantom(128), instance=3, spacing=(0.5, 0.5)))
    np.testing.assert_allclose(pixel_to_pixel(fine, lab), [[2, 0, 0], [0, 2, 0]], atol=1e-9)
    # a neighbour whose first pixel sits 8 mm earlier along rows (y, +y patient) and columns (-z patient)
    shifted = read_header(write_slice(tmp_path / "4.dcm", phantom(80), instance=4, spacing=(1.0, 1.0),
                                      position=(0.0, -8.0, 8.0)))
    np.testing.assert_allclose(pixel_to_pixel(shifted, lab), [[1, 0, 8], [0, 1, 8]], atol=1e-9)
