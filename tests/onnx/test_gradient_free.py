"""Gradient-free CAM graphs: EigenCAM, ReciproCAM / ViT-ReciproCAM and KPCA-CAM inside the graph
with no backward, over a list of architectures against the PyTorch engine; int8 graphs within
their tolerance of the float graph; the exporter's fallback when a backward does not export; the
batch job and the onnxruntime backend over such graphs."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
import pytest
import torch

from camserve import CamEngine
from camserve.methods import available_methods, get_method
from camserve.models import ModelSpec, from_module
from camserve.onnx.export import (BackwardExportError, export_cam_onnx, gradient_free_command,
                                  gradient_free_methods, main)
from camserve.onnx.format import GraphFormatError, GraphMeta, output_names
from camserve.onnx.quantize import INT8_TOLERANCE, QuantizationError, compare_quantized, quantize_graph
from camserve.onnx.session import ort_session
from camserve.onnx.verify import DEFAULT_FACTOR, allowed_error, relative_error
from camserve.testing.nets import WarpNet, frozen

from ..methods.archs import CASES, Case

GRADIENT_FREE = tuple(available_methods(exportable=True, gradients=False))
TOL = 1e-4


def _methods(case: Case) -> tuple[str, ...]:
    recipro = "vitreciprocam" if case.layout == "tokens" else "reciprocam"
    return ("eigencam", recipro, "kpcacam")


def _loaded(case: Case):
    model = case.build().float().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    spec = ModelSpec(arch=case.name, input_size=case.size, target_layer=case.layer, layout=case.layout)
    return from_module(model, spec, labels=[f"c{i}" for i in range(10)])


#: the fast tier: the first case (a tiny CNN, non-square input); the other small cases of every
#: layout in the zoo tier (ReciproCAM runs a suffix forward per position: not on the large ones)
PARITY = [pytest.param(c, id=c.name, marks=[pytest.mark.zoo] if i else [])
          for i, c in enumerate(c for c in CASES if not c.large)]


@pytest.mark.parametrize("case", PARITY)
def test_graph_maps_equal_the_engine(case: Case, tmp_path: Path) -> None:
    """Each gradient-free method's map from the graph equals the engine's (float32 both; the
    export itself verified them against float64), at a batch size other than the traced one,
    with explicit targets and -1; the graph has no backward."""
    lm = _loaded(case)
    methods = _methods(case)
    info = export_cam_onnx(lm, tmp_path / "g.onnx", methods=methods)
    assert info.gradients is False and "gradients" not in info.outputs
    assert info.outputs == output_names(methods)
    for c in info.errors:  # the export's own verification: within 1e-4 or 8x PyTorch float32's
        for n, e in info.errors[c].items():
            assert e <= allowed_error(TOL, DEFAULT_FACTOR, info.baseline[c][n]), (c, n, e)
    sess = ort_session(info.path, threads=1)
    x = torch.randn(3, 3, *case.size, generator=torch.Generator().manual_seed(5))
    target = np.array([1, -1, 4], np.int64)
    got = dict(zip(info.outputs, sess.run(info.outputs, {"input": x.numpy(), "target": target})))
    engine = CamEngine(lm.model, lm.layer, layout=case.layout, reshape=lm.reshape)
    top1 = torch.from_numpy(got["logits"]).argmax(1)
    targets = torch.where(torch.from_numpy(target) < 0, top1, torch.from_numpy(target))
    for m, name in zip(methods, ["cam", *info.outputs[3:]]):
        ref = engine(x, targets=targets, method=m).cams.numpy()
        assert relative_error(got[name], ref) <= 1e-3, (m, relative_error(got[name], ref))


def _tiny():
    from camserve.testing.nets import TINY_LABELS, TinyNet

    return from_module(frozen(TinyNet(len(TINY_LABELS), seed=0)),
                       ModelSpec.from_config({"arch": "x:TinyNet", "target_layer": "features",
                                              "input_size": [32, 24], "method": "eigencam",
                                              "methods": ["eigencam", "reciprocam", "kpcacam"]}),
                       labels=TINY_LABELS)


def test_metadata_and_outputs_of_a_gradient_free_graph(tmp_path: Path) -> None:
    info = export_cam_onnx(_tiny(), tmp_path / "g.onnx", methods=("reciprocam", "eigencam"),
                           chunk=5, verify=False)
    proto = onnx.load(str(info.path))
    assert [o.name for o in proto.graph.output] == ["logits", "activations", "cam", "cam_eigencam"]
    props = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(props["gradients"]) is False and json.loads(props["quantize"]) is None
    meta = GraphMeta.from_file(info.path)
    assert meta.gradients is False and meta.output_for("reciprocam") == "cam"
    props["gradients"] = "true"  # metadata that contradicts the methods
    with pytest.raises(GraphFormatError, match="'gradients'"):
        GraphMeta.from_props(props)
    assert set(GRADIENT_FREE) == {"eigencam", "kpcacam", "reciprocam", "vitreciprocam"}
    assert not any(get_method(m).gradients for m in GRADIENT_FREE)


def test_a_gradient_graph_carries_reciprocam_too(tmp_path: Path) -> None:
    info = export_cam_onnx(_tiny(), tmp_path / "g.onnx", methods=("gradcam", "reciprocam"))
    assert info.gradients and info.outputs == ["logits", "activations", "gradients", "cam",
                                                "cam_reciprocam"]


# -- the fallback: a model whose backward has no ONNX form ------------------------------------------

def _warp():
    return from_module(frozen(WarpNet(num_classes=4, seed=0)),
                       ModelSpec(arch="camserve.testing.nets:WarpNet", target_layer="features",
                                 input_size=(20, 24), num_classes=4))


def test_backward_that_does_not_export_proposes_the_gradient_free_graph(tmp_path: Path) -> None:
    with pytest.raises(BackwardExportError, match="gradient-free") as err:
        export_cam_onnx(_warp(), tmp_path / "g.onnx", methods=("gradcam",), exporter="fast")
    assert err.value.methods == ("eigencam", "reciprocam")
    assert "grid_sampler_2d_backward" in str(err.value)  # what failed (the command line exports them)


def test_export_command_prints_the_command_that_works(tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--arch", "camserve.testing.nets:WarpNet", "--num-classes", "4", "--input-size", "20,24",
            "--layer", "features", "--out", str(tmp_path / "w.onnx"), "--methods", "gradcam",
            "--exporter", "fast"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    proposed = err.strip().splitlines()[-1].strip()
    assert proposed == gradient_free_command(argv)
    assert proposed.startswith("camserve-export --arch") and proposed.endswith("--gradient-free")
    import shlex

    assert main(shlex.split(proposed)[1:]) == 0
    out = capsys.readouterr().out
    assert "gradient-free graph" in out
    assert GraphMeta.from_file(tmp_path / "w.onnx").methods == ("eigencam", "reciprocam")
    assert main([*argv[:-4], "--gradient-free", "--methods", "gradcam"]) == 2  # a contradiction
    assert "need gradients" in capsys.readouterr().err


def test_default_gradient_free_methods() -> None:
    assert gradient_free_methods(_warp()) == ("eigencam", "reciprocam")
    vit = next(c for c in CASES if c.layout == "tokens")
    tokens = ModelSpec(arch=vit.name, input_size=vit.size, target_layer=vit.layer, layout="tokens")
    own = ModelSpec(arch="x", input_size=(8, 8), target_layer="f", method="kpcacam")
    assert gradient_free_methods(_Loaded(tokens)) == ("eigencam", "vitreciprocam")
    assert gradient_free_methods(_Loaded(own)) == ("kpcacam",)


class _Loaded:
    """What gradient_free_methods reads of a LoadedModel."""

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec


# -- int8 -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def shapes_int8(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from camserve.models import load_model_dir

    lm = load_model_dir(Path(__file__).resolve().parents[2] / "models" / "shapes")
    out = tmp_path_factory.mktemp("int8") / "shapes.int8.onnx"
    return lm, export_cam_onnx(lm, out, methods=("eigencam", "reciprocam"), quantize="int8")


def test_int8_graph_within_tolerance_of_the_float_graph(shapes_int8: Any, tmp_path: Path) -> None:
    lm, info = shapes_int8
    assert info.quantize == "int8" and info.quantized is not None
    assert info.quantized.failures(INT8_TOLERANCE) == []
    meta = GraphMeta.from_file(info.path)
    assert meta.quantize == "int8" and meta.gradients is False
    ops = {n.op_type for n in onnx.load(str(info.path)).graph.node}
    assert {"ConvInteger", "DynamicQuantizeLinear"} <= ops
    # on the shapes themselves: export the float graph again and compare on real images
    from tools.shapes import make_dataset, to_batch

    data = make_dataset(seed=1234, n=32, stream="evaluate")
    x = to_batch(data.images, lm.spec).numpy()
    flt = export_cam_onnx(lm, tmp_path / "f.onnx", methods=("eigencam", "reciprocam"), verify=False)
    check = compare_quantized(flt.path, info.path, x, threads=1)
    assert check.failures(INT8_TOLERANCE) == [], check


def test_int8_refuses_gradient_graphs(tmp_path: Path) -> None:
    lm = _tiny()
    with pytest.raises(ValueError, match="gradient-free"):
        export_cam_onnx(lm, tmp_path / "g.onnx", methods=("gradcam",), quantize="int8")
    grad = export_cam_onnx(lm, tmp_path / "g.onnx", methods=("gradcam",), verify=False)
    with pytest.raises(QuantizationError, match="gradient-free"):
        quantize_graph(grad.path, tmp_path / "q.onnx")


def test_int8_check_fails_a_graph_that_differs(shapes_int8: Any, tmp_path: Path) -> None:
    """The check is not vacuous: a float graph of other weights is far outside the tolerance."""
    lm, info = shapes_int8
    torch.manual_seed(9)
    other = from_module(type(lm.model)(num_classes=8).eval(), lm.spec, labels=lm.labels)
    flt = export_cam_onnx(other, tmp_path / "o.onnx", methods=("eigencam", "reciprocam"), verify=False)
    x = np.random.default_rng(0).normal(size=(8, 3, 96, 96)).astype(np.float32)
    assert compare_quantized(flt.path, info.path, x).failures(INT8_TOLERANCE)


# -- consumers: the batch job and the onnxruntime backend --------------------------------------------

@pytest.fixture(scope="module")
def free_graph(model: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from .conftest import LABELS, LAYER, MEAN, SIZE, STD

    spec = ModelSpec(arch="torchvision.models.resnet18", input_size=SIZE, mean=MEAN, std=STD,
                     target_layer=LAYER, topk=3)
    out = tmp_path_factory.mktemp("free") / "r18.free.onnx"
    export_cam_onnx(from_module(model, spec, labels=LABELS), out, methods=("reciprocam", "eigencam"))
    return out


def test_batch_job_over_a_gradient_free_graph(free_graph: Path, images: dict[str, Path],
                                              model: torch.nn.Module, tmp_path: Path,
                                              json_lines: Callable[[Path], list[dict]]) -> None:
    from camserve.images import load_image_file, preprocess
    from camserve.onnx.cli import main as batch_main
    from camserve.onnx.job import EXIT_OK

    from .conftest import LAYER, MEAN, SIZE, STD

    out = tmp_path / "out"
    assert batch_main(["--model", str(free_graph), str(images["a"]), str(images["b"]), "--out",
                       str(out), "--save", "npy", "--threads", "1", "--workers", "1"]) == EXIT_OK
    results = json_lines(out / "results.jsonl")
    assert [r["method"] for r in results] == ["reciprocam", "reciprocam"]  # the graph's first
    for r, key in zip(results, ("a", "b")):
        x = preprocess(load_image_file(images[key]), SIZE, MEAN, STD)[None]
        ref = CamEngine(model, LAYER)(x, targets=[r["target"]], method="reciprocam").cams[0].numpy()
        assert relative_error(np.load(out / r["files"]["npy"]), ref) <= 1e-4
    out2 = tmp_path / "out2"
    assert batch_main(["--model", str(free_graph), str(images["a"]), "--out", str(out2),
                       "--method", "eigencam", "--threads", "1", "--workers", "1"]) == EXIT_OK
    assert json_lines(out2 / "results.jsonl")[0]["method"] == "eigencam"
    assert batch_main(["--model", str(free_graph), str(images["a"]), "--out", str(tmp_path / "o3"),
                       "--method", "gradcam"]) != EXIT_OK  # not in this graph


def test_onnx_backend_serves_a_gradient_free_graph(png: Callable[..., bytes], tmp_path: Path) -> None:
    """The backend lists the graph's methods and answers as the PyTorch backend does."""
    from camserve.backends.ort import OnnxBackend
    from camserve.serving import CamService
    from camserve.testing.equality import compare_answers
    lm = _tiny()
    path = tmp_path / "model.cam.onnx"
    export_cam_onnx(lm, path, methods=("eigencam", "reciprocam"), verify=False)
    onnx_svc = CamService(OnnxBackend(path, spec=lm.spec, threads=1))
    assert [m["name"] for m in onnx_svc.describe()["methods"]] == ["eigencam", "reciprocam"]
    rows = [{"data": png(seed=1), "explain": "1", "method": "reciprocam", "target": "0,2"},
            {"data": png(seed=2), "explain": "1"},
            {"data": png(seed=3)},
            {"data": png(seed=4), "explain": "1", "method": "kpcacam"}]  # allowed, not exported
    a, b = CamService(lm).handle_batch(rows), onnx_svc.handle_batch(rows)
    statuses = ([r.status for r in a.results], [r.status for r in b.results])
    assert statuses[1] == [200, 200, 200, 400]
    assert b.results[3].body["type"] == "MethodUnavailable"
    diff = compare_answers([r.body for r in a.results[:3]], [r.body for r in b.results[:3]],
                           (statuses[0][:3], statuses[1][:3]))
    diff.check()
    assert diff.maps == 3
