"""camserve.testing.hostile: every corpus entry gets exactly its stated answer from decode_image,
under the default settings, with every known format allowed, and under a tiny pixel limit."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from camserve.images import DEFAULT_FORMATS, KNOWN_FORMATS, ImageError, decode_image
from camserve.testing import hostile
from camserve.testing.hostile import HostileImage, Outcome, hostile_corpus, write_corpus

CORPUS = hostile_corpus()
ALL = tuple(sorted(KNOWN_FORMATS))


def _answer(case: HostileImage, **kw) -> tuple[Outcome, object]:
    try:
        img = decode_image(case.data, **kw)
    except ImageError as exc:
        return Outcome(exc.code, exc.type), exc
    return Outcome(200, None), img


def _check_image(case: HostileImage, img) -> None:
    assert img.mode == "RGB"
    if case.size is not None:
        assert img.size == case.size
    if case.center is not None:
        got = np.asarray(img)[img.height // 2, img.width // 2].astype(int)
        assert np.abs(got - np.asarray(case.center)).max() <= case.tolerance, (case.name, got)


@pytest.mark.parametrize("name", list(CORPUS))
def test_default_outcome(name: str):
    case = CORPUS[name]
    got, value = _answer(case)
    assert got == case.outcome() == (case.status, case.error_type), value
    if got.status == 200:
        _check_image(case, value)
    else:
        message = str(value)
        assert len(message) < 300
        if case.format and case.format not in DEFAULT_FORMATS and case.format not in ("MPO", "TGA"):
            assert f"unsupported image format {case.format} " in message
            assert "allowed formats: JPEG, PNG, WEBP, BMP, GIF, TIFF" in message


@pytest.mark.parametrize("name", [n for n, c in CORPUS.items() if not c.heavy])
def test_outcome_with_every_known_format(name: str):
    case = CORPUS[name]
    got, value = _answer(case, formats=ALL)
    assert got == case.outcome(formats=ALL), value
    if got.status == 200:
        _check_image(case, value)


@pytest.mark.parametrize("name", list(CORPUS))
def test_outcome_under_a_tiny_pixel_limit(name: str):
    case = CORPUS[name]
    got, value = _answer(case, max_pixels=50)
    assert got == case.outcome(max_pixels=50), value


def test_required_kinds_are_present():
    names = set(CORPUS)
    for needed in ("gif_bomb_8000", "png_bomb_10000", "jpeg_truncated_half", "png_truncated_half",
                   "webp_canvas_only", "webp_canvas_16384", "gif_20000_frames",
                   "tiff_strip_offset_past_end", "exif_orientation_9", "dds_outside_list",
                   "pcx_outside_list", "tga_outside_list", "sgi_outside_list", "qoi_outside_list",
                   "eps_outside_list", "ico_outside_list", "psd_outside_list",
                   "png_16bit_grey_mid", "tiff_float_unit", "png_palette", "png_rgba_transparent",
                   "jpeg_cmyk", "empty", "random_1k", "tiff_declares_100000"):
        assert needed in names
    statuses = {c.status for c in CORPUS.values()}
    assert statuses == {200, 400, 413}
    heavy = [c.name for c in CORPUS.values() if c.heavy]
    assert heavy == ["gif_bomb_6000", "gif_bomb_8000", "png_bomb_10000"]
    assert [n for n in heavy if CORPUS[n].status == 200] == ["gif_bomb_6000"]


def test_bombs_are_tiny_files():
    for name in ("gif_bomb_6000", "gif_bomb_8000", "webp_canvas_16384", "png_declares_65535"):
        assert len(CORPUS[name].data) < 200
    assert len(CORPUS["png_bomb_10000"].data) < 20_000


def test_corpus_is_deterministic():
    fresh = {e.name: e.data for e in hostile._entries()}
    assert fresh == {n: c.data for n, c in CORPUS.items()}
    digest = hashlib.sha256(b"".join(fresh[n] for n in sorted(fresh))).hexdigest()
    again = hashlib.sha256(b"".join(c.data for _, c in sorted(hostile_corpus().items()))).hexdigest()
    assert digest == again


def test_outcome_rules():
    pcx = CORPUS["pcx_outside_list"]
    assert pcx.outcome() == (400, "InvalidImage")
    assert pcx.outcome(formats="pcx") == (200, None)
    assert pcx.outcome(formats="pcx", max_pixels=10) == (413, "ImageTooLarge")
    assert CORPUS["gif_bomb_8000"].outcome(max_pixels=10**8) == (200, None)
    assert CORPUS["png_declares_65535"].outcome(max_pixels=10**12) == (413, "ImageTooLarge")
    assert CORPUS["jpeg_mpo_two_pictures"].outcome(formats=["JPEG"]) == (200, None)
    with pytest.raises(ValueError, match="invalid value for formats: 'NOPE'"):
        pcx.outcome(formats=["NOPE"])


def test_write_corpus(tmp_path):
    manifest = write_corpus(tmp_path / "corpus")
    rows = json.loads(manifest.read_text())
    assert [r["name"] for r in rows] == list(CORPUS)
    for row in rows:
        case = CORPUS[row["name"]]
        assert (manifest.parent / row["file"]).read_bytes() == case.data
        assert (row["status"], row["type"], row["bytes"]) == (case.status, case.error_type,
                                                              len(case.data))
    assert rows[0]["file"] == "good_jpeg_224.jpg"


def test_main_writes_the_folder(tmp_path, capsys):
    assert hostile.main([str(tmp_path)]) == 0
    assert (tmp_path / "manifest.json").is_file()
    assert "manifest.json" in capsys.readouterr().out
    assert hostile.main([]) == 2
