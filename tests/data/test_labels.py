"""Label formats: SIIM-ACR run-length masks, RSNA boxes, box rasterization, CSV tables."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from trustmap.data.labels import (
    boxes_to_mask,
    parse_rle,
    read_rsna_boxes,
    read_table,
    rle_decode,
    rle_encode,
)


def reference_decode(rle: str, height: int, width: int) -> np.ndarray:
    """The convention spelled out pixel by pixel: relative starts, pixels numbered down
    the columns from 0 (pixel p is row p % height of column p // height)."""
    mask = np.zeros((height, width), dtype=bool)
    if rle.strip() == "-1":
        return mask
    numbers = [int(t) for t in rle.split()]
    position = 0
    for start, length in zip(numbers[0::2], numbers[1::2]):
        position += start
        for p in range(position, position + length):
            mask[p % height, p // height] = True
        position += length
    return mask


# ---------------------------------------------------------------------------------------
# run-length encoding


def test_hand_worked_example_square() -> None:
    # . x .     column 0: nothing; column 1: rows 0-1 = pixels 3, 4;
    # . x x     column 2: rows 1-2 = pixels 7, 8. Runs (3, 2) and (7, 2); the second
    # . . x     starts 7 - (3 + 2) = 2 pixels after the first ends.
    expected = np.array([[0, 1, 0], [0, 1, 1], [0, 0, 1]], dtype=bool)
    np.testing.assert_array_equal(rle_decode("3 2 2 2", 3, 3), expected)
    assert rle_encode(expected) == "3 2 2 2"
    assert rle_encode(expected, relative=False) == "4 2 8 2"  # absolute, 1-based
    np.testing.assert_array_equal(rle_decode("4 2 8 2", 3, 3, relative=False), expected)


def test_hand_worked_example_not_square() -> None:
    # height 2, width 4. "1 3 2 1": pixels 1, 2, 3 then, from the end (4), 2 further: 6.
    # p1 = (row 1, col 0), p2 = (0, 1), p3 = (1, 1), p6 = (0, 3).
    expected = np.array([[0, 1, 0, 1], [1, 1, 0, 0]], dtype=bool)
    decoded = rle_decode("1 3 2 1", 2, 4)
    assert decoded.shape == (2, 4) and decoded.dtype == bool
    np.testing.assert_array_equal(decoded, expected)
    np.testing.assert_array_equal(reference_decode("1 3 2 1", 2, 4), expected)


@pytest.mark.parametrize("shape", [(1, 1), (5, 7), (16, 9), (32, 32)])
def test_round_trip_random_masks(shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(sum(shape))
    for density in (0.05, 0.5, 0.95):
        mask = rng.random(shape) < density
        text = rle_encode(mask)
        np.testing.assert_array_equal(rle_decode(text, *shape), mask)
        np.testing.assert_array_equal(reference_decode(text, *shape), mask)
        absolute = rle_encode(mask, relative=False)
        np.testing.assert_array_equal(rle_decode(absolute, *shape, relative=False), mask)


def test_runs_touching_the_first_and_last_pixel() -> None:
    mask = np.zeros((4, 3), dtype=bool)
    mask[0, 0] = mask[1, 0] = True  # pixels 0, 1
    mask[3, 2] = True  # the last pixel, 11
    assert rle_encode(mask) == "0 2 9 1"
    np.testing.assert_array_equal(rle_decode("0 2 9 1", 4, 3), mask)
    full = np.ones((4, 3), dtype=bool)
    assert rle_encode(full) == "0 12"
    assert rle_decode("0 12", 4, 3).all()


def test_encode_accepts_tensors_and_values() -> None:
    mask = np.zeros((3, 3), dtype=np.uint8)
    mask[1, 1] = 255
    assert rle_encode(mask) == rle_encode(torch.from_numpy(mask > 0)) == "4 1"


def test_minus_one_and_empty_mean_no_finding() -> None:
    for text in ("-1", " -1", "", "  "):
        decoded = rle_decode(text, 4, 5)
        assert decoded.shape == (4, 5) and not decoded.any()
    assert rle_encode(np.zeros((4, 5))) == "-1"


def test_union_of_several_rows() -> None:
    a, b = "0 3", "5 2"  # pixels 0-2 and 5-6 of a 4x2 image
    union = rle_decode(a, 4, 2) | rle_decode(b, 4, 2)
    expected = np.zeros((4, 2), dtype=bool)
    expected[0:3, 0] = True
    expected[1:3, 1] = True
    np.testing.assert_array_equal(union, expected)


def test_overrun_names_the_pair_and_position() -> None:
    assert rle_decode("0 9", 3, 3).all()
    with pytest.raises(ValueError, match=r"pair 1 .* pixels 0-9, past the last pixel 8 of a 3x3"):
        rle_decode("0 10", 3, 3)
    with pytest.raises(ValueError, match=r"pair 2 \(numbers 3-4\) covers pixels 8-9"):
        rle_decode("1 2 5 2", 3, 3)
    assert rle_decode("9 1", 3, 3, relative=False)[2, 2]  # 1-based 9 is the last pixel
    with pytest.raises(ValueError, match="past the last pixel 8"):
        rle_decode("10 1", 3, 3, relative=False)


def test_malformed_strings() -> None:
    with pytest.raises(ValueError, match=r"number 2 \('x'\) is not a non-negative integer"):
        rle_decode("3 x", 3, 3)
    with pytest.raises(ValueError, match="odd count"):
        rle_decode("3 2 1", 3, 3)
    with pytest.raises(ValueError, match=r"number 1 \('-3'\)"):
        parse_rle("-3 2")
    with pytest.raises(ValueError, match="1-based"):
        rle_decode("0 2", 3, 3, relative=False)
    with pytest.raises(ValueError, match="height must be a positive integer"):
        rle_decode("-1", 0, 3)
    with pytest.raises(ValueError, match="2D"):
        rle_encode(np.zeros((2, 2, 2)))


# ---------------------------------------------------------------------------------------
# boxes


def test_boxes_to_mask_integer_boxes_and_clipping() -> None:
    mask = boxes_to_mask([(1, 2, 3, 2)], 6, 7)
    expected = np.zeros((6, 7), dtype=bool)
    expected[2:4, 1:4] = True  # rows y..y+h-1, columns x..x+w-1
    np.testing.assert_array_equal(mask, expected)
    # Partly outside on the top-left and on the bottom-right: clipped, no wrap-around.
    clipped = boxes_to_mask([(-2, -3, 4, 5), (5, 4, 10, 10)], 6, 7)
    expected = np.zeros((6, 7), dtype=bool)
    expected[0:2, 0:2] = True
    expected[4:6, 5:7] = True
    np.testing.assert_array_equal(clipped, expected)
    assert not boxes_to_mask([(20, 20, 3, 3), (-9, 0, 4, 4)], 6, 7).any()
    assert not boxes_to_mask([], 6, 7).any()


def test_boxes_to_mask_float_and_tiny_boxes() -> None:
    # Pixel centres at c + 0.5 inside [0.6, 2.6) are columns 1 and 2 (1.5, 2.5).
    mask = boxes_to_mask([(0.6, 0.6, 2.0, 2.0)], 4, 4)
    assert mask[1:3, 1:3].all() and mask.sum() == 4
    # A box too small to hold a pixel centre keeps the pixel under its centre.
    tiny = boxes_to_mask([(2.1, 1.1, 0.2, 0.2)], 4, 4)
    assert tiny.sum() == 1 and tiny[1, 2]


def test_boxes_to_mask_3d() -> None:
    mask = boxes_to_mask([(1, 0, 2, 2, 3, 2)], 3, 4, depth=6)
    expected = np.zeros((6, 3, 4), dtype=bool)
    expected[3:5, 0:2, 1:3] = True
    np.testing.assert_array_equal(mask, expected)


def test_boxes_to_mask_errors() -> None:
    with pytest.raises(ValueError, match="box 0 has 3 values"):
        boxes_to_mask([(1, 2, 3)], 4, 4)
    with pytest.raises(ValueError, match="negative size"):
        boxes_to_mask([(1, 2, -3, 2)], 4, 4)
    with pytest.raises(ValueError, match="non-finite"):
        boxes_to_mask([(1, float("nan"), 3, 2)], 4, 4)


RSNA_HEADER = "patientId,x,y,width,height,Target\n"


def test_read_rsna_boxes(tmp_path: Path) -> None:
    path = tmp_path / "stage_2_train_labels.csv"
    path.write_text(
        RSNA_HEADER
        + "p1,264.0,152.0,213.0,379.0,1\n"
        + "p2,,,,,0\n"
        + "p1,562.0,152.0,256.0,453.0,1\n"
        + "p3,10,20,30,40,1\n"
    )
    boxes = read_rsna_boxes(path)
    assert list(boxes) == ["p1", "p2", "p3"]
    assert boxes["p1"] == [(264.0, 152.0, 213.0, 379.0), (562.0, 152.0, 256.0, 453.0)]
    assert boxes["p2"] == []
    assert boxes["p3"] == [(10.0, 20.0, 30.0, 40.0)]


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ("p1,1,2,3,4,2\n", r"row 2: Target is '2'; expected 0 or 1"),
        ("p1,1,2,,4,1\n", r"row 2: Target is 1 but the box .* is incomplete"),
        ("p1,1,2,0,4,1\n", r"row 2: box width and height must be positive"),
        ("p1,1,2,3,4,0\n", r"row 2: Target is 0 but the row has a box"),
        ("p1,1,2,3,4,1\np1,,,,,0\n", r"row 3: patient p1 has Target 0 here but 1 in row 2"),
        ("p1,a,2,3,4,1\n", r"row 2: x is 'a', not a number"),
        (",1,2,3,4,1\n", r"row 2: empty patientId"),
    ],
)
def test_rsna_errors_name_the_row(tmp_path: Path, rows: str, message: str) -> None:
    path = tmp_path / "labels.csv"
    path.write_text(RSNA_HEADER + rows)
    with pytest.raises(ValueError, match=message):
        read_rsna_boxes(path)


# ---------------------------------------------------------------------------------------
# CSV tables


def test_read_table_strips_and_numbers_rows(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text("\ufeffImageId, EncodedPixels\n\na, -1\nb,1 2\nc\n")
    header, rows = read_table(path, required=("ImageId", "EncodedPixels"))
    assert header == ["ImageId", "EncodedPixels"]
    assert [(r.line, r.values) for r in rows] == [
        (3, {"ImageId": "a", "EncodedPixels": "-1"}),
        (4, {"ImageId": "b", "EncodedPixels": "1 2"}),
        (5, {"ImageId": "c", "EncodedPixels": ""}),
    ]


def test_read_table_errors(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_bytes(b"")
    with pytest.raises(ValueError, match=r"t\.csv: is empty \(0 bytes\)"):
        read_table(path)
    path.write_text("image,label\n")
    with pytest.raises(ValueError, match=r"t\.csv: has a header \(image, label\) but no data"):
        read_table(path)
    path.write_text("image\na.png\n")
    with pytest.raises(ValueError, match=r"lacks the required column.*label"):
        read_table(path, required=("image", "label"))
    path.write_text("image,label\na.png,0\nb.png,1,extra\n")
    with pytest.raises(ValueError, match=r"t\.csv row 3: has 3 fields but the header has 2"):
        read_table(path)
    path.write_text("image,image\na,b\n")
    with pytest.raises(ValueError, match="appears twice"):
        read_table(path)
    path.write_bytes(b"\xff\xfe\x00garbage\x80")
    with pytest.raises(ValueError, match="not a UTF-8 text CSV"):
        read_table(path)
    with pytest.raises(FileNotFoundError, match=r"missing\.csv"):
        read_table(tmp_path / "missing.csv")
