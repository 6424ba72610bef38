"""camserve.render: PNG encodings, overlay, the Grad-CAM localisation box."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from camserve.render import JET, bbox_from_heatmap, colorize, heatmap_png, overlay_png


def test_heatmap_png_is_8bit_gray_of_same_size(open_image):
    hm = (np.arange(30 * 40) % 256).astype(np.uint8).reshape(30, 40)
    img = open_image(heatmap_png(hm))
    assert img.mode == "L" and img.size == (40, 30)
    assert (np.asarray(img) == hm).all()


def test_jet_table_runs_blue_to_red():
    assert JET.shape == (256, 3)
    assert JET[0, 2] > 100 and JET[0, 0] == 0 and JET[255, 0] > 100 and JET[255, 2] == 0
    assert colorize(np.full((2, 2), 255, np.uint8)).shape == (2, 2, 3)


def test_overlay_png_matches_image_size(open_image):
    img = Image.new("RGB", (40, 30), "gray")
    out = open_image(overlay_png(img, np.zeros((30, 40), np.uint8)))
    assert out.mode == "RGB" and out.size == (40, 30)


def test_bbox_largest_region_above_15_percent():
    hm = np.zeros((50, 80), np.uint8)
    hm[5:10, 5:10] = 255  # small, brightest blob
    hm[20:45, 30:70] = 100  # large blob, above 15 % of the max
    hm[0:3, 70:80] = 20  # below 15 % of 255: ignored
    assert bbox_from_heatmap(hm) == [30, 20, 70, 45]


def test_bbox_empty_map_is_none():
    assert bbox_from_heatmap(np.zeros((4, 4), np.uint8)) is None


@pytest.mark.parametrize("bad", [np.zeros((2, 2, 2), np.uint8), np.zeros((2, 2), np.float32)])
def test_bad_map_is_refused(bad):
    with pytest.raises(ValueError, match="invalid value for heatmap"):
        heatmap_png(bad)
