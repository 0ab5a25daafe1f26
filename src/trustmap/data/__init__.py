"""Data: reading medical images (DICOM, NIfTI, PNG/JPEG, NPY) and saving maps."""

from trustmap.data.io import WINDOW_PRESETS, LoadedImage, apply_window, load, save_map

__all__ = ["WINDOW_PRESETS", "LoadedImage", "apply_window", "load", "save_map"]
