"""Checkpoints: the one way lsdc writes and reads them, for every model it trains.

A checkpoint is a dict of tensors, numbers, strings, lists and dicts only, so it loads with
`torch.load(..., weights_only=True)` and nothing is unpickled (docs/reliability.md). Keys: `kind` (which model:
'grader', 'localiser'), `model`, `optimizer`, `scheduler`, `scaler`, `ema`, `rng`, `epoch`, `config`, `fold`, `state`,
`eval_with`, plus what the model's task adds for inference (the grader: `class_prior`, `crop_settings`).
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from cache.errors import InputError, MissingInput
from cache.io import atomic_write


def save_checkpoint(path: str | Path, ckpt: dict[str, Any]) -> None:
    """Write atomically: a kill mid-save leaves the previous checkpoint intact."""
    atomic_write(Path(path), lambda tmp: torch.save(ckpt, tmp))


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint without unpickling anything; a file that is not one is an InputError naming it."""
    path = Path(path)
    if not path.is_file():
        raise MissingInput(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, RuntimeError, ValueError) as e:
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise InputError(f"{path} is not an lsdc checkpoint (torch.load: {type(e).__name__}: {first})") from None
    if not isinstance(ckpt, dict) or not {"model", "config"} <= set(ckpt):
        raise InputError(f"{path} is a torch file but not an lsdc checkpoint (it lacks 'model' and 'config')")
    return ckpt


def checkpoint_kind(ckpt: dict[str, Any]) -> str:
    """Which model a checkpoint holds; checkpoints from before the localiser hold the grader."""
    return str(ckpt.get("kind", "grader"))


def model_from_checkpoint(ckpt: dict[str, Any] | str | Path) -> torch.nn.Module:
    """The model a checkpoint was validated with (its weight average when one was in use), in eval mode."""
    if not isinstance(ckpt, dict):
        ckpt = load_checkpoint(ckpt)
    from train.tasks import task_class

    model = task_class(checkpoint_kind(ckpt)).model_from_config(ckpt["config"])  # every weight: no download
    state = ckpt["ema"]["module"] if ckpt.get("eval_with") == "ema" else ckpt["model"]
    model.load_state_dict(state)
    return model.eval()
