"""Public shortcut for :mod:`trustmap.data.io`: ``trustmap.io.load(path)``."""

from trustmap.data.io import (
    SUFFIXES,
    WINDOW_PRESETS,
    LoadedImage,
    apply_window,
    load,
    save_map,
)

__all__ = ["SUFFIXES", "WINDOW_PRESETS", "LoadedImage", "apply_window", "load", "save_map"]
