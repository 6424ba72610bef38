"""camserve.onnx.session: the CPUs a session may use, its providers, a graph in memory."""
from __future__ import annotations

import logging
import os

import pytest

pytest.importorskip("onnxruntime")

from camserve.onnx.session import available_cpus, ort_session, providers  # noqa: E402


def test_available_cpus_reads_the_cgroup_quota(tmp_path):
    affinity = len(os.sched_getaffinity(0))
    quota = tmp_path / "cpu.max"
    quota.write_text("150000 100000\n")
    assert available_cpus(quota) == min(affinity, 2)
    quota.write_text("max 100000\n")
    assert available_cpus(quota) == affinity
    assert available_cpus(tmp_path / "missing") == affinity
    quota.write_text("garbage")
    assert available_cpus(quota) == affinity


@pytest.mark.parametrize("device", ["gpu", "cuda:x", "cpu:0", "cuda:1234", ""])
def test_devices_are_checked(device):
    with pytest.raises(ValueError, match="allowed: cpu, cuda, cuda:N"):
        providers(device)


def test_cuda_without_its_provider_is_the_cpu_with_a_warning(monkeypatch, caplog):
    import onnxruntime as ort

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    with caplog.at_level(logging.WARNING, logger="camserve.onnx.session"):
        assert providers("cuda:1") == ["CPUExecutionProvider"]
    assert "CUDAExecutionProvider is not available" in caplog.text


@pytest.mark.parametrize("have, expected", [
    (["CUDAExecutionProvider", "CPUExecutionProvider"],
     [("CUDAExecutionProvider", {"device_id": 1}), "CPUExecutionProvider"]),
    (["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
     [("TensorrtExecutionProvider", {"device_id": 1}), ("CUDAExecutionProvider", {"device_id": 1}),
      "CPUExecutionProvider"]),
])
def test_a_gpu_worker_gets_cuda_and_tensorrt_where_installed(monkeypatch, have, expected):
    import onnxruntime as ort

    monkeypatch.setattr(ort, "get_available_providers", lambda: have)
    assert providers("cuda:1") == expected


def test_a_serialized_graph_and_its_threads(tmp_path):
    import torch

    from camserve.onnx.export import export_plain_onnx
    from camserve.testing.nets import TinyNet

    path = export_plain_onnx(TinyNet(3, seed=0).eval(), tmp_path / "plain.onnx", (32, 32))
    sess = ort_session(path.read_bytes(), threads=1, spinning=False)
    assert sess.get_session_options().intra_op_num_threads == 1
    assert sess.get_session_options().get_session_config_entry(
        "session.intra_op.allow_spinning") == "0"
    out = sess.run(["logits"], {"input": torch.zeros(2, 3, 32, 32).numpy()})[0]
    assert out.shape == (2, 3)
