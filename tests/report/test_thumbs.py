"""camserve.report.thumbs: small thumbnails made once, from the bounded decoder, never a crash."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from camserve.report.job import Sources
from camserve.report.thumbs import (IMAGE, MASK, MASK_ALPHA, MASK_SIDE, OVERLAY, Thumbnailer,
                                    palette, thumb_key, thumb_rel)
from camserve.testing.hostile import hostile_corpus


def _write(path: Path, img: Image.Image, fmt: str = "PNG") -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, fmt)
    return str(path)


def _noise(size: tuple[int, int], seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8), "RGB")


def _open(path: Path) -> Image.Image:
    img = Image.open(path)
    img.load()
    return img


@pytest.fixture()
def out(tmp_path: Path) -> Path:
    (tmp_path / "job").mkdir()
    return tmp_path / "job"


def test_image_and_overlay_thumbnails_then_nothing_twice(tmp_path: Path, out: Path) -> None:
    src = Sources(image=_write(tmp_path / "in" / "a.png", _noise((300, 200))),
                  overlay=_write(out / "in" / "a.png.overlay.png", _noise((300, 200), 1)))
    t = Thumbnailer(out, 64)
    key = thumb_key("in/a.png")
    p = t.make(key, src)
    assert (p.flags, p.made, p.failures) == (IMAGE | OVERLAY, 2, [])
    for kind in "io":
        thumb = _open(out / thumb_rel(key, kind, 64))
        assert thumb.format == "JPEG" and thumb.size == (64, 43)
    before = {kind: os.stat(out / thumb_rel(key, kind, 64)).st_mtime_ns for kind in "io"}
    again = t.make(key, src)
    assert (again.flags, again.made) == (IMAGE | OVERLAY, 0)
    assert before == {kind: os.stat(out / thumb_rel(key, kind, 64)).st_mtime_ns for kind in "io"}
    # a newer overlay (a resumed job wrote it again) is made again; the image is not
    later = before["o"] + 10**9
    os.utime(src.overlay, ns=(later, later))
    assert t.make(key, src).made == 1
    # another size is another file
    assert Thumbnailer(out, 32).make(key, src).made == 2


def test_small_images_are_not_enlarged(tmp_path: Path, out: Path) -> None:
    src = Sources(image=_write(tmp_path / "a.png", _noise((20, 10))))
    key = thumb_key("a")
    assert Thumbnailer(out, 128).make(key, src).flags == IMAGE
    assert _open(out / thumb_rel(key, "i", 128)).size == (20, 10)


def test_overlay_made_from_the_heatmap_when_the_job_saved_none(tmp_path: Path, out: Path) -> None:
    grey = Image.new("RGB", (80, 80), (128, 128, 128))
    hm = np.zeros((80, 80), np.uint8)
    hm[:40] = 255
    src = Sources(image=_write(tmp_path / "a.png", grey),
                  heatmap=_write(out / "a.png.heatmap.png", Image.fromarray(hm, "L")))
    key = thumb_key("a.png")
    assert Thumbnailer(out, 40).make(key, src).flags == IMAGE | OVERLAY
    over = np.asarray(_open(out / thumb_rel(key, "o", 40))).astype(int)
    assert over[5, 20, 0] > over[5, 20, 2] + 60      # hot top: red over grey
    assert over[35, 20, 2] > over[35, 20, 0] + 60    # cold bottom: blue over grey
    # no image at all: the colour-mapped heatmap alone
    src2 = Sources(image=str(tmp_path / "missing.png"), heatmap=src.heatmap)
    p = Thumbnailer(out, 40).make(thumb_key("b.png"), src2)
    assert p.flags == OVERLAY and p.missing_original and p.failures[0].startswith(
        "image: UnreadableFile: cannot read file: No such file")


_CORPUS = hostile_corpus()
#: the corpus without the entries that decode to tens of megapixels (valid, only slow here)
_CASES = sorted(k for k, v in _CORPUS.items() if (v.pixels or 0) <= 4_000_000
                or v.outcome().status != 200)


def test_every_hostile_file_as_image_overlay_and_heatmap_is_a_reason_or_a_thumbnail(
        tmp_path: Path, out: Path) -> None:
    t = Thumbnailer(out, 32)
    for name in _CASES:
        case = _CORPUS[name]
        path = tmp_path / "hostile" / name
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(case.data)
        art = out / "art" / name
        art.parent.mkdir(exist_ok=True)
        art.write_bytes(case.data)
        for src, flag in ((Sources(image=str(path)), IMAGE), (Sources(overlay=str(art)), OVERLAY),
                          (Sources(heatmap=str(art)), OVERLAY)):
            p = t.make(thumb_key(name + str(flag) + str(src.heatmap)), src)
            expected = case.outcome()
            if expected.status == 200:
                assert (p.flags, p.failures) == (flag, []), name
            else:
                assert p.flags == 0 and len(p.failures) == 1, name
                assert f": {expected.type}: " in p.failures[0], (name, p.failures)


def test_special_large_and_unwritable(tmp_path: Path, out: Path) -> None:
    os.mkfifo(tmp_path / "fifo.png")
    big = tmp_path / "big.png"
    _write(big, _noise((400, 400)))
    t = Thumbnailer(out, 32, max_file_size=1000, max_pixels=10_000)
    p = t.make(thumb_key("f"), Sources(image=str(tmp_path / "fifo.png")))   # never blocks
    assert p.flags == 0 and p.failures[0].startswith("image: NotARegularFile: not a regular file")
    p = t.make(thumb_key("b"), Sources(image=str(big)))
    assert p.failures[0].startswith("image: FileTooLarge: file too large")
    small = _write(tmp_path / "wide.png", Image.new("RGB", (200, 60)))
    assert Thumbnailer(out, 32, max_pixels=10_000).make(
        thumb_key("w"), Sources(image=small)).failures[0].startswith("image: ImageTooLarge")
    # thumbs/ is a symlink out of the job: refused, nothing written through it
    outside = tmp_path / "outside"
    outside.mkdir()
    (out / "thumbs").symlink_to(outside)
    p = Thumbnailer(out, 32).make(thumb_key("x"), Sources(image=small))
    assert p.flags == 0 and p.failures[0].startswith("image: UnwritableOutput")
    assert list(outside.iterdir()) == []


def test_a_broken_overlay_beside_a_good_image(tmp_path: Path, out: Path) -> None:
    (out / "a.overlay.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(40))
    p = Thumbnailer(out, 32).make(thumb_key("a"), Sources(
        image=_write(tmp_path / "a.png", _noise((50, 50))), overlay=str(out / "a.overlay.png")))
    assert p.flags == IMAGE and len(p.failures) == 1 and p.failures[0].startswith(
        "overlay: InvalidImage")


def test_segmentation_mask_colours_and_legend_palette(tmp_path: Path, out: Path) -> None:
    index = np.zeros((60, 90), np.uint8)
    index[:, 30:60] = 1
    index[:, 60:] = 7
    mask = _write(out / "a.png.mask.png", Image.fromarray(index, "L"))
    image = _write(tmp_path / "a.png", Image.new("RGB", (90, 60), (255, 255, 255)))
    key = thumb_key("a.png")
    heatmap = _write(out / "a.png.heatmap.png", Image.new("L", (90, 60), 200))
    p = Thumbnailer(out, 45).make(key, Sources(image=image, mask=mask, heatmap=heatmap))
    assert p.flags == IMAGE | OVERLAY | MASK and p.made == 4          # i, s, m, o
    rgba = np.asarray(_open(out / thumb_rel(key, "m", MASK_SIDE)))
    assert rgba.shape == (60, 90, 4)
    assert rgba[0, 0, 3] == 0                                        # class 0: transparent
    assert tuple(rgba[0, 40]) == (*palette(1), MASK_ALPHA)
    assert tuple(rgba[0, 80]) == (*palette(7), MASK_ALPHA)
    thumb = np.asarray(_open(out / thumb_rel(key, "s", 45))).astype(int)
    assert abs(thumb[10, 5] - 255).max() < 12                        # white image shows through
    assert thumb[10, 25, 0] > thumb[10, 25, 1] + 40                  # class 1 is red-ish over it
    # the CAM's overlay is its own thumbnail; made again only when a source is newer
    assert _open(out / thumb_rel(key, "o", 45)).size == (45, 30)
    again = Thumbnailer(out, 45).make(key, Sources(image=image, mask=mask, heatmap=heatmap))
    assert again.flags == p.flags and again.made == 0
    # a mask that cannot be read: the image and the overlay are there all the same
    Path(mask).write_bytes(b"not a png")
    broken = Thumbnailer(out, 45).make(key, Sources(image=image, mask=mask, heatmap=heatmap))
    assert broken.flags == IMAGE | OVERLAY and broken.failures[0].startswith("mask: InvalidImage")
    assert len({palette(i) for i in range(256)}) == 256


def test_jpeg_originals_with_exif_orientation_are_upright(tmp_path: Path, out: Path) -> None:
    data = _CORPUS["exif_orientation_6"]
    path = tmp_path / "o.jpg"
    path.write_bytes(data.data)
    key = thumb_key("o")
    Thumbnailer(out, 128).make(key, Sources(image=str(path)))
    assert _open(out / thumb_rel(key, "i", 128)).size == data.size
