"""camserve.localserver: ports, the generated config and a start that fails (a real torchserve)."""
from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import pytest

from camserve.client import ClientError
from camserve.localserver import LocalTorchServe, free_ports


def test_free_ports_are_distinct_and_bindable() -> None:
    ports = free_ports(5)
    assert len(set(ports)) == 5
    for p in ports:
        with socket.socket() as s:
            s.bind(("127.0.0.1", p))


def test_config_listens_on_loopback_only_with_the_model_api_off(tmp_path: Path) -> None:
    ts = LocalTorchServe(tmp_path, ["a", "b"], properties={"max_request_size": 1234})
    props = dict(line.split("=", 1) for line in ts.config.read_text().splitlines())
    for key in ("inference_address", "management_address", "metrics_address"):
        assert props[key].startswith("http://127.0.0.1:")
    assert props["grpc_inference_address"] == props["grpc_management_address"] == "127.0.0.1"
    ports = [props[k].rsplit(":", 1)[1] for k in ("inference_address", "management_address",
                                                   "metrics_address")]
    ports += [props["grpc_inference_port"], props["grpc_management_port"]]
    assert len(set(ports)) == 5
    assert props["enable_model_api"] == "false" and "disable_token_authorization" not in props
    assert props["load_models"] == "a.mar,b.mar" and props["max_request_size"] == "1234"
    assert props["model_store"] == str(tmp_path / "store")
    assert ts.env["TMPDIR"] == str(tmp_path / "tmp") and ts.env["LOG_LOCATION"] == str(tmp_path / "logs")


@pytest.mark.skipif(shutil.which("java") is None and not os.environ.get("JAVA_HOME"),
                    reason="Java is not installed: TorchServe's frontend needs Java 17+")
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
