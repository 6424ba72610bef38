"""camserve.onnx.audit: metrics through a session, per-image transactions, key parsing, means."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from camserve import metrics as M
from camserve.onnx.audit import (AUDIT_KEYS, MetricMeans, audit_batch, mean_metrics,
                                 parse_metric_keys, runs_per_image, session_model_fn)


class RedTopSession:
    """A stand-in onnxruntime session: class 0 reads the red of the image's top half."""

    def __init__(self) -> None:
        self.runs = 0
        self.fetched: list[list[str]] = []

    def run(self, fetch, feed):
        self.runs += 1
        self.fetched.append(list(fetch))
        assert set(feed) == {"input"} and feed["input"].dtype == np.float32
        red_top = feed["input"][:, 0, : feed["input"].shape[2] // 2].mean(axis=(1, 2))
        return [np.stack([20 * (red_top - 0.75), np.zeros_like(red_top)], axis=1)]


def _batch(b: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.zeros(b, 3, 8, 8)
    x[:, 0, :4] = 1.0
    right = torch.zeros(b, 4, 4)
    right[:, :2] = 1.0
    return x, right


def test_right_map_beats_inverted_map_and_session_runs_match_the_cost() -> None:
    x, right = _batch()
    keys = ("deletion", "insertion", "avg_drop", "avg_increase")
    sess = RedTopSession()
    good = audit_batch(sess, x, right.numpy(), [0, 0, 0], keys, steps=4)
    assert sess.runs == runs_per_image(keys, steps=4) == 1 + 4 + 4 + 1  # one run per step, batched
    assert all(f == ["logits"] for f in sess.fetched)
    bad = audit_batch(RedTopSession(), x, 1 - right, [0, 0, 0], keys, steps=4)
    for g, w in zip(good, bad):
        assert list(g) == list(keys)
        assert g["deletion"] < w["deletion"] and g["insertion"] > w["insertion"]


def test_batch_equals_row_by_row() -> None:
    x, right = _batch(3)
    x[1, 1] = 0.3
    right[2] = torch.rand(4, 4, generator=torch.Generator().manual_seed(0))
    keys = ("deletion", "insertion", "road_lerf", "avg_drop")
    batched = audit_batch(RedTopSession(), x, right, [0, 1, 0], keys, steps=5, seed=2)
    for i in range(3):
        one = audit_batch(RedTopSession(), x[i:i + 1], right[i:i + 1], [[0, 1, 0][i]], keys,
                          steps=5, seed=2)[0]
        for k in keys:
            if k == "road_lerf":  # noise drawn for the batch vs for one image: close, not equal
                assert abs(one[k] - batched[i][k]) < 0.05, (i, k)
            else:
                assert one[k] == pytest.approx(batched[i][k], abs=1e-6), (i, k)


def test_a_bad_map_costs_only_its_own_image(caplog: pytest.LogCaptureFixture) -> None:
    x, right = _batch(3)
    right[1, 0, 0] = float("nan")
    rows = audit_batch(RedTopSession(), x, right, [0, 0, 0], ("deletion",), steps=2)
    assert rows[0] is not None and rows[2] is not None and rows[1] is None
    assert rows[0] == rows[2]
    assert "retrying image by image" in caplog.text and "NaN" in caplog.text
    assert mean_metrics(rows) == rows[0]


def test_settings_are_checked_before_any_run() -> None:
    x, right = _batch(1)
    sess = RedTopSession()
    with pytest.raises(ValueError, match="invalid value for keys: 'pointing_game'"):
        audit_batch(sess, x, right, [0], ("pointing_game",))
    with pytest.raises(ValueError, match="baseline"):
        audit_batch(sess, x, right, [0], ("deletion",), baseline="zero")
    with pytest.raises(ValueError, match="steps"):
        audit_batch(sess, x, right, [0], ("deletion",), steps=0)
    assert sess.runs == 0


def test_blur_baseline_changes_deletion() -> None:
    x, right = _batch(1)
    x[:, 0, :, ::2] = 0.2   # texture, so that a blur differs from the mean colour
    mean = audit_batch(RedTopSession(), x, right, [0], ("deletion",), steps=4)[0]["deletion"]
    blur = audit_batch(RedTopSession(), x, right, [0], ("deletion",), steps=4,
                       baseline="blur")[0]["deletion"]
    assert mean != blur


def test_session_model_fn_feeds_float32_on_cpu_and_returns_on_the_input_device() -> None:
    out = session_model_fn(RedTopSession())(torch.ones(2, 3, 4, 4, dtype=torch.float64))
    assert out.dtype == torch.float32 and out.shape == (2, 2) and out.device == torch.device("cpu")


def test_parse_metric_keys() -> None:
    assert parse_metric_keys("all") == AUDIT_KEYS == M.PER_IMAGE_KEYS
    assert parse_metric_keys(" Deletion ,avg_drop,,deletion") == ("deletion", "avg_drop")
    for text in ("", " , ", "energy_in_box", "x" * 500):
        with pytest.raises(ValueError, match="--metrics") as info:
            parse_metric_keys(text)
        assert len(str(info.value)) < 250


def test_metric_means_skip_missing_rows() -> None:
    acc = MetricMeans()
    acc.add([None, {"deletion": 0.2, "avg_increase": 1.0}])
    acc.add([{"deletion": 0.4, "avg_increase": 0.0}])
    assert acc.images == 2
    assert acc.means() == pytest.approx({"deletion": 0.3, "avg_increase": 0.5})
    assert MetricMeans().means() == {} and mean_metrics([None]) == {}
