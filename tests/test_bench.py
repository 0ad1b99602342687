"""`lsdc bench`: the results' structure and counts on tiny data (never timings), the v8 stand-in's documented bugs,
the plain loop's crops bit-identical to the build's, and the Markdown report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from prep_fixtures import phantom, write_dataset, write_series

from lsdc.bench.report import render, update_report

runner = CliRunner()


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("bench_data"), studies=3, slices=9, size=64)


@pytest.fixture(scope="module")
def prep_result(data, tmp_path_factory) -> tuple[dict, Path]:
    from lsdc.bench.prep_bench import bench_prep
    from prep.config import PrepConfig

    work = tmp_path_factory.mktemp("bench_work")
    result = bench_prep(data, PrepConfig(size=32, slices=3), workers=2, repeat=2, dask_env_check=False,
                        work_dir=work, keep=True, command="lsdc bench prep DATA")
    return result, work


def test_prep_bench_counts_and_identical_crops(prep_result):
    result, work = prep_result
    assert result["samples"] == 15 and result["studies"] == 3 and result["series"] == 3
    assert len(result["runs"]) == 2
    for run in result["runs"]:
        # the plain loop, the v8 epoch and every build processed the same 15 samples
        assert run["plain"]["samples"] == 15 and run["plain"]["failed"] == {}
        assert run["v8"]["samples"] == 15 and not run["v8"]["extrapolated"]
        assert set(run["build"]) == {"1", "2"}
        for w, b in run["build"].items():
            assert b["samples"] == b["candidates"] == 15 and b["errors"] == 0 and b["tasks"] == 3
            assert len(b["worker_peak_mb"]) == len(b["worker_cpu_s"]) == int(w)
            assert all(p >= i > 0 for p, i in zip(b["worker_peak_mb"], b["worker_idle_mb"]))
        # every ratio is formed from the same run's own times
        r = run["ratios"]
        assert r["build_over_plain"] == pytest.approx(run["build"]["1"]["total_s"] / run["plain"]["seconds"])
        assert r["speedup_2_workers"] == pytest.approx(run["build"]["1"]["total_s"] / run["build"]["2"]["total_s"])
        assert r["build_over_v8_epoch"] == pytest.approx(run["build"]["1"]["total_s"] / run["v8"]["epoch_s"])
        assert set(run["plain"]["stages_s"]) == {"headers", "decode", "window_bounds", "crop_resize", "window",
                                                  "clahe", "encode_write"}
    # each repeat also ran the build's code in this process: the ratios that split the build's gap to the plain loop
    for run in result["runs"]:
        assert run["in_process"]["samples"] == 15
        assert run["ratios"]["in_process_over_plain"] == pytest.approx(
            run["in_process"]["seconds"] / run["plain"]["seconds"])
        assert run["ratios"]["build_over_in_process"] == pytest.approx(
            run["build"]["1"]["build_s"] / run["in_process"]["seconds"])
    assert result["best"]["in_process_over_plain"] == pytest.approx(
        min(run["in_process"]["seconds"] for run in result["runs"])
        / min(run["plain"]["seconds"] for run in result["runs"]))
    assert "build's code in this process |" in render(result)
    spread = result["ratios"]["build_over_plain"]
    assert spread["n"] == 2 and spread["min"] <= spread["median"] <= spread["max"]
    # the judged figures come from each phase's fastest repeat
    fastest = lambda phase, key: min(run[phase][key] if phase != "build" else run["build"]["1"][key]  # noqa: E731
                                     for run in result["runs"])
    assert result["best"]["build_over_v8_epoch"] == pytest.approx(
        fastest("build", "total_s") / fastest("v8", "epoch_s"))
    assert result["targets"]["build_over_plain"]["value"] == pytest.approx(
        fastest("build", "total_s") / fastest("plain", "seconds"))
    assert result["crops"]["identical"] and result["crops"]["rows_compared"] == 15
    assert result["crops"]["mismatched_rows"] == [] and result["crops"]["pixels_equal"]
    assert result["memory"]["small"]["samples"] == 5 and result["memory"]["large"]["samples"] == 15
    assert set(result["targets"]) == {"build_over_plain", "build_over_v8_epoch", "worker_peak_mb",
                                      "speedup_2_workers"}
    assert all(isinstance(t["met"], bool) for t in result["targets"].values())
    json.dumps(result)  # the --out file must be plain JSON


def test_plain_loop_chunks_equal_build_chunks(prep_result):
    """Pixel for pixel, every sample: the plain loop does exactly the build's work."""
    import zarr

    import cache

    _, work = prep_result
    built = cache.open(work / "build1")
    plain = zarr.open_array(str(work / "plain"), path="crops", mode="r")
    for row in built.index["row"]:
        assert np.array_equal(plain[int(row)], built.read_row(int(row)))
    two = cache.open(work / "build2")
    assert list(two.index["checksum"]) == list(built.index["checksum"])


def test_v8_loader_reproduces_the_notebook_bugs(tmp_path):
    from lsdc.bench.v8_loader import V8Dataset

    series = tmp_path / "train_images" / "7" / "70"
    write_series(series, [phantom(64, seed=k) for k in range(5)], [1, 2, 3, 4, 5])
    samples = pd.DataFrame({"study_id": [7], "series_id": [70], "instance_number": [2], "x": [30.0], "y": [40.0],
                            "label": pd.array([1], dtype="Int8")})
    item = V8Dataset(tmp_path, samples)[0]
    image = item["image"]
    assert image.shape == (7, 3, 256, 256) and image.dtype == np.uint8 and item["label"] == 1
    # instances -1 and 0 do not exist: black slices, silently (bug 6); 1..5 are real
    assert not image[:2].any() and all(image[s].any() for s in range(2, 7))
    # CLAHE on a grey mix copied to 3 channels: the "3 windows" are one channel three times (bug 1)
    assert np.array_equal(image[:, 0], image[:, 1]) and np.array_equal(image[:, 0], image[:, 2])
    # a 64 px image with a 192 px half-size box: the crop is the whole image, stretched (bug 4)
    assert image[3, 0].std() > 0


def test_load_bench_and_cli_report(prep_result, tmp_path):
    from lsdc.cli import app

    _, work = prep_result
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\nHand-written prose that must survive.\n")
    out = tmp_path / "load.json"
    args = ["bench", "load", str(work / "build1"), "--workers", "0,1", "--v8-samples", "4", "--out", str(out),
            "--report", str(doc), "--section", "load-test"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    result = json.loads(out.read_text())
    run = result["runs"][0]
    assert result["samples"] == 15 and result["sample_shape"] == [3, 3, 32, 32]
    for key in ("raw_chunk", "raw_file", "raw_zarr", "reader", "loader_w0", "loader_w1", "in_memory"):
        assert run[key]["samples"] == 15, key
    assert run["v8_w0"]["samples"] == run["v8_w1"]["samples"] == 4
    assert run["ratios"]["loader_w0_over_raw"] == pytest.approx(
        run["loader_w0"]["samples_per_s"] / run["raw_chunk"]["samples_per_s"])
    assert run["ratios"]["cached_over_v8_best"] == pytest.approx(
        max(run["loader_w0"]["samples_per_s"], run["loader_w1"]["samples_per_s"])
        / max(run["v8_w0"]["samples_per_s"], run["v8_w1"]["samples_per_s"]))
    assert set(result["targets"]) == {"loader_over_raw", "cached_over_v8"}
    # the report: one section, replaced (not duplicated) on a second update, the prose kept
    assert runner.invoke(app, args).exit_code == 0
    text = doc.read_text()
    assert text.count("<!-- lsdc-bench:load-test:start -->") == 1 and "Hand-written prose that must survive." in text
    assert "lsdc bench load" in text and "train loader (0 workers) / raw chunk read" in text


def test_train_bench_counts(prep_result, monkeypatch):
    from lsdc.bench import train_bench
    from lsdc.bench.train_bench import bench_train

    sizes, step = [], train_bench._Step.__call__
    monkeypatch.setattr(train_bench._Step, "__call__", lambda self, b, **k: sizes.append(len(b["image"])) or
                        step(self, b, **k))
    _, work = prep_result
    result = bench_train(work / "build1", backbone="test_efficientnet", image_size=32, batch_size=4, steps=2,
                         warmup=1, workers=0, device="cpu")
    assert result["device"] == "cpu" and result["slices"] == 3 and result["image_size"] == 32
    # an epoch's last, smaller batch (15 = 3 x 4 + 3) is warmed up before the timed steps, which then use full ones
    assert result["partial_batch"] == 3 and sizes[:2] == [4, 3] and sizes[2:4] == [4, 4]
    assert result["model"]["samples"] == result["end_to_end"]["samples"] == 8
    assert result["loader"]["samples"] >= 15
    assert result["ratios"]["loader_headroom"] == pytest.approx(
        result["loader"]["samples_per_s"] / result["model"]["samples_per_s"])
    assert result["targets"]["loader_headroom"]["applies"] is False  # a GPU target, recorded but not judged on CPU
    assert "Training (CPU)" in render(result)


def test_report_appends_sections_per_bench(tmp_path):
    doc = tmp_path / "b.md"
    base = {"machine": {"cpu": "X", "cores": 2, "ram_gb": 1.0, "load_avg": [0.5, 0, 0], "python": "3.11"},
            "ratios": {"reader_over_raw": {"min": 0.9, "median": 1.0, "max": 1.1, "n": 3, "max_over_min": 1.2}},
            "targets": {}, "command": "lsdc bench load C", "samples": 1, "batch_size": 1,
            "runs": [{"raw_zarr": {"samples_per_s": 1.0, "samples": 1}, "ratios": {}}]}
    update_report(doc, {**base, "bench": "load"})
    update_report(doc, {**base, "bench": "load"})
    text = doc.read_text()
    assert text.startswith("# Benchmarks") and text.count("lsdc-bench:load:start") == 1
    assert "| cache.open(...)[i] / raw chunk read | **1.00** | 0.90 – 1.10 | 3 |" in text
    # a named section per machine: the default one stays, a second is added beside it, bad names are refused
    update_report(doc, {**base, "bench": "load", "command": "lsdc bench load C --on-16-cores"}, section="load-16-core")
    text = doc.read_text()
    assert text.count("lsdc-bench:load:start") == 1 and text.count("lsdc-bench:load-16-core:start") == 1
    assert "--on-16-cores" in text.split("lsdc-bench:load-16-core:start")[1]
    with pytest.raises(ValueError, match="section"):
        update_report(doc, {**base, "bench": "load"}, section="a b-->")


def test_prep_rates_table_keeps_columns_when_a_build_ran_once():
    from lsdc.bench.report import _rates_prep

    def build(rate):
        return {"samples_per_s": rate, "cpu_share": 1.0}

    plain = {"samples_per_s": 60.0, "samples": 10, "stages_s": {"clahe": 0.05}}
    runs = [{"plain": plain, "v8": {"samples_per_s": 40.0}, "build": {"1": build(46.0), "1_dask_env": build(45.0),
                                                                      "2": build(81.0)}},
            {"plain": plain, "v8": {"samples_per_s": 41.0}, "build": {"1": build(44.0), "2": build(75.0)}}]
    rows = [r for r in _rates_prep({"runs": runs}) if r.startswith("| 2 |")]
    assert rows == ["| 2 | 60.0 | 41.0 | 44.0 (CPU share 1.00) | – | 75.0 (CPU share 1.00) |"]
    runs[1]["in_process"] = {"samples_per_s": 58.0}
    table = _rates_prep({"runs": runs})
    assert [r for r in table if r.startswith("| run |")][0].endswith("| build's code in this process |")
    assert [r for r in table if r.startswith("| 1 |")][0].endswith("| 81.0 (CPU share 1.00) | – |")
    assert [r for r in table if r.startswith("| 2 |")][0].endswith("| 75.0 (CPU share 1.00) | 58.0 |")
