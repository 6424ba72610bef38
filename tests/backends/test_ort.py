"""camserve.backends.ort: serving from the exported CAM graph answers as the PyTorch engine does.

Each architecture is exported once (every exportable method) and served by both backends through
:class:`camserve.serving.CamService`; one batch mixes predict rows, default targets, targets by
label, several targets per row and every method, and the two answers must agree (scores within
1e-4, heatmaps within one grey level, the same bbox). Then what only this backend has: the
forward graph for predict rows, runs in chunks, the graph's methods, the folder against the graph.
"""
from __future__ import annotations

import base64
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

pytest.importorskip("onnxruntime")

from camserve.backends import GRAPH_FILE, TorchBackend, load_backend  # noqa: E402
from camserve.backends.ort import OnnxBackend, forward_graph  # noqa: E402
from camserve.methods import available_methods  # noqa: E402
from camserve.models import ConfigError, LoadedModel, ModelSpec, from_module, load_model_dir  # noqa: E402
from camserve.onnx.export import export_cam_onnx  # noqa: E402
from camserve.serving import CamService  # noqa: E402
from camserve.testing.equality import compare_answers  # noqa: E402
from camserve.testing.nets import (TINY_LABELS, TinyBNNet, TinyEmbedNet, TinyNet,  # noqa: E402
                                   TinySegNet, calibrate_bn, frozen, small_sequential)

GRAPH_METHODS = tuple(available_methods(exportable=True))


def _shapes(num_classes: int) -> torch.nn.Module:
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "models" / "shapes" / "model.py"
    spec = importlib.util.spec_from_file_location("shapes_model_for_ort_tests", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    torch.manual_seed(3)
    return mod.ShapesNet(num_classes=num_classes)


def _resnet18(num_classes: int) -> torch.nn.Module:
    import torchvision

    torch.manual_seed(4)
    return torchvision.models.resnet18(num_classes=num_classes)


#: name -> (builder(num_classes), target layer, input size)
ARCHS = {
    "tinynet": (lambda n: TinyNet(n, seed=0), "features", 32),
    "tinybn": (lambda n: (torch.manual_seed(1), TinyBNNet(n))[1], "features.3", 40),
    "sequential": (lambda n: small_sequential(n, seed=2), "3", 24),
    "shapesnet": (_shapes, "features", 96),
    "resnet18": (_resnet18, "layer4", 64),
}


def loaded_arch(name: str) -> LoadedModel:
    build, layer, size = ARCHS[name]
    model = calibrate_bn(build(len(TINY_LABELS)), (size, size))
    spec = ModelSpec.from_config({"arch": f"x:{name}", "target_layer": layer, "input_size": size,
                                  "mean": [0.5] * 3, "std": [0.25] * 3, "topk": 3})
    return from_module(frozen(model), spec, labels=TINY_LABELS)


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    """``graphs(name, loaded) -> Path``: each architecture's graph, exported once."""
    made: dict[str, Path] = {}

    def get(name: str, loaded: LoadedModel) -> Path:
        if name not in made:
            path = tmp_path_factory.mktemp(name) / GRAPH_FILE
            export_cam_onnx(loaded, path, methods=GRAPH_METHODS, verify=False)
            made[name] = path
        return made[name]
    return get


def mixed_rows(png, size: int) -> tuple[list[dict], list[bool]]:
    """Predict rows, default targets, a label, several targets, every graph method, all outputs."""
    imgs = [png(seed=s, size=(size + 8 * (s % 3), size)) for s in range(8)]
    rows = [{"body": imgs[0]},
            {"data": imgs[1], "explain": "true"},
            {"data": imgs[2], "explain": "true", "target": "star", "method": "layercam"},
            {"data": imgs[3], "topk": "2"},
            {"data": imgs[4], "explain": "true", "target": "0,5,2",
             "outputs": "heatmap,overlay,raw,bbox", "method": "gradcam++"},
            {"data": imgs[5], "explain": "true", "method": "hirescam"},
            {"data": imgs[6], "explain": "true", "method": "xgradcam", "target": "1,1"},
            {"body": imgs[7]}]
    return rows, [False, False, False, False, False, False, False, True]


def bodies(outcome) -> list[dict]:
    return [r.body for r in outcome.results]


def raw_diff(a: list[dict], b: list[dict]) -> float:
    """Largest relative difference of the raw maps (rows asking for them)."""
    worst = 0.0
    for x, y in zip(a, b):
        for e, f in zip(x.get("explanations", ()), y.get("explanations", ())):
            if "raw" in e:
                ra, rb = np.asarray(e["raw"]["data"]), np.asarray(f["raw"]["data"])
                worst = max(worst, float(np.abs(ra - rb).max() / max(np.abs(ra).max(), 1e-12)))
    return worst


@pytest.mark.parametrize("arch", [pytest.param(a, marks=pytest.mark.slow)
                                  if a in ("shapesnet", "resnet18") else a for a in ARCHS])
def test_both_backends_answer_alike(arch, graphs, png):
    loaded = loaded_arch(arch)
    graph = graphs(arch, loaded)
    torch_svc = CamService(loaded)
    onnx_svc = CamService(OnnxBackend(graph, spec=loaded.spec, threads=1))
    rows, flags = mixed_rows(png, ARCHS[arch][2])
    a, b = torch_svc.handle_batch(rows, flags), onnx_svc.handle_batch(rows, flags)
    statuses = ([r.status for r in a.results], [r.status for r in b.results])
    assert statuses[0] == [200] * len(rows)
    diff = compare_answers(bodies(a), bodies(b), statuses)
    diff.check()
    assert diff.maps == 9 and raw_diff(bodies(a), bodies(b)) < 1e-3
    assert (a.stats.explained_rows, a.stats.maps) == (b.stats.explained_rows, b.stats.maps)


# -- what runs: the forward graph for predict rows, one CAM run per chunk ------------------------

class Counting:
    """A session that records the rows and outputs of each run."""

    def __init__(self, session) -> None:
        self.session = session
        self.runs: list[tuple[int, tuple[str, ...]]] = []
        self.feeds: list[dict] = []

    def run(self, fetch, feed):
        self.runs.append((len(feed["input"]), tuple(fetch)))
        self.feeds.append({k: np.array(v) for k, v in feed.items()})
        return self.session.run(fetch, feed)

    def __getattr__(self, name):
        return getattr(self.session, name)


@pytest.fixture()
def counted(graphs):
    """A TinyNet service on onnxruntime whose two sessions count their runs."""
    loaded = loaded_arch("tinynet")
    backend = OnnxBackend(graphs("tinynet", loaded), spec=loaded.spec, threads=1, chunk=4)
    svc = CamService(backend)
    backend.cam_session = Counting(backend.cam_session)
    backend.forward_session = Counting(backend.forward_session)
    return svc, backend


def test_predict_only_batches_run_the_forward_graph_only(counted, png):
    svc, backend = counted
    svc.handle_batch([{"body": png(seed=i)} for i in range(3)])
    assert backend.forward_session.runs == [(3, ("logits",))] and backend.cam_session.runs == []


def test_predict_rows_beside_explain_rows_skip_the_backward(counted, png):
    svc, backend = counted
    rows = [{"body": png(seed=i)} for i in range(5)]
    svc.handle_batch(rows, [False, True, False, True, False])
    assert backend.forward_session.runs == [(3, ("logits",))]
    assert backend.cam_session.runs == [(2, ("logits", "cam"))]


def test_targets_are_graph_rows_in_chunks_fetching_the_methods_asked(counted, png):
    svc, backend = counted
    rows = [{"data": png(seed=1), "explain": "1", "target": "0,1,2"},
            {"data": png(seed=2), "explain": "1", "method": "layercam"},
            {"data": png(seed=3), "explain": "1", "target": "3,4", "method": "layercam"}]
    out = svc.handle_batch(rows)
    assert [r.status for r in out.results] == [200] * 3
    assert [len(r.body["explanations"]) for r in out.results] == [3, 1, 2]
    assert backend.cam_session.runs == [(4, ("logits", "cam", "cam_layercam")),
                                        (2, ("logits", "cam", "cam_layercam"))]
    assert backend.forward_session.runs == []


def test_chunking_does_not_change_answers(graphs, png):
    loaded = loaded_arch("tinynet")
    rows = [{"data": png(seed=i), "explain": "1", "target": "0,1,2,3"} for i in range(3)]
    outs = [CamService(OnnxBackend(graphs("tinynet", loaded), spec=loaded.spec, chunk=c,
                                   threads=1)).handle_batch(rows) for c in (1, 5, 32)]
    for other in outs[1:]:
        compare_answers(bodies(outs[0]), bodies(other)).check(score=1e-5)


# -- the graph's methods ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def two_method_graph(tmp_path_factory) -> tuple[Path, LoadedModel]:
    lm = from_module(frozen(TinyNet(len(TINY_LABELS), seed=0)),
                     ModelSpec.from_config({"arch": "x:TinyNet", "target_layer": "features",
                                            "input_size": 32}), labels=TINY_LABELS)
    path = tmp_path_factory.mktemp("two") / GRAPH_FILE
    export_cam_onnx(lm, path, methods=("gradcam", "layercam"), verify=False)
    return path, lm


def test_a_method_the_graph_lacks_is_400_naming_the_ones_it_has(two_method_graph, png):
    svc = CamService(OnnxBackend(two_method_graph[0], threads=1))
    assert [m["name"] for m in svc.describe()["methods"]] == ["gradcam", "layercam"]
    out = svc.handle_batch([{"data": png(seed=1), "explain": "1", "method": "hirescam"},
                            {"data": png(seed=1), "explain": "1", "method": "eigencam"},
                            {"data": png(seed=1), "explain": "1", "method": "nope"},
                            {"data": png(seed=1), "explain": "1", "method": "layercam"}])
    assert [r.status for r in out.results] == [400, 400, 422, 200]
    for res, m in zip(out.results[:2], ("hirescam", "eigencam")):
        assert res.body["type"] == "MethodUnavailable"
        assert res.body["message"] == (f"invalid value for method: {m!r} is not served by this "
                                       f"model (available: gradcam, layercam)")
    assert "allowed: gradcam, layercam" in out.results[2].body["message"]


def test_a_default_method_the_graph_lacks_is_a_config_error(two_method_graph):
    spec = ModelSpec.from_config({"arch": "x:TinyNet", "method": "hirescam"})
    with pytest.raises(ConfigError, match=r"handler.method: 'hirescam' is not in model.cam.onnx "
                                          r"\(its methods: gradcam, layercam"):
        OnnxBackend(two_method_graph[0], spec=spec, threads=1)


def test_describe_names_the_backend_its_graph_and_threads(two_method_graph):
    d = CamService(OnnxBackend(two_method_graph[0], threads=1)).describe()
    assert (d["backend"], d["graph"], d["threads"], d["providers"]) == (
        "onnxruntime", GRAPH_FILE, 1, ["CPUExecutionProvider"])
    sess = OnnxBackend(two_method_graph[0], threads=1).cam_session
    assert sess.get_session_options().intra_op_num_threads == 1


def test_the_forward_graph_is_the_cam_graphs_forward(two_method_graph):
    import onnx

    path, lm = two_method_graph
    sub = onnx.load_from_string(forward_graph(path))
    full = onnx.load(str(path))
    assert [o.name for o in sub.graph.output] == ["logits"]
    assert [i.name for i in sub.graph.input] == ["input"]
    assert len(sub.graph.node) < len(full.graph.node)
    backend = OnnxBackend(path, threads=1)
    x = torch.rand(3, 3, 32, 32)
    ref = backend.cam_session.run(["logits"], {"input": x.numpy()})[0]
    np.testing.assert_array_equal(backend.predict(x).numpy(), ref)
    torch.testing.assert_close(backend.predict(x), lm.model(x), rtol=1e-4, atol=1e-5)


# -- every task whose graph exports: the task's target inputs ---------------------------------------

SEG_LABELS = ["background", "a", "b", "c"]
EMB_LABELS = [str(i) for i in range(6)]
#: task -> (random-weight net, labels, handler keys, input size (H, W))
TASK_NETS = {
    "multilabel": (lambda: TinyNet(len(TINY_LABELS), seed=5), TINY_LABELS, {"threshold": 0.3}, 32),
    "segmentation": (lambda: TinySegNet(4, seed=1), SEG_LABELS, {"background": 0}, [24, 40]),
    "embedding": (lambda: TinyEmbedNet(6, seed=1), EMB_LABELS, {}, [24, 40]),
}


def task_loaded(task: str) -> LoadedModel:
    build, labels, keys, size = TASK_NETS[task]
    spec = ModelSpec.from_config({"arch": "x:Net", "task": task, "target_layer": "features",
                                  "input_size": size, "topk": 3, **keys})
    return from_module(frozen(calibrate_bn(build(), spec.input_size)), spec, labels=labels)


def mask_png(size: tuple[int, int], box: tuple[int, int, int, int]) -> bytes:
    """A region mask PNG of ``size`` (W, H): 255 inside ``box``."""
    import io

    from PIL import Image

    arr = np.zeros((size[1], size[0]), np.uint8)
    arr[box[1]:box[3], box[0]:box[2]] = 255
    buf = io.BytesIO()
    Image.fromarray(arr, "L").save(buf, "PNG")
    return buf.getvalue()


def task_rows(task: str, png) -> list[dict]:
    """Predict rows, default targets, named targets, the task's own targets (a region as a box
    and as a mask; a reference embedding and a reference image), several methods and outputs."""
    img = [png(seed=70 + s, size=(48 + 8 * (s % 3), 30)) for s in range(9)]
    if task == "multilabel":
        return [{"data": img[i], "explain": "1"} for i in range(4)] + [
            {"data": img[4], "explain": "1", "target": "star,ring", "method": "layercam"},
            {"data": img[5], "explain": "1", "threshold": "0.9"}, {"body": img[6]}]
    if task == "segmentation":
        return [{"body": img[0]},
                {"data": img[1], "explain": "1"},
                {"data": img[2], "explain": "1", "target": "a,c", "method": "layercam"},
                {"data": img[3], "explain": "1", "region": "[2, 3, 30, 20]"},
                {"data": img[4], "explain": "1", "target": "b", "method": "gradcam++",
                 "region": base64.b64encode(mask_png((48 + 8 * (4 % 3), 30), (5, 5, 40, 25))).decode(),
                 "outputs": "heatmap,overlay,raw,bbox"},
                {"data": img[5], "explain": "1", "method": "hirescam", "topk": "1"},
                {"data": img[6], "region": "[0, 0, 10, 10]"}]
    return [{"body": img[0]},
            {"data": img[1], "explain": "1", "reference_embedding": "[1, 0.5, -1, 0, 2, 1]"},
            {"data": img[2], "explain": "1", "reference": img[3], "method": "layercam"},
            {"data": img[4], "explain": "1"},
            {"data": img[5], "reference": img[6]},
            {"data": img[7], "explain": "1", "reference": base64.b64encode(img[8]).decode(),
             "method": "xgradcam", "outputs": "heatmap,bbox,raw"}]


@pytest.fixture(scope="module")
def task_graphs(tmp_path_factory):
    """``task_graphs(task) -> (LoadedModel, graph path)``, each exported once."""
    made: dict[str, tuple[LoadedModel, Path]] = {}

    def get(task: str) -> tuple[LoadedModel, Path]:
        if task not in made:
            lm = task_loaded(task)
            path = tmp_path_factory.mktemp(task) / GRAPH_FILE
            export_cam_onnx(lm, path, methods=GRAPH_METHODS, verify=False)
            made[task] = lm, path
        return made[task]
    return get


#: task -> explanations the rows of :func:`task_rows` get (each target its map)
TASK_MAPS = {"multilabel": None, "segmentation": None, "embedding": 5}


@pytest.mark.parametrize("task", list(TASK_NETS))
def test_every_task_is_served_alike(task, task_graphs, png):
    lm, graph = task_graphs(task)
    rows = task_rows(task, png)
    a = CamService(lm).handle_batch(rows)
    backend = OnnxBackend(graph, spec=lm.spec, threads=1)
    b = CamService(backend).handle_batch(rows)
    assert [r.status for r in a.results] == [200] * len(rows), [r.body for r in a.results]
    diff = compare_answers(bodies(a), bodies(b), ([r.status for r in a.results],
                                                  [r.status for r in b.results]))
    diff.check()
    assert raw_diff(bodies(a), bodies(b)) < 1e-3
    assert diff.maps == a.stats.maps == b.stats.maps > len(rows) // 2
    if TASK_MAPS[task] is not None:
        assert diff.maps == TASK_MAPS[task]
    assert [g.name for g in backend.inputs] == [i.name for i in backend.meta.inputs]


def test_segmentation_rows_feed_their_regions(task_graphs, png):
    """A box region is fed as its weights at the input size; a default target as its class's
    predicted mask (not the graph's default, so that the answer's targets are the task's)."""
    lm, graph = task_graphs("segmentation")
    backend = OnnxBackend(graph, spec=lm.spec, threads=1)
    svc = CamService(backend)
    backend.cam_session = Counting(backend.cam_session)
    rows = [{"data": png(seed=1, size=(80, 48)), "explain": "1", "region": "[0, 0, 40, 24]",
             "target": "b"}, {"data": png(seed=2, size=(40, 24)), "explain": "1", "target": "c"}]
    out = svc.handle_batch(rows)
    assert [r.status for r in out.results] == [200, 200]
    [feed] = backend.cam_session.feeds
    assert feed["target"].tolist() == [2, 3] and feed["region"].shape == (2, 24, 40)
    assert feed["region"][0, :12, :20].min() == 1.0 and feed["region"][0].sum() == 12 * 20
    predicted = backend.predict(torch.from_numpy(feed["input"][1:])).argmax(dim=1)[0] == 3
    np.testing.assert_array_equal(feed["region"][1], predicted.float().numpy())


def test_embedding_rows_without_a_reference_run_no_cam_graph(task_graphs, png):
    lm, graph = task_graphs("embedding")
    backend = OnnxBackend(graph, spec=lm.spec, threads=1)
    svc = CamService(backend)
    backend.cam_session = Counting(backend.cam_session)
    backend.forward_session = Counting(backend.forward_session)
    out = svc.handle_batch([{"data": png(seed=i), "explain": "1"} for i in range(3)])
    assert [r.status for r in out.results] == [200] * 3
    assert all(r.body["explanations"] == [] and r.body["similarity"] is None for r in out.results)
    assert backend.cam_session.runs == [] and backend.forward_session.runs == [(3, ("embedding",))]


def test_a_detection_graph_is_refused_naming_the_torch_backend(two_method_graph, monkeypatch):
    import dataclasses

    from camserve.onnx.format import GraphMeta

    meta = GraphMeta.from_file(two_method_graph[0])
    detection = dataclasses.replace(meta, spec=dataclasses.replace(meta.spec, task="detection"))
    monkeypatch.setattr(GraphMeta, "from_file", classmethod(lambda cls, path: detection))
    with pytest.raises(ConfigError, match=r"handler.backend: onnxruntime does not serve detection "
                                          r"graphs \(model.cam.onnx\); serve this model with "
                                          r"backend: torch"):
        OnnxBackend(two_method_graph[0], threads=1)


# -- the folder against its graph --------------------------------------------------------------------

@pytest.fixture()
def onnx_folder(model_folder):
    """A TinyBNNet model folder with its exported graph and ``backend: onnxruntime``."""
    folder = model_folder()
    export_cam_onnx(load_model_dir(folder), folder / GRAPH_FILE, methods=("hirescam", "gradcam"),
                    verify=False)
    set_handler(folder, backend="onnxruntime")
    return folder


def set_handler(folder: Path, **keys) -> None:
    cfg = yaml.safe_load((folder / "model-config.yaml").read_text())
    cfg["handler"].update(keys)
    (folder / "model-config.yaml").write_text(yaml.safe_dump(cfg))


def test_a_folder_serves_its_graph_without_the_model_code(onnx_folder, png):
    (onnx_folder / "model.py").unlink()
    (onnx_folder / "weights.pt").unlink()
    svc = CamService.from_model_dir(onnx_folder, threads=1)
    assert (svc.backend.name, svc.layer, svc.labels) == ("onnxruntime", "features.3",
                                                         ["circle", "square", "star"])
    assert svc.spec.method == "hirescam" and svc.spec.topk == 2
    [res] = svc.handle_batch([{"body": png(seed=1)}], [True]).results
    assert res.status == 200 and res.body["explanations"][0]["method"] == "hirescam"


def test_the_folder_and_the_torch_backend_agree(onnx_folder, png):
    rows = [{"data": png(seed=i, size=(50, 40)), "explain": "1", "target": "star,circle"}
            for i in range(3)]
    a = CamService.from_model_dir(onnx_folder, overrides={"backend": "torch"}).handle_batch(rows)
    b = CamService.from_model_dir(onnx_folder).handle_batch(rows)
    compare_answers(bodies(a), bodies(b)).check()


@pytest.mark.parametrize("keys, needle", [
    ({"input_size": [48, 48]}, "handler.input_size: [48, 48], but the graph was exported with "
                               "[40, 32]"),
    ({"target_layer": "features.1"}, "handler.target_layer: 'features.1', but the graph"),
    ({"mean": [0.4, 0.5, 0.5]}, "handler.mean"),
    ({"num_classes": 4}, "handler.num_classes"),
    ({"method": "layercam"}, "handler.method: 'layercam' is not in model.cam.onnx"),
])
def test_a_folder_key_that_contradicts_the_graph_is_named(onnx_folder, keys, needle):
    set_handler(onnx_folder, **keys)
    with pytest.raises(ConfigError) as ei:
        CamService.from_model_dir(onnx_folder)
    assert needle in str(ei.value) and "export" in str(ei.value)


def test_labels_that_differ_from_the_graphs_are_named(onnx_folder):
    (onnx_folder / "index_to_name.json").write_text('{"0": "circle", "1": "disc", "2": "star"}')
    with pytest.raises(ConfigError, match=r"handler.labels: label 1 is 'disc' in the folder but "
                                          r"'square' in model.cam.onnx"):
        CamService.from_model_dir(onnx_folder)


def test_a_missing_or_foreign_graph_is_named(onnx_folder, tmp_path):
    (onnx_folder / GRAPH_FILE).rename(tmp_path / "moved.onnx")
    with pytest.raises(ConfigError, match="model.cam.onnx.*does not exist.*export_onnx|"
                                          "does not exist"):
        CamService.from_model_dir(onnx_folder)
    from camserve.onnx.export import export_plain_onnx

    export_plain_onnx(TinyBNNet(3).eval(), onnx_folder / GRAPH_FILE, (40, 32))
    with pytest.raises(ConfigError, match="not a camserve CAM graph"):
        CamService.from_model_dir(onnx_folder)


def test_an_archives_serialized_graph_is_served(onnx_folder):
    (onnx_folder / GRAPH_FILE).rename(onnx_folder / "other.onnx")
    spec = ModelSpec.from_config(yaml.safe_load((onnx_folder / "model-config.yaml").read_text())[
        "handler"])
    backend = load_backend(spec, onnx_folder, weights=onnx_folder / "other.onnx", threads=1)
    assert backend.graph.name == "other.onnx"


def test_cuda_without_its_provider_falls_back_to_cpu_with_a_warning(two_method_graph, caplog):
    with caplog.at_level(logging.WARNING):
        backend = OnnxBackend(two_method_graph[0], device="cuda:0", threads=1)
    assert backend.providers == ["CPUExecutionProvider"]
    assert any("CUDAExecutionProvider is not available" in r.getMessage() for r in caplog.records)


def test_an_unknown_backend_is_a_config_error():
    with pytest.raises(ConfigError, match=r"handler.backend: 'tensorflow' \(known: torch, "
                                          r"onnxruntime\)"):
        ModelSpec.from_config({"arch": "x:Y", "backend": "tensorflow"})


# -- the trained dense models ------------------------------------------------------------------------

def _dense_rows(task: str, n: int) -> list[dict]:
    """Evaluation-stream images of the dense shapes (one to three shapes each): predict rows,
    default targets, every graph method, and the task's own targets (a ground-truth box as the
    region of the class drawn there; named labels)."""
    import io

    from PIL import Image

    from tools.dense_shapes import make_dense_dataset

    from camserve.methods import get_method

    data = make_dense_dataset(4321, n, stream="evaluate")
    methods = [m for m in GRAPH_METHODS if get_method(m).cheap]  # a folder's default methods
    rows = []
    for i, img in enumerate(data.images):
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, "PNG")
        row: dict = {"data": buf.getvalue()}
        if i % 3 == 1:
            row.update(explain="1", method=methods[i % len(methods)])
        elif i % 3 == 2:
            row.update(explain="1", outputs="heatmap,bbox,raw", method=methods[(i + 2) % len(methods)])
            lab = int(data.labels[i, 0])
            if task == "segmentation":
                row.update(region=json.dumps([int(v) for v in data.boxes[i, 0]]), target=str(lab + 1))
            else:
                row.update(target=f"{lab},{(lab + 3) % 8}")
        rows.append(row)
    return rows


@pytest.mark.slow
@pytest.mark.parametrize("folder", ["shapes-seg", "shapes-multi"])
def test_the_trained_dense_models_are_served_alike(folder, tmp_path):
    """models/shapes-seg and models/shapes-multi, their graphs exported as ``make archive
    BACKEND=onnxruntime`` does, on both backends over 24 evaluation-stream images."""
    import shutil

    from scripts.archive import export_graph

    root = Path(__file__).resolve().parents[2]
    served = tmp_path / folder
    shutil.copytree(root / "models" / folder, served,
                    ignore=shutil.ignore_patterns("samples", GRAPH_FILE))
    export_graph(served, verify=False)
    a_svc = CamService.from_model_dir(served, overrides={"backend": "torch"}, threads=1)
    b_svc = CamService.from_model_dir(served, overrides={"backend": "onnxruntime"}, threads=1)
    rows = _dense_rows(a_svc.task.name, 24)
    a, b = a_svc.handle_batch(rows), b_svc.handle_batch(rows)
    assert [r.status for r in a.results] == [200] * len(rows)
    diff = compare_answers(bodies(a), bodies(b), ([r.status for r in a.results],
                                                  [r.status for r in b.results]))
    print(f"{folder}, torch vs onnxruntime over {len(rows)} images: {diff}")
    diff.check()
    assert diff.maps >= 16 and raw_diff(bodies(a), bodies(b)) < 1e-3
