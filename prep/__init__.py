"""lsdc prep: raw DICOM series -> 7-slice, 3-window, CLAHE'd, mm-sized crops -> the Zarr cache. Never imports torch."""
