"""camserve.onnx.inputs: listing, bounded reads of regular files, and the decode window, bounded in
count and in bytes."""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import pytest

from camserve.onnx import inputs as batch_inputs
from camserve.onnx.format import GraphMeta

from .conftest import photo


class _Pulled:
    """An iterator over ``items`` that counts how many were taken from it (``pulled``)."""

    def __init__(self, items: Iterable[batch_inputs.Item]) -> None:
        self._items = iter(items)
        self.pulled = 0

    def __iter__(self) -> Iterator[batch_inputs.Item]:
        return self

    def __next__(self) -> batch_inputs.Item:
        item = next(self._items)
        self.pulled += 1
        return item


def test_decoding_window_is_bounded(graph: Path, tmp_path: Path) -> None:
    meta = GraphMeta.from_file(graph)
    for i in range(40):
        photo(tmp_path / "many" / f"{i:03d}.png", (16, 16), i)
    items = _Pulled(batch_inputs.iter_inputs([str(tmp_path / "many")]))
    with ThreadPoolExecutor(4) as pool:
        seen = 0
        for outcome in batch_inputs.decoded_stream(items, pool, 6, meta, False, 10**6):
            seen += 1
            assert items.pulled - seen <= 6  # never more than the window ahead of the consumer
            assert outcome.image is None  # images are dropped unless overlays are asked for
    assert seen == 40


def test_bounded_read_stops_at_the_limit(tmp_path: Path) -> None:
    f = tmp_path / "f.bin"
    f.write_bytes(b"a" * 1000)
    assert batch_inputs.read_file(f, 1000) == b"a" * 1000
    with pytest.raises(batch_inputs.Refused, match="1000 bytes"):
        batch_inputs.read_file(f, 999)


def test_list_files_binary_and_nul_entries(tmp_path: Path) -> None:
    good = photo(tmp_path / "a.png", (20, 20), 1)
    text = tmp_path / "list.txt"
    text.write_bytes(b"# a list\n" + bytes(good) + b"\nbad\x00name.png\n" + b"b.png\n" * 5)
    items = list(batch_inputs.iter_inputs([str(text)]))
    assert [it.error is None for it in items] == [True, False] + [True] * 5
    assert items[1].error[0] == "InvalidListEntry" and "NUL" in items[1].error[1]
    binary = tmp_path / "bin.txt"
    binary.write_bytes(good.read_bytes())
    [item] = batch_inputs.iter_inputs([str(binary)])
    assert item.error[0] == "InvalidList"
    assert not batch_inputs._is_binary("é.jpg\nà.png\n".encode() * 50)
    assert not batch_inputs._is_binary(b"caf\xe9.jpg\n" * 50)  # Latin-1 names are still text
    assert batch_inputs._is_binary(np.random.default_rng(0).bytes(8192))


def test_window_is_bounded_in_bytes(graph: Path, tmp_path: Path) -> None:
    """With a byte budget the stream stops reading ahead once the decoded data reaches it."""
    meta = GraphMeta.from_file(graph)
    for i in range(30):
        photo(tmp_path / "many" / f"{i:03d}.png", (64, 64), i)
    per_image = 3 * 64 * 64 * 4  # one preprocessed tensor
    budget = batch_inputs.ByteBudget(4 * per_image)
    items = _Pulled(batch_inputs.iter_inputs([str(tmp_path / "many")]))
    seen = 0
    with ThreadPoolExecutor(4) as pool:
        for outcome in batch_inputs.decoded_stream(items, pool, 100, meta, False, 10**6,
                                                   budget=budget):
            seen += 1
            time.sleep(0.01)  # a slow consumer: the decodes run ahead until the budget stops them
            assert items.pulled - seen <= 4 + 1  # the count window (100) alone would allow 100
            budget.release(outcome.nbytes)  # written
    assert seen == 30 and budget.peak <= 5 * per_image and budget.held == 0

