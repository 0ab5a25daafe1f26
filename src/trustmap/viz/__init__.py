"""Visualisation: attribution overlays, 3D montages and method grids (matplotlib, lazily)."""

from trustmap.viz.overlay import (
    DIVERGING_CMAP,
    SEQUENTIAL_CMAP,
    grid,
    max_slices,
    montage,
    overlay,
)

__all__ = ["DIVERGING_CMAP", "SEQUENTIAL_CMAP", "grid", "max_slices", "montage", "overlay"]
