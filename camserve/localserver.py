"""Deprecated alias of :mod:`camserve.testing.torchserve` (the private TorchServe for tests and
benchmarks); import from there. Removed once no caller imports this name."""
from __future__ import annotations

from .testing.torchserve import BIN, LocalTorchServe, archive, free_ports, tail

__all__ = ["BIN", "LocalTorchServe", "archive", "free_ports", "tail"]
