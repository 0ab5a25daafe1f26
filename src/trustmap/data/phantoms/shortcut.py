"""The shortcut token: a laterality-marker-like letter in a bright square, burned into a corner.

Real radiographs carry a lead "L" or "R" marker; a classifier can learn where the marker
sits instead of the disease (a Clever-Hans shortcut, Borys et al. 2023, Borys et al. 2023). Here
the token of a positive case sits in the top-left corner as an "R" and that of a negative
case in the top-right corner as an "L" with probability ``p`` (the agreement rate); with
probability ``1 - p`` it sits in the other class's corner. Every case of a dataset with a
shortcut carries a token, so only its position and letter can inform a classifier.

The token mask is the whole square (letter included). In 3D the square is extruded over
a slab of slices around the middle of the volume.
"""

from __future__ import annotations

import numpy as np

__all__ = ["CORNERS", "GLYPHS", "draw_token", "letter_bitmap", "token_side"]

# 5 x 7 bitmaps, one string per row ("1" = stroke).
GLYPHS: dict[str, tuple[str, ...]] = {
    "L": ("10000", "10000", "10000", "10000", "10000", "10000", "11111"),
    "R": ("11110", "10001", "10001", "11110", "10100", "10010", "10001"),
}

#: corner and letter of the token that agrees with each label.
CORNERS: dict[int, tuple[str, str]] = {1: ("top-left", "R"), 0: ("top-right", "L")}


def token_side(shape2d: tuple[int, int]) -> int:
    """Side of the token square in pixels for an in-plane shape ``(H, W)``."""
    return max(7, round(0.11 * min(shape2d)))


def letter_bitmap(letter: str, height: int, width: int) -> np.ndarray:
    """The glyph of ``letter`` resampled (nearest) to ``(height, width)``, bool."""
    glyph = np.array([[c == "1" for c in row] for row in GLYPHS[letter]], dtype=bool)
    # Sample positions spread from the first to the last glyph row/column, so the strokes
    # at the edges (the foot of the L) survive any downsampling.
    rows = np.rint(np.linspace(0, glyph.shape[0] - 1, height)).astype(int)
    cols = np.rint(np.linspace(0, glyph.shape[1] - 1, width)).astype(int)
    return glyph[np.ix_(rows, cols)]


def draw_token(
    shape: tuple[int, ...], rng: np.random.Generator, label: int, p: float
) -> tuple[np.ndarray, np.ndarray, bool]:
    """Place a token for a case of ``label``.

    Parameters
    ----------
    shape
        ``(H, W)`` or ``(D, H, W)``.
    rng
        The case's token stream (independent of its image stream).
    label
        The case's label (0 or 1).
    p
        Probability that the token sits in the corner of ``label``.

    Returns
    -------
    token_mask, letter_mask, agrees
        bool arrays of ``shape``: the square and the letter strokes within it; whether the
        token agrees with the label.
    """
    agrees = bool(rng.random() < p)
    corner, letter = CORNERS[label if agrees else 1 - label]
    h, w = shape[-2:]
    side = token_side((h, w))
    base = max(1, round(0.03 * min(h, w)))
    dy, dx = rng.integers(0, base + 1, size=2)
    top = base + int(dy)
    left = base + int(dx) if corner == "top-left" else w - base - int(dx) - side
    pad = max(1, side // 6)
    token2d = np.zeros((h, w), dtype=bool)
    letter2d = np.zeros((h, w), dtype=bool)
    token2d[top : top + side, left : left + side] = True
    inner = side - 2 * pad
    letter2d[top + pad : top + pad + inner, left + pad : left + pad + inner] = letter_bitmap(
        letter, inner, inner
    )
    if len(shape) == 2:
        return token2d, letter2d, agrees
    depth = shape[0]
    slab = max(3, round(0.4 * depth))
    start = (depth - slab) // 2 + int(rng.integers(-(depth // 10), depth // 10 + 1))
    start = int(np.clip(start, 0, depth - slab))
    token = np.zeros(shape, dtype=bool)
    letters = np.zeros(shape, dtype=bool)
    token[start : start + slab] = token2d
    letters[start : start + slab] = letter2d
    return token, letters, agrees
