"""lsdc train: the cache -> per-slice timm backbone + slice aggregator + level embedding + prior-initialised head.

Never imports pydicom or dask.
"""
