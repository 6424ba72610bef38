"""camserve.layers: the one capture primitive (hooks live exactly as long as the block, in every
mode, also after an exception), its checks, and the typed LayerError."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from camserve.layers import LayerError, capture_layer, locate_layer, nchw_converter, resolve_layer


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(4, 6, 3),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3)).eval()


def _hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


class _Boom(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("boom")


def _kwargs(mode: str) -> dict:
    return {"activations": torch.zeros(2, 4, 8, 8)} if mode == "replace" else {}


@pytest.mark.parametrize("mode", ["track-grad", "record", "replace"])
def test_hooks_removed_after_success_and_after_exception(mode: str) -> None:
    model = _net()
    x = torch.rand(2, 3, 8, 8)
    with capture_layer(model, "0", mode, **_kwargs(mode)) as cap:  # type: ignore[arg-type]
        assert _hooks(model) == 1
        model(x)
    assert _hooks(model) == 0 and cap.output.shape == (2, 4, 8, 8)
    model[3] = _Boom()  # fails after the captured layer ran
    with pytest.raises(RuntimeError, match="boom"):
        with capture_layer(model, "0", mode, **_kwargs(mode)):  # type: ignore[arg-type]
            model(x)
    assert _hooks(model) == 0
    assert torch.is_grad_enabled()  # track-grad switches grad mode: restored either way


def test_track_grad_detaches_and_switches_autograd_on_for_the_suffix() -> None:
    model = _net()
    with torch.no_grad():  # the caller's grad mode is restored, whatever it was
        with capture_layer(model, "0", "track-grad") as cap:
            logits = model(torch.rand(2, 3, 8, 8))
        assert not torch.is_grad_enabled()
    a = cap.output
    assert a.is_leaf and a.requires_grad and logits.requires_grad
    assert (a < 0).any()  # the in-place ReLU after the layer did not reach the kept tensor
    (g,) = torch.autograd.grad(logits[:, 1].sum(), a)
    assert g.shape == a.shape


def test_record_keeps_the_output_and_replace_pins_it() -> None:
    model = _net()
    x = torch.rand(2, 3, 8, 8)
    with torch.no_grad(), capture_layer(model, "2", "record") as rec:
        ref = model(x)
    with torch.no_grad():
        torch.testing.assert_close(rec.output, model[2](model[1](model[0](x))))
    pinned = torch.zeros(2, 4, 8, 8)
    with torch.no_grad(), capture_layer(model, "0", "replace", activations=pinned):
        out = model(x)
    with torch.no_grad():
        expected = model[3:](model[2](torch.zeros(2, 4, 8, 8)))
    torch.testing.assert_close(out, expected)
    assert not torch.allclose(out, ref)
    with pytest.raises(LayerError, match="do not fit") as exc:
        with capture_layer(model, "0", "replace", activations=torch.zeros(2, 5, 8, 8)):
            model(x)
    assert exc.value.layer == "0"


def test_replace_writes_through_the_token_view() -> None:
    class Tokens(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.cat([x.new_ones(x.shape[0], 1, 3), x.flatten(2).transpose(1, 2)], 1)

    model = nn.Sequential(Tokens())
    with capture_layer(model, "0", "replace", activations=torch.full((1, 3, 2, 2), 7.0),
                       layout="tokens"):
        out = model(torch.rand(1, 3, 2, 2))
    assert out[0, 0].tolist() == [1.0, 1.0, 1.0] and bool((out[0, 1:] == 7).all())


def test_single_call_tensor_and_ran_checks_are_layer_errors() -> None:
    shared = nn.ReLU()
    model = nn.Sequential(nn.Conv2d(3, 3, 1), shared, nn.Conv2d(3, 3, 1), shared)
    with pytest.raises(LayerError, match="more than once") as exc:
        with capture_layer(model, shared, "record"):
            model(torch.rand(1, 3, 4, 4))
    assert exc.value.layer == "1" and "shared module" in exc.value.reason
    with capture_layer(model, shared, "record", once=False) as cap:
        model(torch.rand(1, 3, 4, 4))
    assert len(cap.outputs) == 2

    class Pair(nn.Module):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return x, x

    pair_model = nn.Sequential(Pair())
    with pytest.raises(LayerError, match="not a tensor"):
        with capture_layer(pair_model, "0", "record"):
            pair_model(torch.rand(1, 3, 4, 4))
    with capture_layer(_net(), "2", "record") as cap:
        pass
    with pytest.raises(LayerError, match="did not run"):
        cap.output
    with pytest.raises(ValueError, match="activations"):
        with capture_layer(_net(), "0", "replace"):
            pass
    with pytest.raises(ValueError, match="allowed: track-grad, record, replace"):
        with capture_layer(_net(), "0", "pin"):  # type: ignore[arg-type]
            pass


def test_layer_error_fields_and_rekeyed_message() -> None:
    with pytest.raises(LayerError) as exc:
        resolve_layer(_net(), "9")
    err = exc.value
    assert isinstance(err, ValueError) and err.layer == "9"
    assert err.reason.startswith("no '9' in the model; known: 0, 1, 2")
    assert str(err).startswith("invalid value for target_layer: '9' (no '9'")
    assert err.message_for("handler.target_layer").startswith("invalid value for handler.target_layer: '9'")
    long = LayerError("x" * 500, "r")
    assert len(str(long)) < 160  # never echoes unbounded input


def test_nchw_converter_and_locate() -> None:
    with pytest.raises(LayerError, match="not a spatial map") as exc:
        nchw_converter("head")(torch.zeros(2, 5))
    assert exc.value.layer == "head"
    model = _net()
    assert locate_layer(model, torch.rand(1, 3, 8, 8)) == "2"
    assert _hooks(model) == 0
    flat = nn.Sequential(nn.Flatten(), nn.Linear(12, 2))
    with pytest.raises(LayerError, match="no layer with a spatial output"):
        locate_layer(flat, torch.rand(1, 3, 2, 2))
