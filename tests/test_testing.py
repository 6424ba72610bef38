"""camserve.testing: the private TorchServe (ports, config, a start that fails), the fake context,
the handler loader, the tiny nets and model folders."""
from __future__ import annotations

import inspect
import socket
from pathlib import Path

import pytest
import torch
import yaml

from camserve.client import ClientError
from camserve.models import load_model_dir
from camserve.testing.context import FakeContext, MetricsRecorder, default_manifest
from camserve.testing.handler import HandlerLoadError, load_handler, load_handler_module
from camserve.testing.nets import TinyBNNet, calibrate_bn, frozen, small_sequential
from camserve.testing.torchserve import LocalTorchServe, free_ports



# -- torchserve -------------------------------------------------------------------------------------

def test_free_ports_are_distinct_and_bindable() -> None:
    ports = free_ports(5)
    assert len(set(ports)) == 5
    for p in ports:
        with socket.socket() as s:
            s.bind(("127.0.0.1", p))


@pytest.fixture()
def config_props(tmp_path: Path) -> dict[str, str]:
    ts = LocalTorchServe(tmp_path, ["a", "b"], properties={"max_request_size": 1234})
    return dict(line.split("=", 1) for line in ts.config.read_text().splitlines())


def test_config_listens_on_loopback_only(config_props: dict[str, str]) -> None:
    for key in ("inference_address", "management_address", "metrics_address"):
        assert config_props[key].startswith("http://127.0.0.1:")
    assert config_props["grpc_inference_address"] == config_props["grpc_management_address"] == \
        "127.0.0.1"


def test_config_uses_five_distinct_ports(config_props: dict[str, str]) -> None:
    ports = [config_props[k].rsplit(":", 1)[1] for k in ("inference_address", "management_address",
                                                         "metrics_address")]
    ports += [config_props["grpc_inference_port"], config_props["grpc_management_port"]]
    assert len(set(ports)) == 5


def test_config_turns_the_model_api_off_and_keeps_token_auth(config_props: dict[str, str]) -> None:
    assert config_props["enable_model_api"] == "false"
    assert "disable_token_authorization" not in config_props


def test_config_loads_the_models_and_takes_extra_properties(tmp_path: Path,
                                                             config_props: dict[str, str]) -> None:
    assert config_props["load_models"] == "a.mar,b.mar" and config_props["max_request_size"] == "1234"
    assert config_props["model_store"] == str(tmp_path / "store")


def test_server_files_stay_in_its_home(tmp_path: Path) -> None:
    ts = LocalTorchServe(tmp_path, ["a"])
    assert ts.env["TMPDIR"] == str(tmp_path / "tmp") and ts.env["LOG_LOCATION"] == str(tmp_path / "logs")
    assert ts.env["METRICS_LOCATION"] == str(tmp_path / "logs")


@pytest.mark.torchserve
def test_a_model_that_never_gets_ready_fails_with_the_logs_and_stops_the_server(
        tmp_path: Path) -> None:
    ts = LocalTorchServe(tmp_path, ["missing"], ready_timeout=20)
    with pytest.raises(ClientError, match="TorchServe did not get ready") as info:
        with ts:
            pass
    assert "--- torchserve.out ---" in str(info.value)
    assert ts.proc is None  # stopped, process group killed
    with socket.socket() as s:  # the inference port is free again
        s.bind(("127.0.0.1", int(ts.url.rsplit(":", 1)[1])))


# -- context ----------------------------------------------------------------------------------------

def test_context_reads_the_folder_config_and_batch_size(shapes_folder, fake_context) -> None:
    folder = shapes_folder()
    ctx = fake_context(folder, gpu_id=None)
    assert ctx.model_yaml_config == yaml.safe_load((folder / "model-config.yaml").read_text())
    assert ctx.system_properties == {
        "model_dir": str(folder), "gpu_id": None, "batch_size": 8, "server_name": "MMS",
        "server_version": "0.12.0", "limit_max_image_pixels": True}
    assert ctx.manifest["model"]["serializedFile"] == "weights.pt"
    assert ctx.manifest["model"]["modelFile"] == "model.py"


def test_context_without_a_config_file_has_an_empty_config(tmp_path: Path) -> None:
    ctx = FakeContext(tmp_path)
    assert ctx.model_yaml_config == {} and ctx.system_properties["batch_size"] == 1


def test_context_headers_status_and_content_type_are_per_row() -> None:
    ctx = FakeContext("/m", model_yaml_config={})
    ctx.set_requests([{"explain": "True"}, {"explain": "False"}, {}])
    assert [ctx.get_request_header(i, "explain") for i in range(3)] == ["True", "False", None]
    assert ctx.get_request_id(2) == "req-2" and ctx.get_all_request_header(0) == {"explain": "True"}
    ctx.set_response_status(413, "Payload Too Large", 1)
    ctx.set_response_content_type(0, "application/json")
    assert ctx.statuses() == [(200, None), (413, "Payload Too Large"), (200, None)]
    assert ctx.get_response_status(1) == (413, "Payload Too Large")
    assert ctx.content_types() == ["application/json", None, None]


def test_context_refuses_headers_before_a_batch() -> None:
    with pytest.raises(TypeError, match="set_requests"):
        FakeContext("/m", model_yaml_config={}).get_request_header(0, "explain")


def test_metrics_recorder_records_every_call() -> None:
    m = MetricsRecorder()
    m.add_time("HandlerTime", 1.5, None, "ms")
    m.add_counter("CamRequestErrors", 2)
    m.add_counter("CamRequestErrors", 1)
    assert m.names() == {"HandlerTime", "CamRequestErrors"}
    assert m.values("CamRequestErrors") == [2, 1]
    assert m.calls[0].kind == "time" and m.calls[0].unit == "ms"


def test_manifest_names_the_archive_files() -> None:
    man = default_manifest("shapes", model_file="model.py")
    assert man["model"] == {"modelName": "shapes", "handler": "gradcam_handler.py",
                            "modelVersion": "1.0", "serializedFile": "weights.pt",
                            "modelFile": "model.py", "configFile": "model-config.yaml"}


def _params(fn) -> list[str]:
    return [p for p in inspect.signature(fn).parameters if p != "self"]


def test_fake_context_has_torchserves_context_api() -> None:
    ts_context = pytest.importorskip("ts.context", reason="TorchServe is not installed")
    for name in ("get_request_id", "get_request_header", "get_all_request_header",
                 "set_response_content_type", "get_response_content_type", "get_response_status",
                 "set_response_status", "set_all_response_status", "get_response_headers",
                 "set_response_header"):
        assert _params(getattr(FakeContext, name)) == _params(getattr(ts_context.Context, name)), name
    real = ts_context.Context("m", "/m", {}, 4, None, "0.12.0", model_yaml_config={})
    assert set(real.system_properties) == set(FakeContext("/m", model_yaml_config={}).system_properties)


def test_metrics_recorder_has_torchserves_metrics_api() -> None:
    abstract = pytest.importorskip("ts.metrics.metric_cache_abstract",
                                   reason="TorchServe is not installed").MetricCacheAbstract
    for name in ("add_metric", "add_counter", "add_time", "add_size", "add_percent", "add_error"):
        assert _params(getattr(MetricsRecorder, name)) == _params(getattr(abstract, name)), name


# -- handler loader ---------------------------------------------------------------------------------

def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_loader_takes_the_one_class_defined_in_the_module(tmp_path: Path) -> None:
    f = _write(tmp_path / "one_handler.py", "from collections import OrderedDict\n\n"
               "class H:\n    def initialize(self, ctx):\n        self.ctx = ctx\n"
               "    def handle(self, data, ctx):\n        return data\n")
    entry = load_handler(f, context="ctx")
    assert type(entry.instance).__name__ == "H" and entry.instance.ctx == "ctx"
    assert entry.module.__name__ == "one_handler" and entry.handle([1], None) == [1]


def test_loader_refuses_two_classes_like_torchserve(tmp_path: Path) -> None:
    f = _write(tmp_path / "two_handler.py", "class A:\n    pass\n\nclass B:\n    pass\n")
    with pytest.raises(HandlerLoadError, match="exactly one class.*A, B"):
        load_handler(f)


def test_loader_prefers_a_module_level_handle_function(tmp_path: Path) -> None:
    f = _write(tmp_path / "fn_handler.py", "calls = []\n\nclass Unused:\n    pass\n\n"
               "def handle(data, ctx):\n    calls.append(data)\n    return ['ok']\n")
    entry = load_handler(f, context="ctx")
    assert entry.instance is None and entry.module.calls == [None]  # initialize = handle(None, ctx)


def test_loader_refuses_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(HandlerLoadError, match="is not a file"):
        load_handler_module(tmp_path / "nope.py")


def test_the_project_handler_loads_as_torchserve_would(handler_file: Path) -> None:
    entry = load_handler(handler_file, initialize=False)
    assert entry.module.__name__ == "gradcam_handler" and entry.instance is not None


def test_the_project_handler_answers_over_the_fake_context(handler_file: Path, shapes_folder,
                                                           fake_context, png) -> None:
    ctx = fake_context(shapes_folder(), model_name="shapes")
    handler = load_handler(handler_file, ctx).instance
    ctx.set_requests([{"explain": "True"}, {"explain": "False"}, {}])
    out = handler.handle([{"body": png(seed=1, size=(96, 96))}, {"body": png(seed=2)},
                          {"body": b"not an image"}], ctx)
    assert [s for s, _ in ctx.statuses()] == [200, 200, 400]
    assert ctx.content_types() == ["application/json"] * 3
    assert ['"explanations"' in o for o in out] == [True, False, False]
    assert ctx.metrics.values("CamExplainedRows") == [1]
    assert ctx.metrics.values("CamRequestErrors") == [1]


# -- nets and model folders -------------------------------------------------------------------------

def test_calibrate_bn_gives_running_statistics_of_the_input() -> None:
    net = small_sequential()
    assert torch.equal(net[1].running_var, torch.ones(8))
    calibrate_bn(net, (16, 12), steps=2)
    assert not net.training and not torch.equal(net[1].running_var, torch.ones(8))
    before = net[1].running_mean.clone()
    calibrate_bn(net, (16, 12), steps=2)  # the same seeded input: the same statistics
    torch.testing.assert_close(net[1].running_mean, before)


def test_frozen_is_eval_without_gradients() -> None:
    net = frozen(TinyBNNet())
    assert not net.training and not any(p.requires_grad for p in net.parameters())


def test_model_folder_loads_with_the_one_loader(model_folder, tiny_bn_net) -> None:
    loaded = load_model_dir(model_folder())
    assert loaded.labels == ["circle", "square", "star"] and loaded.layer == "features.3"
    x = torch.rand(2, 3, 40, 32)
    torch.testing.assert_close(loaded.model(x), tiny_bn_net(x))


def test_shapes_folder_takes_handler_overrides(shapes_folder) -> None:
    folder = shapes_folder(topk=5, outputs=None)
    handler = yaml.safe_load((folder / "model-config.yaml").read_text())["handler"]
    assert handler["topk"] == 5 and "outputs" not in handler
    assert load_model_dir(folder).num_classes == 8


def test_image_fixtures_round_trip(png, jpeg, decode_png, open_image) -> None:
    import base64

    a = decode_png(png(seed=3, size=(20, 10)))
    assert a.shape == (10, 20, 3) and a.dtype.name == "uint8"
    assert (decode_png(base64.b64encode(png(seed=3, size=(20, 10))).decode()) == a).all()
    assert open_image(jpeg(color=(0, 0, 255))).format == "JPEG"
    assert decode_png(png(mode="L")).ndim == 2


def test_image_file_takes_the_format_from_the_suffix(image_file, open_image, tmp_path: Path) -> None:
    path = image_file(tmp_path / "sub" / "a.jpg", size=(30, 20), mode="L")
    img = open_image(path.read_bytes())
    assert img.format == "JPEG" and img.size == (30, 20) and img.mode == "L"


def test_shapes_config_removes_keys_given_none(shapes_config) -> None:
    cfg = shapes_config(target_layer=None, topk=1)
    assert cfg["batchSize"] == 8 and "target_layer" not in cfg["handler"]
    assert cfg["handler"]["topk"] == 1 and cfg["handler"]["arch"] == "model:ShapesNet"


# -- nothing outside camserve.testing imports it ----------------------------------------------------
def _imported_modules(path: Path, package: str) -> list[str]:
    """Absolute names of the modules a file imports (relative imports resolved)."""
    import ast

    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            found += [base] + [f"{base}.{alias.name}" for alias in node.names]
    return found


def test_production_code_never_imports_camserve_testing() -> None:
    root = Path(__file__).resolve().parents[1]
    files = [p for p in (root / "camserve").rglob("*.py") if "testing" not in p.relative_to(root).parts]
    files += sorted((root / "handler").glob("*.py")) + sorted((root / "export").glob("*.py"))
    assert any(p.parts[-2:] == ("kserve", "model.py") for p in files)
    offenders = {}
    for path in files:
        rel = path.relative_to(root).with_suffix("")
        package = ".".join(rel.parts[:-1])
        bad = [m for m in _imported_modules(path, package)
               if m == "camserve.testing" or m.startswith("camserve.testing.")]
        if bad:
            offenders[str(rel)] = bad
    assert offenders == {}


def test_the_import_check_sees_a_relative_import(tmp_path: Path) -> None:
    f = tmp_path / "m.py"
    f.write_text("from ..testing.torchserve import free_ports\nfrom . import testing\n")
    assert "camserve.testing.torchserve" in _imported_modules(f, "camserve.kserve")
    assert "camserve.kserve.testing" in _imported_modules(f, "camserve.kserve")
