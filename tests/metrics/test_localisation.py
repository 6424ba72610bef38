"""camserve.metrics.localisation: energy in the box and the pointing game on hand-made maps."""
from __future__ import annotations

import pytest
import torch

from camserve import metrics as M


def test_energy_in_box_hand_made():
    m = torch.zeros(3, 6, 6)
    m[0, 1, 1] = 2.0
    m[0, 4, 4] = 2.0                      # half inside
    m[1, 0:2, 0:3] = 1.0                  # all inside
    m[1, 5, 5] = -7.0                     # negative mass is ignored
    boxes = [[0, 0, 3, 3], [0, 0, 3, 2], [0, 0, 3, 2]]   # third map: all zeros -> uniform
    torch.testing.assert_close(M.energy_in_box(m, boxes), torch.tensor([0.5, 1.0, 6 / 36]))
    with pytest.raises(ValueError, match="boxes"):
        M.energy_in_box(m, [[0, 0, 3, 3]])


def test_pointing_game_with_tolerance():
    m = torch.zeros(3, 10, 10)
    m[0, 2, 2] = 1.0                      # inside [1, 1, 4, 4)
    m[1, 5, 4] = 1.0                      # x = 4 is the exclusive end: 1 px outside
    m[2, 8, 8] = 1.0                      # far away
    boxes = torch.tensor([[1, 1, 4, 4]] * 3)
    assert M.pointing_game(m, boxes).tolist() == [1.0, 0.0, 0.0]
    assert M.pointing_game(m, boxes, tolerance=2).tolist() == [1.0, 1.0, 0.0]
    with pytest.raises(ValueError, match="tolerance"):
        M.pointing_game(m, boxes, tolerance=-1)


# ------------------------------------------------------------------------------------------------
# randomisation
