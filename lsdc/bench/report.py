"""Bench results -> Markdown: a short summary for the terminal and a section of docs/benchmarks.md.

Each bench owns one section between `<!-- lsdc-bench:KEY:start -->` and `<!-- lsdc-bench:KEY:end -->` (KEY = prep,
load, train-cpu, train-cuda); rerunning a bench with `--report` replaces its section and leaves the prose alone.
"""

from __future__ import annotations

import re
from datetime import datetime, UTC
from pathlib import Path
from typing import Any

from cache.errors import SettingError

NAMES = {  # ratio key -> what it means, in words a reader of docs/benchmarks.md needs
    "seconds_per_study": "coordinate-free predict, seconds per study (DICOM decode included)",
    "volume_series_over_crop_samples_per_s": "volume build series/s / crop build samples/s (1 worker each)",
    "build_over_plain": "build (1 worker, incl. cluster start) / its unavoidable work in a plain loop",
    "build_over_plain_excl_start": "build (1 worker, excl. cluster start) / plain loop",
    "build_over_v8_epoch": "build (1 worker) / one v8-style epoch of the same samples",
    "speedup_2_workers": "build speed-up, 2 workers vs 1 (incl. cluster start)",
    "speedup_2_workers_excl_start": "build speed-up, 2 workers vs 1 (excl. cluster start)",
    "dask_env_over_build": "build with dask's default worker environment / build with prep's (1 worker)",
    "in_process_over_plain": "build's code in this process (synchronous scheduler) / plain loop",
    "build_over_in_process": "build (1 worker, excl. cluster start) / the same code in this process",
    "reader_over_raw": "cache.open(...)[i] / raw chunk read",
    "raw_zarr_over_raw": "plain zarr array[row] / raw chunk read",
    "raw_file_over_raw": "the file's bytes alone, CRC unchecked / raw chunk read",
    "loader_w0_over_raw_file": "train loader (0 workers) / the file's bytes alone, CRC unchecked",
    "raw_batch_over_raw": "raw read into a new batch array / raw chunk read",
    "loader_w0_over_raw_batch": "train loader (0 workers) / raw read into a new batch array",
    "in_memory_over_raw": "in-memory loader (0 workers) / raw chunk read",
    "loader_headroom": "loader samples/s / model samples/s (loader headroom)",
    "end_to_end_over_model": "end-to-end training / model alone",
    "worker_peak_mb": "peak RSS of a build worker, MB",
    "loader_over_raw": "train loader (0 workers) / raw chunk read (bytes + CRC)",
    "cached_over_v8": "cached epoch / v8-style epoch, each with its fastest worker count",
    "cached_over_v8_best": "cached epoch / v8-style epoch, each with its fastest worker count",
}


def section_key(result: dict[str, Any]) -> str:
    if result["bench"] == "train":
        return "train-cuda" if str(result.get("device", "")).startswith("cuda") else "train-cpu"
    return result["bench"]


def _name(key: str) -> str:
    if key in NAMES:
        return NAMES[key]
    m = re.fullmatch(r"loader_w(\d+)_over_raw", key)
    if m:
        return f"train loader ({m[1]} workers) / raw chunk read"
    m = re.fullmatch(r"cached_over_v8_w(\d+)", key)
    if m:
        return f"cached loader / v8-style loader, {m[1]} workers each"
    m = re.fullmatch(r"in_memory_over_v8_w(\d+)", key)
    if m:
        return f"in-memory loader (0 workers) / v8-style loader with {m[1]} workers"
    m = re.fullmatch(r"speedup_(\d+)_workers(_excl_start|_cpu_bound)?", key)
    if m:
        how = {None: "", "_excl_start": " (excl. cluster start)",
               "_cpu_bound": " if each worker had a free core (from worker CPU times)"}[m[2]]
        return f"build speed-up, {m[1]} workers vs 1{how}"
    return key


def _machine(result: dict[str, Any]) -> str:
    m = result["machine"]
    end = result.get("machine_end", {}).get("load_avg", ["?"])
    text = (f"{m['cpu']}, {m['cores']} cores, {m['ram_gb']} GB RAM; load average (1 min) {m['load_avg'][0]} at "
            f"the start, {end[0]} at the end; Python {m['python']}")
    if "torch" in m:
        text += f", torch {m['torch']}"
    if result.get("device_name"):
        text += f"; device: {result['device_name']}"
    return text


def _ratio_rows(result: dict[str, Any]) -> list[str]:
    best = result.get("best")  # prep: the ratios of each phase's fastest repeat (what the targets are judged on)
    head = "| ratio (measured within each run) | median | range over runs | runs |"
    if best:
        head = "| ratio (measured within each run) | fastest repeat of each phase | median | range over runs | runs |"
    rows = [head, "|---|" + "---|" * (head.count("|") - 2)]
    for key, s in result["ratios"].items():
        median = f"{s['median']:.2f}" if isinstance(s, dict) else f"{s:.2f}"
        spread = f"{s['min']:.2f} – {s['max']:.2f} | {s['n']}" if isinstance(s, dict) else "– | 1"
        if best:
            first = f"**{best[key]:.2f}**" if key in best else "–"
            rows.append(f"| {_name(key)} | {first} | {median} | {spread} |")
        else:
            rows.append(f"| {_name(key)} | **{median}** | {spread} |")
    return rows


def _value(t: dict[str, Any]) -> str:
    """A target's measured value; with 3 decimals when 2 would round it onto the target (0.7996 is not 0.80)."""
    value, target = t["value"], float(t["target"].split()[-1])
    return f"{value:.3f}" if round(value, 2) == round(target, 2) else f"{value:.2f}"


def _target_rows(result: dict[str, Any]) -> list[str]:
    rows = ["| target | measured | wanted | met |", "|---|---|---|---|"]
    for key, t in result.get("targets", {}).items():
        met = "yes" if t["met"] else "**no**"
        if t.get("applies") is False:
            met += " (applies on a GPU only)"
        rows.append(f"| {_name(key)} | {_value(t)} | {t['target']} | {met} |")
    return rows


def _rates_prep(result: dict[str, Any]) -> list[str]:
    builds = list(dict.fromkeys(k for run in result["runs"] for k in run["build"]))  # some builds run once only
    label = {k: "build, 1 worker, dask's default env" if k == "1_dask_env" else f"build, {k} worker(s)"
             for k in builds}
    in_process = any("in_process" in run for run in result["runs"])
    if in_process:
        label["in_process"] = "build's code in this process"
    rows = ["| run | plain loop | v8-style epoch | " + " | ".join(label.values()) + " |"]
    rows.append("|---" * (3 + len(label)) + "|")
    for i, run in enumerate(result["runs"]):
        cells = [f"{run['plain']['samples_per_s']:.1f}", f"{run['v8']['samples_per_s']:.1f}"]
        cells += [f"{b['samples_per_s']:.1f} (CPU share {b['cpu_share']:.2f})" if (b := run["build"].get(k)) else "–"
                  for k in builds]
        if in_process:
            cells.append(f"{run['in_process']['samples_per_s']:.1f}" if "in_process" in run else "–")
        rows.append(f"| {i + 1} | " + " | ".join(cells) + " |")
    plain = result["runs"][0]["plain"]
    stages = ", ".join(f"{k} {1000 * v / max(plain['samples'], 1):.1f}" for k, v in plain["stages_s"].items())
    mem = result.get("memory")
    out = ["Samples/s (CPU share = worker CPU time / (wall time x workers): below 1 the workers were crowded out):",
           "", *rows, "", f"Plain loop, ms per sample by stage (run 1): {stages}."]
    if mem:
        out.append(f"Peak worker RSS: {max(mem['small']['worker_peak_mb']):.0f} MB on {mem['small']['samples']} "
                   f"samples ({mem['small']['studies']} studies), {mem['large']['worker_peak_mb_max']:.0f} MB on "
                   f"{mem['large']['samples']} samples ({mem['large']['studies']} studies): "
                   f"growth x{mem['growth']:.2f}.")
    crops = result.get("crops", {})
    out.append(f"Plain loop vs build: {crops.get('rows_compared', 0)} samples compared, bit-identical: "
               f"{crops.get('identical')}.")
    return out


def _rates_load(result: dict[str, Any]) -> list[str]:
    keys = [k for k in result["runs"][0] if k != "ratios"]
    rows = ["| run | " + " | ".join(keys) + " |", "|---" * (1 + len(keys)) + "|"]
    for i, run in enumerate(result["runs"]):
        rows.append(f"| {i + 1} | " + " | ".join(f"{run[k]['samples_per_s']:.1f}" for k in keys) + " |")
    v8 = [k for k in keys if k.startswith("v8_")]
    note = f" (v8-style columns over {result['runs'][0][v8[0]]['samples']} samples)" if v8 else ""
    return [f"Samples/s over {result['samples']} samples, batch {result['batch_size']}{note}:", "", *rows]


def _rates_train(result: dict[str, Any]) -> list[str]:
    parts = [f"{k} {result[k]['samples_per_s']:.3g}" for k in ("loader", "model", "end_to_end")]
    text = [f"Model {result['backbone']} ({result['parameters_m']:.1f} M parameters), {result['slices']} slices at "
            f"{result['image_size']} px, batch {result['batch_size']}, {result['workers']} loader workers, amp "
            f"{result['amp']}, channels_last {result['channels_last']}, {result['steps']} timed steps after "
            f"{result['warmup']} warm-up.", "", f"Samples/s: {', '.join(parts)}."]
    util = result["end_to_end"].get("gpu_utilisation")
    if util and util.get("n"):
        text.append(f"GPU utilisation during end-to-end training: mean {util['mean']:.0f} % (min {util['min']:.0f}, "
                    f"max {util['max']:.0f}, {util['n']} samples).")
    if "gpu_peak_memory_gb" in result:
        text.append(f"Peak GPU memory: {result['gpu_peak_memory_gb']:.1f} GB.")
    return text


def _rates_predict(result: dict[str, Any]) -> list[str]:
    rows = ["| stage | seconds per study |", "|---|---|"]
    rows += [f"| {k} | {v:.3f} |" for k, v in result["seconds_per_study_by_stage"].items()]
    return [f"{result['studies']} studies of the {result['split']} split from their DICOMs to a submission on "
            f"{result['device']} ({result['workers']} worker, scheduler {result['scheduler']}): "
            f"{result['seconds']:.1f} s in all.", "", *rows, "",
            f"Volume build {result['volume_series_per_s']:.1f} series/s, crop build "
            f"{result['crop_samples_per_s']:.1f} samples/s (one worker each, the same studies)."]


def render(result: dict[str, Any]) -> str:
    """The Markdown section of one result."""
    when = result["machine"].get("time") or datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    title = {"prep": "Cache build", "load": "Loader", "train-cpu": "Training (CPU)",
             "train-cuda": "Training (GPU)", "predict": "Coordinate-free prediction"}[section_key(result)]
    rates = {"prep": _rates_prep, "load": _rates_load, "train": _rates_train,
             "predict": _rates_predict}[result["bench"]](result)
    lines = [f"### {title}: measured {when}", "", f"Machine: {_machine(result)}.", "",
             f"Reproduce: `{result.get('command') or '(called from Python)'}`", "", *_target_rows(result), "",
             *_ratio_rows(result), "", *rates]
    return "\n".join(lines) + "\n"


def update_report(doc: str | Path, result: dict[str, Any], section: str | None = None) -> Path:
    """Replace (or append) this result's section in the Markdown file ``doc``; atomic. ``section`` names the section
    (default: the bench's own, e.g. ``prep``): one per machine keeps each machine's figures side by side."""
    from cache.io import atomic_write_text

    doc = Path(doc)
    key = section_key(result) if section is None else section
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", key):
        raise SettingError(f"report section {key!r}: use letters, digits, '.', '_' or '-'")
    start, end = f"<!-- lsdc-bench:{key}:start -->", f"<!-- lsdc-bench:{key}:end -->"
    block = f"{start}\n{render(result)}{end}"
    text = doc.read_text() if doc.exists() else "# Benchmarks\n"
    if start in text and end in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    atomic_write_text(doc, text)
    return doc


def summary(result: dict[str, Any]) -> str:
    """A few lines for the terminal: targets first, then every ratio."""
    lines = [f"lsdc bench {result['bench']}: {_machine(result)}"]
    for key, t in result.get("targets", {}).items():
        flag = "ok  " if t["met"] else "MISS"
        lines.append(f"  [{flag}] {_name(key)}: {_value(t)} (target {t['target']})")
    for key, s in result["ratios"].items():
        if key not in result.get("targets", {}):
            lines.append(f"         {_name(key)}: {s['median'] if isinstance(s, dict) else s:.2f}")
    return "\n".join(lines)
