"""A private TorchServe for tests and benchmarks: a temporary home, free loopback ports, token auth.

:class:`LocalTorchServe` starts ``torchserve --start --foreground`` from ``home`` with a generated
``config.properties`` (every listener on 127.0.0.1 on a free port, the model API off, token
authorization on as TorchServe 0.12 has it by default), points TMPDIR, TEMP, LOG_LOCATION and
METRICS_LOCATION into ``home`` (so its key_file.json, logs, pid file and worker sockets stay there),
waits until every model has a READY worker, and reads the inference and management keys. On exit
it runs ``torchserve --stop`` and then kills the server's process group if anything is left.
:func:`archive` builds a ``.mar`` with ``torch-model-archiver``.

The commands are taken from the folder of the running Python (the venv's ``bin``), so the workers
run with the same environment and the editable camserve. Needs the ``serve`` extra (TorchServe,
torch-model-archiver, requests).

Example::

    >>> ports = free_ports(2)
    >>> len(set(ports)) == 2 and all(1024 <= p < 65536 for p in ports)
    True
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import yaml

from ..client import ClientError, read_token, wait_until_ready

BIN = Path(sys.executable).parent


def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports free on 127.0.0.1 right now (all bound at once, then released)."""
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def archive(store: Path, name: str, handler: str, serialized: Path, config: Mapping[str, Any],
            model_file: Optional[Path] = None, extra: Sequence[Path] = ()) -> Path:
    """``store/name.mar`` from a handler, a serialized file and a model config (written as YAML
    next to the store); returns the archive's path."""
    store.mkdir(parents=True, exist_ok=True)
    cfg_path = store.parent / f"{name}-config.yaml"
    cfg_path.write_text(yaml.safe_dump(dict(config)))
    cmd = [str(BIN / "torch-model-archiver"), "--model-name", name, "--version", "1.0",
           "--handler", handler, "--serialized-file", str(serialized), "--config-file", str(cfg_path),
           "--export-path", str(store), "--force"]
    if model_file is not None:
        cmd += ["--model-file", str(model_file)]
    if extra:
        cmd += ["--extra-files", ",".join(str(p) for p in extra)]
    subprocess.run(cmd, check=True, timeout=300)
    return store / f"{name}.mar"


def tail(path: Path, n: int = 40) -> str:
    """The last ``n`` lines of a log file, or a note that it is missing."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return f"({path} missing)"


class LocalTorchServe:
    """TorchServe serving ``models`` (``home/store/<name>.mar``) from ``home``; a context manager.

    ``properties`` adds or overrides config.properties entries. Raises :class:`ClientError` with
    the tail of the server's output and worker log when a model does not get ready.
    """

    def __init__(self, home: Path, models: Sequence[str], properties: Mapping[str, Any] = (),
                 ready_timeout: float = 300.0) -> None:
        self.home = Path(home)
        self.models = list(models)
        self.ready_timeout = ready_timeout
        inf, mgmt, met, g1, g2 = free_ports(5)
        self.url = f"http://127.0.0.1:{inf}"
        self.management = f"http://127.0.0.1:{mgmt}"
        self.metrics = f"http://127.0.0.1:{met}"
        props: dict[str, Any] = {
            "inference_address": self.url, "management_address": self.management,
            "metrics_address": self.metrics,
            "grpc_inference_address": "127.0.0.1", "grpc_inference_port": g1,
            "grpc_management_address": "127.0.0.1", "grpc_management_port": g2,
            "enable_model_api": "false", "allowed_urls": "^file://.*",
            "model_store": self.home / "store", "load_models": ",".join(m + ".mar" for m in models),
            "default_workers_per_model": 1, "metrics_mode": "prometheus",
        }
        props.update(dict(properties))
        for d in ("store", "tmp", "logs"):
            (self.home / d).mkdir(parents=True, exist_ok=True)
        self.config = self.home / "config.properties"
        self.config.write_text("".join(f"{k}={v}\n" for k, v in props.items()))
        self.key_file = self.home / "key_file.json"
        self.env = {**os.environ, "TMPDIR": str(self.home / "tmp"), "TEMP": str(self.home / "tmp"),
                    "LOG_LOCATION": str(self.home / "logs"),
                    "METRICS_LOCATION": str(self.home / "logs"),
                    "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
        self.proc: Optional[subprocess.Popen[bytes]] = None
        self.token = ""
        self.management_token = ""

    def _management_key(self) -> Optional[str]:
        try:
            return read_token(self.key_file, "management")
        except ClientError:  # the key file appears (and is written) while the server starts
            return None

    def alive(self) -> bool:
        """Whether the server process started by :meth:`__enter__` is still running."""
        return self.proc is not None and self.proc.poll() is None

    def __enter__(self) -> "LocalTorchServe":
        with open(self.home / "torchserve.out", "wb") as out:
            self.proc = subprocess.Popen(
                [str(BIN / "torchserve"), "--start", "--ncs", "--foreground",
                 "--ts-config", str(self.config)],
                cwd=self.home, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True)  # the frontend and its workers: one process group
        try:
            for m in self.models:
                try:
                    wait_until_ready(self.management, m, self._management_key,
                                     timeout=self.ready_timeout, alive=self.alive, interval=0.25)
                except ClientError as exc:
                    raise ClientError(
                        f"TorchServe did not get ready: {exc}\n--- torchserve.out ---\n"
                        f"{tail(self.home / 'torchserve.out')}\n--- model_log ---\n"
                        f"{tail(self.home / 'logs' / 'model_log.log')}") from None
            self.token = read_token(self.key_file, "inference")
            self.management_token = read_token(self.key_file, "management")
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """``torchserve --stop``, then SIGKILL to the process group if anything is still alive."""
        if self.proc is None:
            return
        subprocess.run([str(BIN / "torchserve"), "--stop", "--foreground"], cwd=self.home,
                       env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=90)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)
        self.proc = None
