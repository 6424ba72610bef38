"""The ONNX export: graphs that compute logits, activations, gradients and CAMs, checked against the
PyTorch engine over the architecture zoo, plus the pieces (decompositions, graph passes, CLI)."""
from __future__ import annotations

import inspect
import json
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import camserve
from camserve import CamEngine, available_methods
from camserve.models import ModelSpec, from_module
from camserve.onnx.decompositions import adaptive_avg_pool2d_grad, avg_pool2d_grad, conv_input_grad
from camserve.onnx.export import ExportError, export_cam_onnx, main
from camserve.onnx.format import GraphMeta, method_output_name, output_names
from camserve.onnx.passes import functionalize_inplace, lift_constants
from camserve.onnx.session import ort_session
from camserve.onnx.trace import trace_cam_graph
from camserve.onnx.verify import DEFAULT_FACTOR, VerificationError, allowed_error, relative_error, verify_cam_onnx
from camserve.testing.nets import TinyBNNet
from camserve.testing.zoo import ARCHS, Arch, export_zoo

TOL = 1e-4


def loaded(model: nn.Module, *, arch: str, input_size: tuple[int, int], layer: str,
           labels: list[str], layout: str | None = None, **spec: Any):
    """A LoadedModel of an in-memory network (what a model folder gives)."""
    return from_module(model, ModelSpec(arch=arch, input_size=input_size, target_layer=layer,
                                        layout=layout, **spec), labels=labels)

@pytest.fixture(scope="module")
def zoo_results(request: pytest.FixtureRequest,
                tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """Export + verify the architectures of the selected zoo tests (-k) in a pool of
    single-threaded workers (:func:`camserve.testing.zoo.export_zoo`); each test checks its case.
    The whole table with errors and times: ``python -m bench.onnx_parity``."""
    selected = {item.callspec.params["arch"].name for item in request.session.items
                if item.name.startswith("test_zoo_graph_equals_engine[")}
    return export_zoo(selected, tmp_path_factory.mktemp("zoo"))


ZOO = [pytest.param(a, layer, id=f"{a.name}-{layer}") for a in ARCHS for layer in a.layers]


@pytest.mark.zoo
@pytest.mark.parametrize("arch,layer", ZOO)
def test_zoo_graph_equals_engine(arch: Arch, layer: str, zoo_results: dict[str, dict[str, Any]]) -> None:
    """Every output of the exported graph equals the engine's within 1e-4 (relative to the largest
    value), at a batch size other than the traced one, with explicit targets, with -1, without
    the target input and for a batch of one (export_cam_onnx raises VerificationError otherwise)."""
    row = zoo_results[f"{arch.name}-{layer}"]
    if "failure" in row:
        pytest.fail(row["failure"], pytrace=False)
    assert row["exporter"] == "fast"
    errors = row["errors"]
    assert set(errors) == {"explicit", "-1", "omitted", "batch1"}
    for name in ("logits", "activations", "gradients", "cam"):
        for case in errors:  # vs float64: within TOL or within DEFAULT_FACTOR x PyTorch float32's
            limit = allowed_error(TOL, DEFAULT_FACTOR, row["baseline"][case][name])
            assert errors[case][name] <= limit, (case, name, errors[case][name], limit)
    assert row["logits_std"] > 1e-3  # a non-degenerate test model


# -- every family of docs/byom.md (timm, Hugging Face, torchvision MaxViT/Swin): exact gradients ---

def _family_cases() -> list[Any]:
    """(id, builder, input size) of the families the layer table of docs/byom.md lists, in the
    configurations of tests/test_families.py (small, random weights, non-square where the family
    allows)."""
    from camserve.sources import build_from_source
    from tests.test_families import HF_IDS, TIMM_ZOO, hf_cases, tiny_tv_maxvit, tiny_tv_swin

    cases: list[Any] = [
        pytest.param(lambda n=name, a=args: build_from_source(f"timm:{n}", num_classes=3, arch_args=a)[0],
                     size, id=f"timm:{name}" + ("_reg" if "reg_tokens" in args else ""))
        for name, args, size, *_ in TIMM_ZOO]
    cases += [pytest.param(make, size, id=f"hf:{hid}")
              for hid, (_, make, size, *_) in zip(HF_IDS, hf_cases())]
    cases += [pytest.param(tiny_tv_maxvit, (64, 64), id="torchvision:maxvit"),
              pytest.param(tiny_tv_swin, (64, 96), id="torchvision:swin")]
    return cases


def export_family(model: nn.Module, size: tuple[int, int], out: Path) -> Any:
    """Export the located layer of a random-weight model (BatchNorm calibrated) with the fast
    exporter and verify it against the engine (VerificationError otherwise)."""
    from camserve.testing.nets import calibrate_bn

    torch.manual_seed(0)
    calibrate_bn(model, size, steps=2, seed=0)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    src = from_module(model, ModelSpec(arch="family", input_size=size), labels=["a", "b", "c"])
    return export_cam_onnx(src, out, methods=("gradcam",), exporter="fast", threads=1)


@pytest.mark.zoo
@pytest.mark.parametrize("make,size", _family_cases())
def test_family_exports_with_exact_gradients(make: Any, size: tuple[int, int], tmp_path: Path) -> None:
    """The located layer of each family exports with the fast exporter (gradients traced, not a
    fallback) and verifies at every target form and at batch 1 (Hugging Face Swin included: its
    pooled transposed tokens and its attention mask expanded over the batch)."""
    info = export_family(make(), size, tmp_path / "f.onnx")
    assert info.exporter == "fast"
    assert set(info.errors) == {"explicit", "-1", "omitted", "batch1"}
    assert all(e <= TOL or e <= allowed_error(TOL, DEFAULT_FACTOR, info.baseline[case][name])
               for case, row in info.errors.items() for name, e in row.items())


class _PooledTokens(nn.Module):
    """Tokens pooled by an ``AdaptiveAvgPool1d`` over ``tokens.transpose(1, 2)`` (channels-last
    strides: the pool restrides in place) and a mask expanded over the batch then reshaped with
    -1 (``sym_numel``): the two patterns of Hugging Face Swin that had no functional ONNX form."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 8, 4, stride=4)
        self.norm = nn.LayerNorm(8)
        self.pool = nn.AdaptiveAvgPool1d(1)
        self.head = nn.Linear(8, 3)
        self.register_buffer("mask", torch.linspace(-1, 1, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.norm(self.embed(x).flatten(2).transpose(1, 2))            # (B, N, 8)
        m = self.mask[None, None].expand(x.shape[0], -1, -1).reshape(-1, 8)  # (B, 8)
        return self.head(self.pool(t.transpose(1, 2)).flatten(1) + m)


def test_pooled_transposed_tokens_export_with_the_fast_exporter(tmp_path: Path) -> None:
    info = export_family(_PooledTokens(), (16, 24), tmp_path / "p.onnx")
    assert info.exporter == "fast" and info.layer == "embed"


# -- the graph contract, on one model ------------------------------------------------------------

@pytest.fixture(scope="module")
def r18() -> nn.Module:
    torch.manual_seed(0)
    m = torchvision.models.resnet18(num_classes=7).eval()
    for p in m.parameters():
        p.requires_grad_(False)
    return m


@pytest.fixture(scope="module")
def all_methods_graph(r18: nn.Module, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    src = loaded(r18, arch="torchvision.models.resnet18", input_size=(64, 48), layer="layer3",
                 labels=[f"c{i}" for i in range(7)], mean=(0.1, 0.2, 0.3), std=(0.5, 0.6, 0.7))
    path = tmp_path_factory.mktemp("g") / "all.onnx"
    info = export_cam_onnx(src, path, methods=available_methods(exportable=True))
    return path, info


def test_graph_inputs_outputs_and_metadata(all_methods_graph: tuple[Path, object]) -> None:
    path, info = all_methods_graph
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    ins = {i.name: i for i in proto.graph.input}
    assert list(ins) == ["input", "target"]
    dims = [d.dim_param or d.dim_value for d in ins["input"].type.tensor_type.shape.dim]
    assert dims == ["batch", 3, 64, 48]
    assert ins["input"].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert ins["target"].type.tensor_type.elem_type == onnx.TensorProto.INT64
    default = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}["target"]
    assert default.tolist() == [-1]  # optional input: its default means "top-1"
    outs = [o.name for o in proto.graph.output]
    assert outs == ["logits", "activations", "gradients", "cam", "cam_gradcampp", "cam_hirescam",
                    "cam_xgradcam", "cam_layercam", "cam_gradcamelementwise", "cam_eigencam",
                    "cam_kpcacam", "cam_reciprocam", "cam_vitreciprocam"]
    assert outs == output_names(available_methods(exportable=True))
    for o in proto.graph.output:
        assert o.type.tensor_type.shape.dim[0].dim_param == "batch"
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["camserve_version"] == camserve.__version__
    assert json.loads(meta["labels"]) == [f"c{i}" for i in range(7)]
    assert json.loads(meta["input_size"]) == [64, 48]
    assert json.loads(meta["mean"]) == pytest.approx([0.1, 0.2, 0.3])
    assert json.loads(meta["std"]) == pytest.approx([0.5, 0.6, 0.7])
    assert meta["layer"] == "layer3"
    assert json.loads(meta["methods"]) == available_methods(exportable=True)
    assert json.loads(meta["cam_outputs"])["gradcam++"] == "cam_gradcampp"
    parsed = GraphMeta.from_file(path)
    assert parsed.output_for("gradcam") == "cam" and parsed.input_size == (64, 48)
    # every method's map was compared with the engine (float64) during the export, and PyTorch
    # float32's own error was measured next to it
    assert set(info.baseline) == set(info.errors)
    assert all(info.errors[c][n] <= allowed_error(TOL, DEFAULT_FACTOR, info.baseline[c][n])
               for c in info.errors for n in info.errors[c])


def test_target_forms(all_methods_graph: tuple[Path, object], r18: nn.Module) -> None:
    path, _ = all_methods_graph
    sess = ort_session(path)
    x = torch.randn(5, 3, 64, 48, generator=torch.Generator().manual_seed(3))
    engine = CamEngine(r18, "layer3")
    one, = sess.run(["cam"], {"input": x.numpy(), "target": np.array([2], np.int64)})  # broadcast
    ref = engine(x, targets=2).cams.numpy()
    assert relative_error(one, ref) <= TOL
    omitted = sess.run(["logits", "cam"], {"input": x.numpy()})
    minus = sess.run(["logits", "cam"], {"input": x.numpy(), "target": np.full(5, -1, np.int64)})
    np.testing.assert_array_equal(omitted[1], minus[1])
    top1 = engine(x)  # no targets: the engine explains the top-1 class
    assert relative_error(minus[1], top1.cams.numpy()) <= TOL


def test_method_output_names() -> None:
    assert method_output_name("gradcam++") == "cam_gradcampp"
    assert method_output_name("LayerCAM") == "cam_layercam"
    assert output_names(["hirescam", "gradcam"]) == ["logits", "activations", "gradients", "cam",
                                                     "cam_gradcam"]


def test_traced_graph_runs_in_pytorch(r18: nn.Module) -> None:
    """The FX graph itself (before ONNX) is the engine's computation, at any batch size."""
    gm = trace_cam_graph(r18, "layer3", torch.randn(2, 3, 64, 64), methods=("gradcam", "xgradcam"))
    assert gm.meta["camserve"]["output_names"][-1] == "cam_xgradcam"
    x = torch.randn(4, 3, 64, 64)
    logits, acts, grads, cam, xcam = gm(x, torch.tensor([1, -1, 3, -1]))
    tg = torch.where(torch.tensor([1, -1, 3, -1]) < 0, r18(x).argmax(1), torch.tensor([1, -1, 3, -1]))
    res = CamEngine(r18, "layer3")(x, targets=tg)
    for got, ref in ((logits, res.logits), (acts, res.activations), (grads, res.gradients),
                     (cam, res.cams)):
        assert relative_error(got.numpy(), ref.numpy()) <= 1e-5
    assert relative_error(xcam.numpy(), camserve.get_method("xgradcam")(res.activations, res.gradients).numpy()) <= 1e-5
    consts = lift_constants(gm)
    assert consts and not [n for n in gm.graph.nodes if n.op == "get_attr"]


def test_torch_exporter_and_opset(tmp_path: Path) -> None:
    """The public torch.onnx.export path (the fallback) and an opset conversion give graphs that
    pass the same verification."""
    torch.manual_seed(0)
    model = TinyBNNet(4).eval()
    src = loaded(model, arch="TinyNet", input_size=(32, 32), layer="features.3", labels=list("abcd"))
    info = export_cam_onnx(src, tmp_path / "t.onnx", exporter="torch")
    assert info.exporter == "torch" and info.errors["-1"]["cam"] <= TOL
    info = export_cam_onnx(src, tmp_path / "o.onnx", opset=20)
    assert {o.domain: o.version for o in onnx.load(str(tmp_path / "o.onnx")).opset_import}[""] == 20
    with pytest.raises(ValueError, match="opset"):
        export_cam_onnx(src, tmp_path / "x.onnx", opset=13)
    with pytest.raises(ValueError, match="known"):
        export_cam_onnx(src, tmp_path / "x.onnx", methods=("nocam",))


def test_training_mode_is_refused(tmp_path: Path) -> None:
    m = torchvision.models.resnet18(num_classes=3)  # train mode
    src = loaded(m.eval(), arch="resnet18", input_size=(32, 32), layer="layer4", labels=list("abc"))
    m.train()
    with pytest.raises((ValueError, ExportError), match="training mode"):
        export_cam_onnx(src, tmp_path / "x.onnx")


# -- decompositions of backward ops, against autograd --------------------------------------------

@pytest.mark.parametrize("size,stride,padding,dilation,groups", [
    (9, 2, 1, 1, 1), (10, 2, 1, 1, 1), (11, 3, 0, 1, 2), (12, 1, 2, 2, 4), (7, 2, 3, 1, 4),
])
def test_conv_backward_is_transposed_conv(size: int, stride: int, padding: int, dilation: int,
                                          groups: int) -> None:
    g = torch.Generator().manual_seed(size)
    x = torch.randn(2, 4, size, size + 1, generator=g, requires_grad=True)
    w = torch.randn(8, 4 // groups, 3, 3, generator=g)
    y = F.conv2d(x, w, None, stride, padding, dilation, groups)
    gy = torch.randn(y.shape, generator=g)
    ref, = torch.autograd.grad(y, x, gy)
    got, *_ = conv_input_grad(gy, x.detach(), w, None, [stride] * 2, [padding] * 2, [dilation] * 2,
                               False, [0, 0], groups, [True, False, False])
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    # the adjoint of a transposed convolution is a convolution
    xt = torch.randn(2, 8, 5, 6, generator=g, requires_grad=True)
    yt = F.conv_transpose2d(xt, w, None, stride, padding, 0, groups, dilation)
    gyt = torch.randn(yt.shape, generator=g)
    ref_t, = torch.autograd.grad(yt, xt, gyt)
    got_t, *_ = conv_input_grad(gyt, xt.detach(), w, None, [stride] * 2, [padding] * 2,
                                 [dilation] * 2, True, [0, 0], groups, [True, False, False])
    torch.testing.assert_close(got_t, ref_t, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("size_in,size_out", [((7, 5), (3, 2)), ((2, 2), (7, 7)), ((5, 6), (1, 1)),
                                              ((13, 13), (4, 5))])
def test_adaptive_avg_pool_backward(size_in: tuple[int, int], size_out: tuple[int, int]) -> None:
    x = torch.randn(2, 3, *size_in, requires_grad=True)
    y = F.adaptive_avg_pool2d(x, size_out)
    gy = torch.randn(y.shape)
    ref, = torch.autograd.grad(y, x, gy)
    torch.testing.assert_close(adaptive_avg_pool2d_grad(gy, x.detach()), ref)


@pytest.mark.parametrize("kernel,stride,padding,ceil,include_pad,override", [
    (2, 2, 0, False, True, None), (3, 2, 1, True, False, None), (3, 2, 1, True, True, None),
    (3, 1, 1, False, True, 4), (2, 3, 1, True, True, None),
])
def test_avg_pool_backward(kernel: int, stride: int, padding: int, ceil: bool, include_pad: bool,
                           override: int | None) -> None:
    x = torch.randn(2, 3, 9, 8, requires_grad=True)
    y = F.avg_pool2d(x, kernel, stride, padding, ceil, include_pad, override)
    gy = torch.randn(y.shape)
    ref, = torch.autograd.grad(y, x, gy)
    got = avg_pool2d_grad(gy, x.detach(), [kernel] * 2, [stride] * 2, [padding] * 2, ceil,
                           include_pad, override)
    torch.testing.assert_close(got, ref)


def test_functionalize_inplace() -> None:
    class Mutating(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = x * 2
            y.relu_()
            y += 1
            mask = torch.zeros(4, 4)
            mask[1:3, 0:2] = 5.0
            mask[0] = 7.0
            return y * mask.sum()

    from torch.fx.experimental.proxy_tensor import make_fx

    x = torch.randn(4, 4)
    gm = make_fx(Mutating())(x)
    def mutable(g: torch.fx.GraphModule) -> list[torch.fx.Node]:
        return [n for n in g.graph.nodes if n.op == "call_function"
                and isinstance(n.target, torch._ops.OpOverload) and n.target._schema.is_mutable]

    assert len(mutable(gm)) >= 4  # relu_, add_, and the two writes through views
    expected = gm(x)
    functionalize_inplace(gm)
    assert not mutable(gm)
    torch.testing.assert_close(gm(x), expected)

    def writes_input(x: torch.Tensor) -> torch.Tensor:
        x.add_(1)
        return x * 2

    gm2 = make_fx(writes_input)(torch.randn(3))
    with pytest.raises(ValueError, match="graph input"):
        functionalize_inplace(gm2)


# -- the command line ---------------------------------------------------------------------------

@pytest.mark.slow
def test_cli_arch(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "r18.onnx"
    code = main(["--arch", "torchvision.models.resnet18", "--num-classes", "4", "--layer", "layer3",
                 "--input-size", "48,32", "--methods", "gradcam,gradcam++", "--out", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    assert "layer layer3" in text and "cam_gradcampp" in text and "explicit" in text
    meta = GraphMeta.from_file(out)
    assert meta.arch == "torchvision.models.resnet18" and meta.labels == ("0", "1", "2", "3")
    assert meta.input_size == (48, 32)


@pytest.fixture()
def model_dir(tmp_path: Path) -> Path:
    d = tmp_path / "tiny"
    d.mkdir()
    (d / "model.py").write_text("import torch\nfrom torch import nn\n\n\n" + inspect.getsource(TinyBNNet))
    torch.manual_seed(1)
    torch.save(TinyBNNet(3).state_dict(), d / "weights.pt")
    (d / "index_to_name.json").write_text(json.dumps({"0": "circle", "1": "square", "2": "star"}))
    (d / "model-config.yaml").write_text(textwrap.dedent("""\
        handler:
          arch: model:TinyBNNet
          num_classes: 3
          weights: weights.pt
          labels: index_to_name.json
          target_layer: features.3
          input_size: [40, 32]
          mean: [0.5, 0.5, 0.5]
          std: [0.25, 0.25, 0.25]
          method: hirescam
          topk: 2
        """))
    return d


def test_cli_model_dir(model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "store" / "tiny.cam.onnx"
    assert main([str(model_dir), "--out", str(out)]) == 0
    meta = GraphMeta.from_file(out)
    assert meta.labels == ("circle", "square", "star")
    assert meta.input_size == (40, 32) and meta.mean == (0.5, 0.5, 0.5)
    assert meta.layer == "features.3" and meta.methods == ("hirescam",) and meta.topk == 2
    assert main([str(model_dir), "--layer", "features.5", "--methods", "gradcam,layercam",
                 "--out", str(out)]) == 0
    assert GraphMeta.from_file(out).layer == "features.5"


def test_cli_errors(model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = str(tmp_path / "x.onnx")
    assert main([str(model_dir), "--layer", "features.9", "--out", out]) == 2
    assert "invalid value for handler.target_layer: 'features.9'" in capsys.readouterr().err
    assert main([str(model_dir), "--methods", "gradcam,magic", "--out", out]) == 2
    assert "known: gradcam" in capsys.readouterr().err
    assert main([str(tmp_path / "nowhere"), "--out", out]) == 2
    for argv in ([str(model_dir), "--arch", "resnet18", "--out", out],
                 ["--out", out],
                 [str(model_dir), "--opset", "12", "--out", out],
                 [str(model_dir), "--input-size", "64", "--out", out]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
    # a graph that does not match the engine fails loudly (exit 1) with the figures
    assert main([str(model_dir), "--tolerance", "0", "--factor", "0", "--out", out]) == 1
    err = capsys.readouterr().err
    assert "verification failed" in err and "relative error vs float64 > 0" in err
    assert "PyTorch float32" in err


def test_folder_without_labels_key_exports_the_labels_it_serves(model_dir: Path, tmp_path: Path) -> None:
    """No ``labels:`` key: the folder's index_to_name.json names the classes, as when serving."""
    from camserve.models import load_model_dir

    cfg = model_dir / "model-config.yaml"
    cfg.write_text(cfg.read_text().replace("  labels: index_to_name.json\n", ""))
    assert "labels" not in cfg.read_text()
    served = load_model_dir(model_dir).labels
    out = tmp_path / "nolabels.onnx"
    assert main([str(model_dir), "--out", str(out), "--no-verify"]) == 0
    assert list(GraphMeta.from_file(out).labels) == served == ["circle", "square", "star"]


def test_arch_export_ignores_labels_of_the_working_folder(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from camserve.onnx.export import load_arch

    monkeypatch.chdir(tmp_path)
    (tmp_path / "index_to_name.json").write_text(json.dumps({"0": "x", "1": "y"}))
    lm = load_arch("torchvision.models.resnet18", num_classes=2, input_size=32)
    assert lm.labels == ["0", "1"]
    lm = load_arch("torchvision.models.resnet18", num_classes=2, input_size=32,
                   labels="index_to_name.json")
    assert lm.labels == ["x", "y"]


# -- verification: accepts correct float32 graphs, rejects wrong ones --------------------------------

def _corrupt(src: Path, dst: Path, scale: float = 1.01) -> str:
    """A copy of the graph with its largest weight initializer scaled by ``scale``; returns its name."""
    proto = onnx.load(str(src))
    init = max((t for t in proto.graph.initializer if t.data_type == onnx.TensorProto.FLOAT),
               key=lambda t: int(np.prod(t.dims)))
    arr = onnx.numpy_helper.to_array(init) * np.float32(scale)
    init.CopyFrom(onnx.numpy_helper.from_array(arr.astype(np.float32), init.name))
    onnx.save(proto, str(dst))
    return init.name


def test_verification_rejects_a_corrupted_graph(all_methods_graph: tuple[Path, object], r18: nn.Module,
                                                tmp_path: Path) -> None:
    """One weight tensor 1% off is far outside float32 rounding: every output after it fails."""
    path, _info = all_methods_graph
    src = loaded(r18, arch="torchvision.models.resnet18", input_size=(64, 48), layer="layer3",
                 labels=[f"c{i}" for i in range(7)], mean=(0.1, 0.2, 0.3), std=(0.5, 0.6, 0.7))
    ok = verify_cam_onnx(path, src, methods=("gradcam",))
    assert all(e <= TOL for e in ok.errors["explicit"].values())
    bad = tmp_path / "bad.onnx"
    _corrupt(path, bad)
    with pytest.raises(VerificationError, match="PyTorch float32"):
        verify_cam_onnx(bad, src, methods=("gradcam",))


@pytest.mark.slow
def test_resnet50_exports_with_default_verification(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``python -m export.onnx_export --arch torchvision.models.resnet50 --weights sd.pt --layer layer4
    --input-size 224`` on BN-calibrated random weights: float32 onnxruntime and PyTorch differ by
    ~1e-4 over 50 layers, and the default verification (vs float64, within a small factor of
    PyTorch float32's own error) accepts the graph; the same graph with one weight tensor 1% off is
    rejected."""
    from camserve.models import recalibrate_batchnorm

    torch.manual_seed(0)
    m = torchvision.models.resnet50().eval()
    recalibrate_batchnorm(m, (224, 224), steps=2, batch=4)
    sd = tmp_path / "sd.pt"
    torch.save(m.state_dict(), sd)
    out = tmp_path / "r50.cam.onnx"
    assert main(["--arch", "torchvision.models.resnet50", "--weights", str(sd), "--layer", "layer4",
                 "--input-size", "224", "--out", str(out)]) == 0, capsys.readouterr().err
    report = capsys.readouterr().out
    print(report)
    assert "verified against the PyTorch engine in float64" in report
    from camserve.onnx.export import load_arch

    lm = load_arch("torchvision.models.resnet50", weights=sd, layer="layer4", input_size=224)
    bad = tmp_path / "bad.onnx"
    _corrupt(out, bad)
    with pytest.raises(VerificationError, match="PyTorch float32"):
        verify_cam_onnx(bad, lm, methods=("gradcam",), redraws=0)
