"""camserve.backends.pytorch: the faster serving copy answers as the model itself does.

BatchNorm folding and channels-last over a list of architectures (torchvision and timm families,
the project's own nets): the copy's outputs and target-layer outputs stay within the check's
tolerance, served answers within the bar, the caller's model untouched; and the cases where
folding must not happen (a convolution output read twice, a shared convolution, the target
layer inside a pair), or where the copy cannot be used (a view that needs NCHW strides).
"""
from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import nn

from camserve.backends.pytorch import TorchBackend, fold_batchnorm, optimize_model
from camserve.models import ModelSpec, from_module
from camserve.serving import CamService
from camserve.testing.equality import compare_answers
from camserve.testing.nets import TINY_LABELS, TinyBNNet, calibrate_bn, frozen, small_sequential


def _tv(name: str):
    import torchvision

    return lambda: getattr(torchvision.models, name)(num_classes=len(TINY_LABELS))


def _timm(name: str):
    def build():
        timm = pytest.importorskip("timm")
        return timm.create_model(name, pretrained=False, num_classes=len(TINY_LABELS))
    return build


#: name -> (builder, input size, BatchNorms that fold)
ARCHS = {
    "resnet18": (_tv("resnet18"), 64, 20),
    "mobilenet_v3_small": (_tv("mobilenet_v3_small"), 64, 34),
    "efficientnet_b0 (timm, BatchNormAct2d)": (_timm("efficientnet_b0"), 64, 0),
    "tinybn": (lambda: TinyBNNet(len(TINY_LABELS)), 40, 1),
    "sequential": (lambda: small_sequential(len(TINY_LABELS)), 24, 1),
}


def loaded(name: str):
    build, size, _ = ARCHS[name]
    torch.manual_seed(0)
    model = frozen(calibrate_bn(build(), (size, size)))
    spec = ModelSpec.from_config({"arch": f"x:{name}", "input_size": size, "topk": 3})
    return from_module(model, spec, labels=TINY_LABELS)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_the_optimised_copy_answers_alike_and_leaves_the_model_alone(arch, png):
    lm = loaded(arch)
    before = copy.deepcopy(lm.model.state_dict())
    fast, done = optimize_model(lm.model, lm.layer, lm.spec.input_size)
    folds = ARCHS[arch][2]
    folded = f"batchnorm folded into {folds} convolution{'s' if folds > 1 else ''}"
    assert done == ((folded, "channels-last") if folds else ("channels-last",))
    assert sum(type(m) is nn.BatchNorm2d for m in fast.modules()) == \
        sum(type(m) is nn.BatchNorm2d for m in lm.model.modules()) - folds
    state = lm.model.state_dict()
    assert state.keys() == before.keys() and all(torch.equal(state[k], before[k]) for k in state)
    assert all(p.is_contiguous() for p in lm.model.parameters())
    rows = [{"data": png(seed=i, size=(48 + 8 * i, 40)), "explain": "1", "target": f"{i},{i + 1}"}
            for i in range(3)] + [{"body": png(seed=9)}]
    a = CamService(TorchBackend(lm, optimize=False)).handle_batch(rows)
    b = CamService(TorchBackend(lm)).handle_batch(rows)
    compare_answers([r.body for r in a.results], [r.body for r in b.results]).check()


def test_folding_matches_the_pairs_batchnorm_reads_alone():
    torch.manual_seed(0)

    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.bn_a = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)  # folds
            self.b, self.bn_b = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)  # b's output read twice
            self.shared = nn.Conv2d(4, 4, 1)
            self.bn_s1, self.bn_s2 = nn.BatchNorm2d(4), nn.BatchNorm2d(4)  # conv called twice
            self.c, self.bn_c = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)  # target inside the pair

        def forward(self, x):
            y = self.bn_a(self.a(x))
            z = self.b(y)
            y = self.bn_b(z) + z
            y = self.bn_s1(self.shared(y)) + self.bn_s2(self.shared(y))
            return self.bn_c(self.c(y)).mean((2, 3))

    net = Branchy()
    for bn in (net.bn_a, net.bn_b, net.bn_s1, net.bn_s2, net.bn_c):
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    net.eval()
    x = torch.randn(2, 3, 12, 12)
    ref = net(x)
    assert fold_batchnorm(net, x[:1], keep=("c",)) == 1
    assert isinstance(net.bn_a, nn.Identity)
    assert all(isinstance(m, nn.BatchNorm2d) for m in (net.bn_b, net.bn_s1, net.bn_s2, net.bn_c))
    torch.testing.assert_close(net(x), ref, rtol=1e-5, atol=1e-5)


def test_a_model_that_needs_nchw_strides_is_served_unoptimised(caplog):
    class Viewer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
            self.fc = nn.Linear(4 * 6 * 6, 2)

        def forward(self, x):
            f = self.features(x)
            return self.fc(f.view(f.shape[0], -1))  # needs NCHW-contiguous memory

    net = frozen(Viewer())
    with caplog.at_level(logging.WARNING, logger="camserve.backends.pytorch"):
        fast, done = optimize_model(net, "features", (8, 8))
    assert fast is net and done == ()
    assert any("unoptimised" in r.getMessage() and "fails" in r.getMessage()
               for r in caplog.records)


def test_predict_rows_run_without_autograd_on_the_copy():
    lm = loaded("tinybn")
    backend = TorchBackend(lm)
    seen = []
    h = backend.model.register_forward_pre_hook(
        lambda m, a: seen.append((not torch.is_grad_enabled(), a[0].shape[0])))
    try:
        backend.predict(torch.rand(3, 3, 40, 40))
    finally:
        h.remove()
    assert seen == [(True, 3)] and backend.model is not lm.model
    assert backend.describe()["optimizations"] == ["batchnorm folded into 1 convolution",
                                                  "channels-last"]


def test_handler_optimize_false_serves_the_model_as_loaded():
    from camserve.models import ConfigError

    lm = loaded("tinybn")
    lm.spec = ModelSpec.from_config({"arch": "x:tinybn", "input_size": 40, "optimize": False})
    backend = TorchBackend(lm)
    assert backend.model is lm.model and backend.optimizations == ()
    assert TorchBackend(lm, optimize=True).optimizations
    with pytest.raises(ConfigError, match=r"handler.optimize: 'yes' \(true or false\)"):
        ModelSpec.from_config({"arch": "x:Y", "optimize": "yes"})
