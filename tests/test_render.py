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


def test_overlay_in_bands_equals_one_blend(monkeypatch):
    import camserve.render as render

    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (70, 50, 3), dtype=np.uint8), "RGB")
    hm = rng.integers(0, 256, (70, 50), dtype=np.uint8)
    want = Image.blend(img, Image.fromarray(JET[hm], "RGB"), 0.4)
    monkeypatch.setattr(render, "BAND_PIXELS", 50 * 9)  # 9 rows a band, the last one short
    got = render.overlay(img, hm, 0.4)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    small = render.overlay(img.resize((25, 35)), hm)  # the image is resized to the map
    assert small.size == (50, 70)


def test_png_encoding_stops_past_its_byte_limit():
    from camserve.render import OutputTooLarge, png_bytes

    noise = Image.fromarray(np.random.default_rng(1).integers(0, 256, (400, 400, 3),
                                                               dtype=np.uint8), "RGB")
    full = png_bytes(noise)
    assert png_bytes(noise, max_bytes=len(full)) == full
    with pytest.raises(OutputTooLarge) as e:
        png_bytes(noise, max_bytes=10_000)
    assert e.value.size > 10_000 and e.value.size < len(full)


def test_capped_size_resize_and_box_scaling():
    from camserve.render import capped_size, resize_map, scale_box

    assert capped_size((640, 480), 2048) == (640, 480)
    assert capped_size((6000, 6000), 2048) == (2048, 2048)
    assert capped_size((100000, 3), 2048) == (2048, 1)
    hm = np.zeros((10, 20), np.uint8)
    hm[2:5, 4:8] = 200
    assert resize_map(hm, (20, 10)) is hm
    big = resize_map(hm, (200, 100))
    assert big.shape == (100, 200) and big.dtype == np.uint8 and big.max() == 200
    box = bbox_from_heatmap(hm)
    assert scale_box(box, (20, 10), (20, 10)) == box
    x0, y0, x1, y1 = scale_box(box, (20, 10), (200, 100))
    assert (x0, y0, x1, y1) == (40, 20, 80, 50)
    assert scale_box([0, 0, 3, 3], (3, 3), (10, 10)) == [0, 0, 10, 10]
    assert scale_box(None, (3, 3), (10, 10)) is None
