"""lsdc cache: the on-disk contract between prep (writes) and train/notebooks (read).

Depends on numpy, zarr, pandas and pyarrow only.
"""
