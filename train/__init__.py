"""lsdc train: the cache -> per-slice timm backbone + slice aggregator + level embedding + prior-initialised head.

Never imports pydicom or dask. `import train` is light (no torch); the loop is imported on first use:

    from train import TrainConfig, fit
    fit("cache/spinal", "runs/spinal", TrainConfig(epochs=10))
"""

from train.config import TrainConfig

__all__ = ["TrainConfig", "fit"]


def fit(*args, **kwargs):
    """train.loop.fit (imports torch and timm when called)."""
    from train.loop import fit as _fit

    return _fit(*args, **kwargs)
