"""camserve.backends.threads: a worker's share of the cores."""
from __future__ import annotations

import json
import os

import pytest

from camserve.backends.threads import torchserve_workers, worker_threads
from camserve.onnx.session import available_cpus


@pytest.mark.parametrize("workers, cpus, share", [(1, 2, 2), (2, 2, 1), (3, 2, 1), (2, 16, 8),
                                                  (0, 4, 4), (5, 16, 3)])
def test_the_share_never_oversubscribes(workers, cpus, share):
    assert worker_threads(workers, cpus=cpus) == share
    assert share * max(1, workers) <= max(cpus, max(1, workers))


@pytest.mark.parametrize("config, gpu, expected", [
    ({"minWorkers": 2, "maxWorkers": 4}, False, 4),   # the most it may run side by side
    ({"minWorkers": 3}, False, 3),
    ({}, False, 6),                                   # TorchServe's default: one per core
    ({"maxWorkers": True}, False, 6),                 # not a count
    ({}, True, 2),                                    # one per GPU
])
def test_torchserve_worker_count(config, gpu, expected):
    assert torchserve_workers(config, gpu=gpu, cpus=6, gpus=2) == expected


# -- a real TorchServe: two workers on the cores do not oversubscribe them ------------------------

def _workers(ts, model: str) -> list[dict]:
    import requests

    r = requests.get(f"{ts.management}/models/{model}", timeout=60,
                     headers={"Authorization": f"Bearer {ts.management_token}"})
    assert r.status_code == 200, r.text
    return r.json()[0]["workers"]


def _threads(pid: int) -> int:
    """Threads the process runs now (/proc/PID/status)."""
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise AssertionError(f"no thread count for {pid}")


@pytest.mark.torchserve
@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs /proc")
def test_two_workers_share_the_cores(tmp_path, shapes_dir, handler_file, png):
    """ort2 / torch2: two workers each; ort1: one. Each of two workers gets half the cores (here
    ``cores // 2``), as its describe answer, its log and the threads its process runs show."""
    import shutil
    import time

    import requests
    import yaml

    from camserve.client import ClientError
    from camserve.testing.torchserve import LocalTorchServe
    from scripts.archive import build_archive

    if shutil.which("java") is None and not os.environ.get("JAVA_HOME"):
        pytest.skip("Java is not installed: TorchServe's frontend needs Java 17+")
    cores = available_cpus()
    src = tmp_path / "src"
    shutil.copytree(shapes_dir, src, ignore=shutil.ignore_patterns("samples", "model.cam.onnx"))
    base = yaml.safe_load((shapes_dir / "model-config.yaml").read_text())
    for name, workers, backend in (("ort2", 2, "onnxruntime"), ("ort1", 1, "onnxruntime"),
                                   ("torch2", 2, "torch")):
        cfg = {**base, "minWorkers": workers, "maxWorkers": workers}
        (src / "model-config.yaml").write_text(yaml.safe_dump(cfg))
        build_archive(src, name, tmp_path / "home" / "store", handler=handler_file,
                      backend=backend)
    with LocalTorchServe(tmp_path / "home", ["ort2", "ort1", "torch2"]) as ts:
        headers = {"Authorization": f"Bearer {ts.token}"}
        deadline = time.monotonic() + 240
        while not all(len(_workers(ts, m)) == n and all(w["status"] == "READY"
                                                        for w in _workers(ts, m))
                      for m, n in (("ort2", 2), ("ort1", 1), ("torch2", 2))):
            if time.monotonic() > deadline:
                raise ClientError("workers did not get ready")
            time.sleep(0.5)
        for model in ("ort2", "ort1", "torch2"):
            for i in range(4):  # reach every worker, explain and predict
                r = requests.post(f"{ts.url}/{'explanations' if i % 2 else 'predictions'}/{model}",
                                  data=png(seed=i), headers=headers, timeout=120)
                assert r.status_code == 200, r.text
        desc = {}
        for model in ("ort2", "ort1", "torch2"):
            r = requests.get(f"{ts.management}/models/{model}?customized=true", timeout=60,
                             headers={"Authorization": f"Bearer {ts.management_token}"})
            meta = r.json()[0]["customizedMetadata"]
            desc[model] = json.loads(meta) if isinstance(meta, str) else meta
        assert desc["ort2"]["threads"] == desc["torch2"]["threads"] == max(1, cores // 2)
        assert desc["ort1"]["threads"] == cores
        log = (tmp_path / "home" / "logs" / "model_log.log").read_text(errors="replace")
        ready = [ln for ln in log.splitlines() if "GradCamHandler ready" in ln]
        assert len(ready) == 5 and sum(f"{max(1, cores // 2)} threads)" in ln
                                       for ln in ready) == 4
        shared = [_threads(int(w["pid"])) for w in _workers(ts, "ort2")]
        [alone] = [_threads(int(w["pid"])) for w in _workers(ts, "ort1")]
        if cores >= 2:  # fewer threads per worker than the one that has every core to itself
            assert max(shared) < alone, (shared, alone)
