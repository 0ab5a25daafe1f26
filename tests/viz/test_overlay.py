"""Overlays, 3D montages and grids: colour limits, slice choice, constant maps, files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from PIL import Image

from trustmap.data.io import LoadedImage
from trustmap.viz import DIVERGING_CMAP, SEQUENTIAL_CMAP, grid, max_slices, montage, overlay


def _map_image(fig: Figure, panel: int = 0):
    """The attribution layer (drawn last) of one panel."""
    return fig.axes[panel].images[-1]


def test_overlay_signed_uses_symmetric_diverging_limits(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    image = rng.random((16, 20))
    attr = rng.standard_normal((16, 20))
    attr[0, 0] = 50.0  # one outlier, which the percentile clips away
    path = tmp_path / "overlay.png"
    fig = overlay(image, attr, path, title="saliency", percentile=95.0)
    assert isinstance(fig, Figure)
    layer = _map_image(fig)
    assert layer.colorbar is not None
    vmax = np.percentile(np.abs(attr), 95.0)
    assert layer.colorbar.mappable.get_clim() == pytest.approx((-vmax, vmax))
    assert vmax < 10.0
    assert layer.get_cmap().name == DIVERGING_CMAP
    assert fig.get_suptitle() == "saliency"
    with Image.open(path) as png:
        assert png.format == "PNG" and png.size[0] > 100
    assert [p.name for p in tmp_path.iterdir()] == ["overlay.png"]


def test_overlay_unsigned_uses_sequential_limits() -> None:
    attr = np.linspace(0.0, 1.0, 100).reshape(10, 10) + 2.0
    layer = _map_image(overlay(np.zeros((10, 10)), attr, percentile=90.0))
    assert layer.get_cmap().name == SEQUENTIAL_CMAP
    assert layer.get_clim() == pytest.approx((2.0, np.percentile(attr, 90.0)))
    # Opacity follows the value: transparent at the lower limit, alpha at the upper one.
    opacity = layer.get_alpha()
    assert opacity[0, 0] == 0.0 and opacity[-1, -1] == pytest.approx(0.5)


def test_signed_override_and_opacity_zero_where_map_is_zero() -> None:
    attr = np.zeros((6, 6))
    attr[1, 1], attr[4, 4] = 2.0, -1.0
    signed = _map_image(overlay(np.ones((6, 6)), attr, percentile=100.0))
    assert signed.get_clim() == (-2.0, 2.0)
    opacity = signed.get_alpha()
    assert opacity[0, 0] == 0.0 and opacity[1, 1] == 0.5 and opacity[4, 4] == 0.25
    forced = _map_image(overlay(np.ones((6, 6)), attr, signed=False, percentile=100.0))
    assert forced.get_cmap().name == SEQUENTIAL_CMAP and forced.get_clim() == (-1.0, 2.0)
    positive = _map_image(overlay(np.ones((6, 6)), np.abs(attr), signed=True, percentile=100.0))
    assert positive.get_cmap().name == DIVERGING_CMAP and positive.get_clim() == (-2.0, 2.0)


@pytest.mark.parametrize("value", [0.0, 3.5])
def test_constant_map_is_drawn_without_nans(tmp_path: Path, value: float) -> None:
    path = tmp_path / "flat.png"
    fig = overlay(np.random.default_rng(1).random((8, 8)), np.full((8, 8), value), path)
    layer = _map_image(fig)
    low, high = layer.get_clim()
    assert np.isfinite([low, high]).all() and low < value < high
    assert np.isfinite(layer.get_alpha()).all()
    assert np.isfinite(layer.norm(layer.get_array())).all()
    assert "constant map" in fig.get_suptitle()
    with Image.open(path) as png:
        png.load()


def test_channels_are_summed_for_maps_and_averaged_for_images() -> None:
    rgb = torch.rand(1, 3, 8, 8)
    attr = torch.randn(1, 3, 8, 8)
    fig = overlay(rgb, attr)
    layer = _map_image(fig)
    np.testing.assert_allclose(layer.get_array(), attr[0].double().sum(0).numpy(), rtol=1e-6)
    np.testing.assert_allclose(
        fig.axes[0].images[0].get_array(), rgb[0].double().mean(0).numpy(), rtol=1e-6
    )
    assert len(fig.axes) == 2  # one panel, one colour bar: not mistaken for a volume


def test_colour_loaded_image_with_a_single_channel_map() -> None:
    image = LoadedImage(np.random.default_rng(2).random((3, 5, 5)), (1.0, 1.0), is_color=True)
    fig = overlay(image, np.ones((1, 5, 5)) * np.arange(5))
    assert len(fig.axes) == 2
    assert _map_image(fig).get_array().shape == (5, 5)


def test_max_slices_finds_the_largest_magnitude() -> None:
    attr = np.zeros((5, 6, 7))
    attr[1, 2, 3] = 4.0
    attr[3, 4, 5] = -9.0
    assert max_slices(attr) == (3, 4, 5)
    assert max_slices(torch.from_numpy(attr)) == (3, 4, 5)
    with pytest.raises(ValueError, match=r"\(D, H, W\)"):
        max_slices(np.zeros((4, 4)))


def test_montage_shows_three_planes_through_the_peak(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    volume = rng.random((9, 10, 11))
    attr = rng.random((9, 10, 11))
    attr[2, 7, 4] = 5.0
    path = tmp_path / "montage.png"
    fig = overlay(volume[None], attr[None], path)  # (1, D, H, W): dispatched to montage
    panels = [ax for ax in fig.axes if ax.images]
    assert len(panels) == 3
    assert [ax.get_title() for ax in panels] == ["axial d=2", "coronal h=7", "sagittal w=4"]
    expected = [attr[2], attr[:, 7, :], attr[:, :, 4]]
    for ax, plane in zip(panels, expected):
        np.testing.assert_array_equal(ax.images[-1].get_array(), plane)
    np.testing.assert_array_equal(panels[1].images[0].get_array(), volume[:, 7, :])
    # One scale for all panels, from the whole volume.
    clims = {ax.images[-1].get_clim() for ax in panels}
    assert clims == {(attr.min(), np.percentile(attr, 99.0))}
    with Image.open(path) as png:
        assert png.format == "PNG"


def test_montage_at_and_spacing_and_constant() -> None:
    fig = montage(None, np.zeros((4, 5, 6)), at=(1, 2, 3), spacing=(3.0, 1.0, 0.5))
    panels = [ax for ax in fig.axes if ax.images]
    assert [ax.get_title() for ax in panels] == ["axial d=1", "coronal h=2", "sagittal w=3"]
    assert panels[0].get_aspect() == pytest.approx(2.0)  # H spacing / W spacing
    assert panels[2].get_aspect() == pytest.approx(3.0)  # D spacing / H spacing
    assert "constant map" in fig.get_suptitle()
    with pytest.raises(ValueError, match="at must be"):
        montage(None, np.zeros((4, 5, 6)), at=(4, 0, 0))


def test_grid_one_panel_per_method(tmp_path: Path) -> None:
    image = np.random.default_rng(4).random((8, 8))
    maps = [np.random.default_rng(5).standard_normal((8, 8)), np.ones((8, 8)), np.eye(8)]
    path = tmp_path / "grid.png"
    fig = grid(image, maps, ["saliency", "flat", "eye"], path, ncols=2)
    panels = [ax for ax in fig.axes if ax.images]
    assert [ax.get_title() for ax in panels] == ["saliency", "flat (constant map)", "eye"]
    assert panels[0].images[-1].get_cmap().name == DIVERGING_CMAP
    assert panels[2].images[-1].get_cmap().name == SEQUENTIAL_CMAP
    assert path.exists()
    volume_fig = grid(None, [np.arange(6 * 4 * 4.0).reshape(6, 4, 4)], ["vol"])
    assert [ax.get_title() for ax in volume_fig.axes if ax.images] == ["vol (d=5)"]


def test_bad_inputs_are_named() -> None:
    with pytest.raises(ValueError, match="differ"):
        overlay(np.zeros((8, 8)), np.zeros((8, 9)))
    bad = np.zeros((8, 8))
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="attribution contains 1 NaN"):
        overlay(np.zeros((8, 8)), bad)
    with pytest.raises(ValueError, match="pass one sample"):
        overlay(None, np.zeros((2, 3, 8, 8)))
    with pytest.raises(ValueError, match="percentile"):
        overlay(None, np.eye(4), percentile=0)
    with pytest.raises(ValueError, match="got 1 titles for 2 maps"):
        grid(None, [np.eye(3), np.eye(3)], ["a"])
