"""The run's plots (loss, per-class recall, BA, score, confusion matrix) and a short Markdown report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure  # a bare Figure draws to files without pyplot: a notebook's backend stays as it is

from cache.io import atomic_write, atomic_write_text, read_jsonl
from cache.rsna import LABELS, PROB_COLUMNS
from train.metrics import classification_metrics
from train.score import competition_score


def read_metrics(run_dir: str | Path) -> tuple[pd.DataFrame, list[dict]]:
    """(one row per epoch, the event records) from metrics.jsonl."""
    records = read_jsonl(Path(run_dir) / "metrics.jsonl")
    epochs = pd.DataFrame([r for r in records if r["type"] == "epoch"])
    return epochs, [r for r in records if r["type"] != "epoch"]


def _save(fig: Figure, path: Path) -> None:
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))


def _curves(epochs: pd.DataFrame, columns: dict[str, str], title: str, path: Path) -> None:
    fig = Figure(figsize=(6, 3.6))
    ax = fig.subplots()
    for fold, g in epochs.groupby("fold"):
        for col, label in columns.items():
            ax.plot(g["epoch"], g[col], marker=".", label=f"{label} (fold {fold})")
    ax.set(xlabel="epoch", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    _save(fig, path)


def _confusion(cm: np.ndarray, title: str, path: Path) -> None:
    norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    fig = Figure(figsize=(4.2, 3.8))
    ax = fig.subplots()
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    for (i, j), v in np.ndenumerate(cm):
        ax.text(j, i, f"{norm[i, j]:.2f}\n({v})", ha="center", va="center", fontsize=8,
                color="white" if norm[i, j] > 0.6 else "black")
    ax.set(xticks=range(3), yticks=range(3), xticklabels=LABELS, yticklabels=LABELS, xlabel="predicted",
           ylabel="true", title=title)
    _save(fig, path)


def write_report(run_dir: str | Path) -> Path:
    """plots/*.png and report.md from metrics.jsonl and oof.parquet."""
    run_dir = Path(run_dir)
    plots = run_dir / "plots"
    plots.mkdir(exist_ok=True)
    epochs, events = read_metrics(run_dir)
    recall = pd.DataFrame(epochs["recall"].tolist(), columns=LABELS, index=epochs.index, dtype=float)
    epochs = epochs.join(recall)
    _curves(epochs, {"train_loss": "train", "val_loss": "validation"}, "weighted cross entropy", plots / "loss.png")
    _curves(epochs, {k: k for k in LABELS}, "validation recall per class", plots / "recall.png")
    _curves(epochs, {"ba": "balanced accuracy"}, "validation balanced accuracy", plots / "ba.png")
    _curves(epochs, {"score": "competition score"}, "validation competition score (lower is better)",
            plots / "score.png")

    oof = pd.read_parquet(run_dir / "oof.parquet")
    y = oof["label"].to_numpy(dtype=np.int64)
    m = classification_metrics(y, oof[list(PROB_COLUMNS)].to_numpy())
    score = competition_score(oof)
    _confusion(np.array(m["confusion"]), "out-of-fold (best checkpoints)", plots / "confusion.png")

    cfg = json.loads((run_dir / "config.json").read_text())
    best = epochs[epochs["best"]].groupby("fold").tail(1)
    lines = [
        f"# Training report: {run_dir.name}", "",
        f"{cfg['backbone']}, aggregator `{cfg['aggregator']}`, conditions {', '.join(cfg['conditions'])}; "
        f"{cfg['slices']} slices at {cfg['image_size']} px; best rule `{cfg['best_rule']}`.", "",
        "## Out-of-fold (best checkpoint of each fold)", "",
        "| samples | BA | recall " + " / ".join(LABELS) + " | predicted counts | score |", "|---|---|---|---|---|",
        f"| {len(oof)} | {m['ba']:.3f} | " + " / ".join("-" if r is None else f"{r:.2f}" for r in m["recall"])
        + f" | {m['pred_counts']} | {score['score']:.4f} |", "",
        "Score parts: " + ", ".join(f"{k} {v:.4f}" for k, v in score.items() if k != "score" and np.isfinite(v)),
        "", "## Best epoch per fold", "", "| fold | epoch | BA | recall | val loss | score |",
        "|---|---|---|---|---|---|",
        *[f"| {r.fold} | {r.epoch} | {r.ba:.3f} | " + " / ".join("-" if v is None else f"{v:.2f}" for v in r.recall)
          + f" | {r.val_loss:.4f} | {r.score:.4f} |" for r in best.itertuples()],
        "", "## Events", "",
        *([f"- fold {e['fold']} epoch {e['epoch']}: {e['type']} "
           + (", ".join(e['classes']) if 'classes' in e else e.get('reason', '')) for e in events] or ["none"]),
        "", "## Plots", "",
        *[f"![{n}](plots/{n}.png)" for n in ("loss", "recall", "ba", "score", "confusion")], "",
    ]
    atomic_write_text(run_dir / "report.md", "\n".join(lines))
    return run_dir / "report.md"
