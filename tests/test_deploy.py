"""The deployment kit (deploy/): manifests, container images, and the TorchServe layout on KServe.

Manifests are loaded strictly into the KServe SDK's typed models (kserve.models, and the
Kubernetes client's models for the core types inside them): every key must be a field of its
model, and the constructors check required fields. The layout test runs `make kserve-layout`'s
command, then starts a real TorchServe with the ServingRuntime's arguments against that layout
(its addresses moved to free loopback ports) and drives it with KServe v1/v2 bodies.
"""
from __future__ import annotations

import base64
import json
import os
import re
import signal
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any, Iterator

import pytest
import requests
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
MANIFESTS = sorted((DEPLOY / "kserve").glob("*.yaml"))
MODEL_DIR = ROOT / "models" / "shapes"
SAMPLES = sorted((MODEL_DIR / "samples").glob("*.png"))
BIN = Path(sys.executable).parent


# -- strict typed loading ----------------------------------------------------------------------------
def _model_class(name: str) -> type:
    import kubernetes.client.models as k8s

    from camserve.kserve import import_kserve

    import_kserve()
    import kserve.models as kmodels

    for mod in (kmodels, k8s):
        if hasattr(mod, name):
            return getattr(mod, name)
    raise LookupError(f"no model class {name}")


def typed(data: Any, klass: str, where: str = "$") -> Any:
    """``data`` as an instance of the SDK model ``klass``; unknown keys raise ValueError."""
    if data is None:
        return None
    m = re.fullmatch(r"[lL]ist\[(.*)\]", klass)
    if m:
        assert isinstance(data, list), f"{where}: expected a list"
        return [typed(v, m.group(1), f"{where}[{i}]") for i, v in enumerate(data)]
    m = re.fullmatch(r"dict\(([^,]*), (.*)\)", klass) or re.fullmatch(r"Dict\[([^,]*), (.*)\]", klass)
    if m:
        assert isinstance(data, dict), f"{where}: expected a mapping"
        return {k: typed(v, m.group(2), f"{where}.{k}") for k, v in data.items()}
    if klass in ("str", "int", "bool", "float", "object", "datetime", "date"):
        if klass == "str":
            assert isinstance(data, str), f"{where}: expected a string, got {data!r}"
        if klass == "int":
            assert isinstance(data, int) and not isinstance(data, bool), f"{where}: expected int"
        if klass == "bool":
            assert isinstance(data, bool), f"{where}: expected a boolean"
        return data
    cls = _model_class(klass)
    assert isinstance(data, dict), f"{where}: expected a mapping for {klass}"
    by_key = {v: k for k, v in cls.attribute_map.items()}
    unknown = sorted(set(data) - set(by_key))
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {unknown} for {klass}")
    kwargs = {by_key[k]: typed(v, cls.openapi_types[by_key[k]], f"{where}.{k}")
              for k, v in data.items()}
    return cls(**kwargs)


def load_manifest(path: Path) -> Any:
    doc = yaml.safe_load(path.read_text())
    kind = {"InferenceService": "V1beta1InferenceService",
            "ServingRuntime": "V1alpha1ServingRuntime"}[doc["kind"]]
    return typed(doc, kind)


def test_every_manifest_loads_into_the_sdk_models() -> None:
    assert {p.name for p in MANIFESTS} == {"predictor-inferenceservice.yaml",
                                           "torchserve-inferenceservice.yaml",
                                           "torchserve-runtime.yaml"}
    for path in MANIFESTS:
        obj = load_manifest(path)
        assert obj.api_version.startswith("serving.kserve.io/"), path.name


def test_the_strict_loader_catches_a_misspelt_field() -> None:
    doc = yaml.safe_load((DEPLOY / "kserve" / "predictor-inferenceservice.yaml").read_text())
    doc["spec"]["predictor"]["containers"][0]["readinessProbes"] = {}
    with pytest.raises(ValueError, match="readinessProbes"):
        typed(doc, "V1beta1InferenceService")


def _resources_ok(res: Any) -> None:
    assert res.requests["cpu"] and res.requests["memory"]
    assert res.requests["nvidia.com/gpu"] == res.limits["nvidia.com/gpu"] == "1"


def test_native_predictor_manifest() -> None:
    isvc = load_manifest(DEPLOY / "kserve" / "predictor-inferenceservice.yaml")
    pred = isvc.spec.predictor
    assert pred.min_replicas >= 1 and pred.max_replicas > pred.min_replicas
    assert pred.scale_metric == "concurrency" and pred.scale_target > 0
    [c] = pred.containers
    assert c.name == "kserve-container" and ":" in c.image and not c.image.endswith(":latest")
    assert c.args[0] == "/mnt/models" and "--host=0.0.0.0" in c.args
    name = next(a.split("=", 1)[1] for a in c.args if a.startswith("--model-name="))
    assert c.readiness_probe.http_get.path == f"/v1/models/{name}"
    assert c.liveness_probe.http_get.path == "/v2/health/live"
    assert c.readiness_probe.http_get.port == c.ports[0].container_port == 8080
    env = {e.name: e.value for e in c.env}
    assert env["STORAGE_URI"].startswith(("pvc://", "s3://", "gs://"))
    assert c.security_context.run_as_non_root is True
    _resources_ok(c.resources)
    assert isvc.metadata.annotations["prometheus.kserve.io/path"] == "/metrics"
    # the arguments are the CLI's own
    from camserve.kserve.__main__ import build_parser
    args = build_parser().parse_args(c.args)
    assert args.host == "0.0.0.0" and args.http_port == 8080 and args.model_name == name
    assert args.no_ui  # the pod serves the API only; the viewer page is for a local predictor


def test_torchserve_runtime_and_inferenceservice() -> None:
    rt = load_manifest(DEPLOY / "kserve" / "torchserve-runtime.yaml")
    isvc = load_manifest(DEPLOY / "kserve" / "torchserve-inferenceservice.yaml")
    [c] = rt.spec.containers
    assert c.args[:2] == ["torchserve", "--start"] and "--foreground" in c.args
    assert "--model-store=/mnt/models/model-store" in c.args
    assert "--ts-config=/mnt/models/config/config.properties" in c.args
    assert not any(e.name == "TS_SERVICE_ENVELOPE" for e in (c.env or []))
    assert c.security_context.run_as_non_root is True
    assert {"v1", "v2"} <= set(rt.spec.protocol_versions)
    model = isvc.spec.predictor.model
    assert model.runtime == rt.metadata.name and model.model_format.name == "pytorch"
    assert model.readiness_probe.http_get.path == "/ping"
    _resources_ok(model.resources)
    assert isvc.spec.predictor.min_replicas >= 1


@pytest.mark.parametrize("name", ["Dockerfile.predictor", "Dockerfile.torchserve"])
def test_dockerfiles_pin_versions_and_run_as_non_root(name: str) -> None:
    text = (DEPLOY / name).read_text()
    froms = re.findall(r"^FROM (\S+)", text, re.M)
    assert froms and all(":" in f and not f.endswith(":latest") for f in froms)
    assert '"torch==2.14.1"' in text and '"torchvision==0.29.1"' in text
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and users[-1].split(":")[0] not in ("0", "root")
    assert "/mnt/models" in text and not re.search(r"^COPY .*models/", text, re.M)
    if name == "Dockerfile.torchserve":
        assert '"torchserve==0.12.0"' in text and "openjdk-17" in text
    else:
        assert '.[kserve]' in text and 'ENTRYPOINT ["camserve-kserve"]' in text


# -- the layout and TorchServe started the runtime's way ---------------------------------------------
def _properties(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            k, _, v = line.partition("=")
            out[k.strip()] = v.strip()
    return out


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("layout")
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.run([sys.executable, "-m", "scripts.kserve_layout",
                           str(MODEL_DIR), "--name", "camshapes", "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    root = Path(proc.stdout.strip().splitlines()[-1])
    assert root == out / "camshapes"
    return root


def test_layout_files_and_settings(layout: Path) -> None:
    assert sorted(p.relative_to(layout).as_posix() for p in layout.rglob("*") if p.is_file()) == \
        ["config/config.properties", "model-store/camshapes.mar"]
    props = _properties(layout / "config" / "config.properties")
    assert props["enable_envvars_config"] == "false" and "service_envelope" not in props
    assert props["disable_token_authorization"] == "true"
    assert props["inference_address"] == "http://0.0.0.0:8080"
    assert props["management_address"].startswith("http://127.0.0.1:")
    assert props["model_store"] == "/mnt/models/model-store"
    snap = json.loads(props["model_snapshot"])
    cfg = yaml.safe_load((MODEL_DIR / "model-config.yaml").read_text())
    entry = snap["models"]["camshapes"]["1.0"]
    assert snap["modelCount"] == 1 and entry["marName"] == "camshapes.mar"
    assert entry["batchSize"] == cfg["batchSize"] and entry["maxBatchDelay"] == cfg["maxBatchDelay"]
    with zipfile.ZipFile(layout / "model-store" / "camshapes.mar") as z:
        names = set(z.namelist())
        manifest = json.loads(z.read("MAR-INF/MANIFEST.json"))
    assert {"weights.pt", "model.py", "index_to_name.json", "gradcam_handler.py",
            "camshapes-config.yaml"} <= names
    assert manifest["model"]["modelName"] == "camshapes"
    assert manifest["model"]["configFile"] == "camshapes-config.yaml"


def test_layout_refuses_a_folder_without_config(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "scripts.kserve_layout",
                           str(tmp_path), "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2 and "model-config.yaml is missing" in proc.stderr


@pytest.fixture(scope="module")
def torchserve_kserve(layout: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """TorchServe started with the ServingRuntime's args against the layout; its URL."""
    from camserve.testing.torchserve import free_ports, tail

    home = tmp_path_factory.mktemp("ts_kserve")
    inf, mgmt, met, g1, g2 = free_ports(5)
    text = (layout / "config" / "config.properties").read_text()
    moved = {"inference_address": f"http://127.0.0.1:{inf}",
             "management_address": f"http://127.0.0.1:{mgmt}",
             "metrics_address": f"http://127.0.0.1:{met}",
             "grpc_inference_port": str(g1), "grpc_management_port": str(g2)}
    for key, value in moved.items():
        text, n = re.subn(rf"^{key}=.*$", f"{key}={value}", text, flags=re.M)
        assert n == 1, key
    (home / "config").mkdir()
    config = home / "config" / "config.properties"
    config.write_text(text)
    rt = yaml.safe_load((DEPLOY / "kserve" / "torchserve-runtime.yaml").read_text())
    args = rt["spec"]["containers"][0]["args"]
    args = [a.replace("/mnt/models/config/config.properties", str(config))
             .replace("/mnt/models", str(layout)) for a in args]
    for d in ("tmp", "logs"):
        (home / d).mkdir()
    env = {**os.environ, "TMPDIR": str(home / "tmp"), "TEMP": str(home / "tmp"),
           "LOG_LOCATION": str(home / "logs"), "METRICS_LOCATION": str(home / "logs"),
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           # what KServe's own torchserve runtime sets; the layout must ignore it
           "TS_SERVICE_ENVELOPE": "kservev2"}
    args[0] = str(BIN / args[0])
    with open(home / "torchserve.out", "wb") as out:
        proc = subprocess.Popen(args, cwd=home, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    url = f"http://127.0.0.1:{inf}"
    try:
        from camserve.client import wait_until_ready

        wait_until_ready(f"http://127.0.0.1:{mgmt}", "camshapes", lambda: "unused", timeout=300,
                         alive=lambda: proc.poll() is None, interval=0.25)
        yield url
    except Exception:
        print(tail(home / "torchserve.out"), tail(home / "logs" / "model_log.log"))
        raise
    finally:
        subprocess.run([str(BIN / "torchserve"), "--stop", "--foreground"], cwd=home, env=env,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=90)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def service() -> Any:
    from camserve.serving import CamService

    return CamService.from_model_dir(MODEL_DIR, device="cpu")


def _handler(service: Any, rows: list[Any], explain: bool) -> list[dict[str, Any]]:
    return [r.body for r in service.handle_batch(rows, [explain] * len(rows)).results]


@pytest.mark.torchserve
def test_torchserve_layout_answers_kserve_v1_and_v2(torchserve_kserve: str, service: Any) -> None:
    url = torchserve_kserve
    img = SAMPLES[2].read_bytes()
    data = base64.b64encode(img).decode()
    # v1 predict and explain, no token (auth is off in this layout)
    r = requests.post(f"{url}/v1/models/camshapes:predict",
                      json={"instances": [{"data": data, "topk": 2}]}, timeout=120)
    assert r.status_code == 200, r.text
    assert r.json() == _handler(service, [{"data": img, "topk": "2"}], False)[0]
    r = requests.post(f"{url}/v1/models/camshapes:explain",
                      json={"instances": [{"data": data, "outputs": "heatmap,bbox"}]}, timeout=120)
    assert r.status_code == 200, r.text
    want = _handler(service, [{"data": img, "outputs": "heatmap,bbox"}], True)[0]
    assert r.json() == want
    assert want["explanations"][0]["label"] == SAMPLES[2].name.split("_")[0]
    # v2 infer with explain as a request parameter
    body = {"inputs": [{"name": "data", "datatype": "BYTES", "shape": [1], "data": [data]}],
            "parameters": {"explain": True, "method": "gradcam++"}}
    r = requests.post(f"{url}/v2/models/camshapes/infer", json=body, timeout=120)
    assert r.status_code == 200, r.text
    want = _handler(service, [{"data": img, "explain": "true", "method": "gradcam++"}], False)[0]
    assert r.json() == want
    # a per-request error keeps the handler's code and body
    r = requests.post(f"{url}/v1/models/camshapes:predict",
                      json={"instances": [{"data": data, "method": "nope"}]}, timeout=120)
    assert r.status_code == 422 and r.json()["type"] == "InvalidOption"
