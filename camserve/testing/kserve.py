"""A private camserve KServe predictor for tests and benchmarks: a child process on free loopback
ports, ready when its readiness route says so, stopped by its PID.

Example (not run here: it starts a server)::

    with LocalPredictor("models/shapes", "shapes") as srv:
        requests.post(f"{srv.url}/v1/models/shapes:predict", json={"instances": [...]})
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Mapping, Optional, Sequence

from .torchserve import free_ports


class LocalPredictor:
    """``python -m camserve.kserve`` as a child process on free loopback ports; a context manager
    (for tests and benchmarks). Waits for readiness; stops the process by its PID on exit."""

    def __init__(self, model_dir: str | Path, name: str = "shapes", args: Sequence[str] = (),
                 log_path: Optional[Path] = None, ready_timeout: float = 180.0,
                 env: Optional[Mapping[str, str]] = None) -> None:
        self.http_port, self.grpc_port = free_ports(2)
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.name = name
        self.cmd = [sys.executable, "-m", "camserve.kserve", str(model_dir), "--model-name", name,
                    "--http-port", str(self.http_port), "--grpc-port", str(self.grpc_port),
                    *args]
        self.log_path = log_path
        self.ready_timeout = ready_timeout
        self.env = {**os.environ, **(env or {})}
        self.proc: Optional[subprocess.Popen[bytes]] = None

    def __enter__(self) -> "LocalPredictor":
        out = open(self.log_path, "wb") if self.log_path else subprocess.DEVNULL
        try:
            self.proc = subprocess.Popen(self.cmd, stdout=out, stderr=subprocess.STDOUT,
                                         env=self.env)
        finally:
            if self.log_path:
                out.close()  # type: ignore[union-attr]
        deadline = time.monotonic() + self.ready_timeout
        while True:
            code = self.proc.poll()
            if code is not None:
                self.stop()
                raise RuntimeError(f"camserve.kserve exited with {code} before getting ready "
                                   f"(log: {self.log_path})")
            try:
                with urllib.request.urlopen(f"{self.url}/v1/models/{self.name}", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"camserve.kserve not ready after {self.ready_timeout:.0f} s "
                                   f"(log: {self.log_path})")
            time.sleep(0.2)

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """SIGTERM to the PID, SIGKILL after 30 s."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        self.proc = None
