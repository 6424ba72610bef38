"""`make serve`, `make stop` and `make demo`: run TorchServe with the camserve model locally.

    python -m scripts.serve start   # start TorchServe in the background, wait until READY
    python -m scripts.serve start --name pets   # serve model_store/pets.mar (make serve MODEL=DIR)
    python -m scripts.serve stop    # torchserve --stop
    python -m scripts.serve demo    # explain models/shapes/samples (and shapes-det's scenes), write demo/*.png

Run from the repository root with the venv's python (the Makefile does): TorchServe starts its
workers with the python that runs ``torchserve``, so the worker gets the venv and its editable
camserve. Each failure (no Java, a server already running, a busy port, a model that does not
load) is said plainly and ends with a non-zero exit status.
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional
from urllib.parse import urlparse

from camserve.client import CamClient, ClientError, read_token, wait_until_ready
from camserve.testing.torchserve import tail

ROOT = Path(__file__).resolve().parents[1]

CONFIG = ROOT / "config.properties"
MODEL = "shapes"
SAMPLES = ROOT / "models" / "shapes" / "samples"
DET_MODEL = "shapes-det"
DET_SAMPLES = ROOT / "models" / "shapes-det" / "samples"
DEMO_OUT = ROOT / "demo"
LOG_DIR = ROOT / "logs"
READY_TIMEOUT = 300.0
TS_NAMESPACE = "org.pytorch.serve.ModelServer"


class ServeError(RuntimeError):
    """A problem that stops `make serve`; the message says what and what to do."""


def read_properties(path: Path) -> dict[str, str]:
    """key=value lines of a Java properties file (comments and blanks skipped)."""
    props: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", "!")) and "=" in line:
            k, v = line.split("=", 1)
            props[k.strip()] = v.strip()
    return props


def listeners(props: dict[str, str]) -> list[tuple[str, str, int]]:
    """(setting, host, port) of every listener TorchServe opens with this config."""
    out = []
    for key, default in (("inference_address", "http://127.0.0.1:8080"),
                         ("management_address", "http://127.0.0.1:8081"),
                         ("metrics_address", "http://127.0.0.1:8082")):
        u = urlparse(props.get(key, default))
        out.append((key, u.hostname or "127.0.0.1", u.port or (443 if u.scheme == "https" else 80)))
    for kind, port in (("inference", 7070), ("management", 7071)):
        out.append((f"grpc_{kind}_port", props.get(f"grpc_{kind}_address", "127.0.0.1"),
                    int(props.get(f"grpc_{kind}_port", port))))
    return out


def check_java() -> str:
    """The java executable TorchServe will use (JAVA_HOME or PATH), at least version 17."""
    home = os.environ.get("JAVA_HOME")
    java = str(Path(home) / "bin" / "java") if home else shutil.which("java")
    if not java or not Path(java).is_file():
        where = f"JAVA_HOME={home}" if home else "PATH"
        raise ServeError(f"Java not found (looked in {where}): TorchServe 0.12 needs a Java 17+ "
                         f"runtime, e.g. `apt-get install openjdk-17-jre-headless`")
    try:
        res = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ServeError(f"cannot run {java} -version: {exc}") from None
    m = re.search(r'version "(\d+)(?:\.(\d+))?', res.stderr + res.stdout)
    if not m:
        raise ServeError(f"cannot tell the Java version from `{java} -version`: {res.stderr.strip()}")
    major = int(m.group(1)) if m.group(1) != "1" else int(m.group(2) or 0)
    if major < 17:
        raise ServeError(f"Java {major} found at {java}; TorchServe 0.12 needs Java 17 or newer")
    return java


def running_pid() -> Optional[int]:
    """PID of the TorchServe frontend recorded in TorchServe's pid file, if it still runs."""
    pid_file = Path(tempfile.gettempdir()) / ".model_server.pid"
    try:
        pid = int(pid_file.read_text().split()[0])
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except (OSError, ValueError, IndexError):
        return None
    return pid if TS_NAMESPACE in cmdline else None


def port_in_use(host: str, port: int) -> bool:
    """True when something listens on host:port (a bind with SO_REUSEADDR fails)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def _rel(path: Path) -> str:
    """``path`` relative to the repository root when it lies inside it."""
    try:
        return str(path.relative_to(ROOT))
    except ValueError:
        return str(path)


def _torchserve() -> str:
    exe = Path(sys.executable).parent / "torchserve"
    if not exe.is_file():
        raise ServeError(f"{exe} not found: run `make install` first")
    return str(exe)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def stop() -> int:
    """`torchserve --stop` (waits until the frontend has exited)."""
    if running_pid() is None:
        print("TorchServe is not running.")
        return 0
    res = subprocess.run([_torchserve(), "--stop", "--foreground"], cwd=ROOT, env=_env())
    if res.returncode == 0:
        print("TorchServe stopped.")
    return res.returncode


def start(quiet: bool = False, name: Optional[str] = None, also: tuple[str, ...] = ()) -> int:
    """Start TorchServe in the background with config.properties and wait for READY workers.
    ``name``: serve ``model_store/NAME.mar`` as model NAME (default: config.properties'
    ``load_models``, the shapes model); ``also``: more archives served beside it (the demo's
    detector)."""
    props = read_properties(CONFIG)
    java = check_java()
    pid = running_pid()
    if pid is not None:
        raise ServeError(f"TorchServe is already running (pid {pid}); `make stop` stops it")
    for key, host, port in listeners(props):
        if port_in_use(host, port):
            raise ServeError(f"port {port} on {host} ({key} in config.properties) is in use by "
                             f"another program; stop it or change {key}")
    store = ROOT / props.get("model_store", "model_store")
    if name is not None:
        if not name or "/" in name or "=" in name or name.startswith("."):
            raise ServeError(f"invalid value for --name: {name[:100]!r} (a model name, e.g. pets)")
        mar = store / f"{name}.mar"
        models_arg = ["--models", f"{name}={name}.mar"]
    else:
        name = MODEL
        mar = store / props.get("load_models", f"{MODEL}.mar").split(",")[0]
        models_arg = ["--models", f"{MODEL}={mar.name}"] if also else []
    models_arg += [f"{a}={a}.mar" for a in also if (store / f"{a}.mar").is_file()]
    if not mar.is_file():
        raise ServeError(f"{_rel(mar)} not found: `make archive` builds it"
                         + ("" if name == MODEL else f" (make archive MODEL=DIR NAME={name})"))
    LOG_DIR.mkdir(exist_ok=True)
    out_log = LOG_DIR / "torchserve_stdout.log"
    key_file = ROOT / "key_file.json"
    key_file.unlink(missing_ok=True)  # a stale key file from a crashed run would mislead
    env = _env()
    log_note = f"java {java}"
    with open(out_log, "ab") as f:
        res = subprocess.run([_torchserve(), "--start", "--ncs", "--ts-config", str(CONFIG),
                              *models_arg],
                             cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    if res.returncode != 0:
        raise ServeError(f"torchserve --start failed (exit {res.returncode}, {log_note}):\n"
                         f"{tail(out_log, 30)}")

    def token() -> Optional[str]:
        try:
            return read_token(key_file, "management")
        except ClientError:
            return None

    def alive() -> bool:
        return running_pid() is not None

    mgmt = props.get("management_address", "http://127.0.0.1:8081")
    try:
        desc = wait_until_ready(mgmt, name, token, timeout=READY_TIMEOUT, alive=alive)
        for a in also:
            if (store / f"{a}.mar").is_file():
                wait_until_ready(mgmt, a, token, timeout=READY_TIMEOUT, alive=alive)
    except ClientError as exc:
        logs = (f"--- {_rel(out_log)} ---\n{tail(out_log, 30)}\n"
                f"--- logs/model_log.log ---\n{tail(LOG_DIR / 'model_log.log', 30)}")
        if running_pid() is not None:
            subprocess.run([_torchserve(), "--stop", "--foreground"], cwd=ROOT, env=env,
                           stdout=subprocess.DEVNULL)
        raise ServeError(f"{exc}; TorchServe stopped. Last log lines:\n{logs}") from None
    if not quiet:
        _print_usage(props, desc, name)
    return 0


def _print_usage(props: dict[str, str], desc: dict, name: str = MODEL) -> None:
    inf = props.get("inference_address", "http://127.0.0.1:8080")
    metrics = props.get("metrics_address", "http://127.0.0.1:8082")
    key = read_token(ROOT / "key_file.json", "inference")
    samples = sorted(SAMPLES.glob("*.png")) if name == MODEL else []
    img = _rel(samples[0]) if samples else Path("IMAGE.png")
    workers = [w.get("status") for w in desc.get("workers", [])]
    print(f"""
TorchServe is up: model '{name}' (batch size {desc.get('batchSize')}, workers {workers})
  inference {inf}   management {props.get('management_address')}   metrics {metrics}/metrics
  tokens: key_file.json (inference key {key}; keys expire after 60 min by default)

Predict:
  curl -s -H "Authorization: Bearer {key}" -H "Content-Type: application/octet-stream" \\
       --data-binary @{img} {inf}/predictions/{name}
Explain (Grad-CAM heatmap + bbox):
  curl -s -H "Authorization: Bearer {key}" -H "Content-Type: application/octet-stream" \\
       --data-binary @{img} {inf}/explanations/{name}
  curl -s -H "Authorization: Bearer {key}" -F data=@{img} -F explain=true -F target={'circle' if name == MODEL else 'LABEL'} \\
       -F outputs=overlay,bbox {inf}/predictions/{name}
  (give --data-binary a content type: curl's default, form-urlencoded, makes TorchServe parse a form)
Client (prints top-k, writes the overlay):
  .venv/bin/camserve-client {img} --explain --out overlay.png
{'Demo over the samples: make demo      ' if name == MODEL else ''}Stop: make stop""")


def _iou(a: list[int], b: list[int]) -> float:
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def demo() -> int:
    """Explain every sample image, write demo/<name>_overlay.png, report class, score and box hit."""
    import numpy as np
    from PIL import Image

    if running_pid() is None:
        print("TorchServe is not running; starting it (make serve) ...")
        start(quiet=True, also=(DET_MODEL,))
    props = read_properties(CONFIG)
    boxes_file = SAMPLES / "boxes.json"
    if not boxes_file.is_file():
        raise ServeError(f"{_rel(boxes_file)} not found (the model folder's samples)")
    boxes = json.loads(boxes_file.read_text())
    client = CamClient(props.get("inference_address", "http://127.0.0.1:8080"),
                       token=read_token(ROOT / "key_file.json", "inference"), model=MODEL)
    DEMO_OUT.mkdir(exist_ok=True)
    print(f"{'image':<22} {'predicted':<10} {'score':>6}  {'true':<10} {'bbox':<18} {'truth':<18} "
          f"{'IoU':>5}  hit  peak-in-box")
    hits = peaks = correct = 0
    for name, info in sorted(boxes.items()):
        path = SAMPLES / name
        ans = client.explain(path.read_bytes(), outputs="heatmap,overlay,bbox")
        top = ans["predictions"][0]
        e = ans["explanations"][0]
        out = DEMO_OUT / f"{Path(name).stem}_overlay.png"
        out.write_bytes(base64.b64decode(e["overlay"]))
        hm = np.asarray(Image.open(io.BytesIO(base64.b64decode(e["heatmap"]))))
        py, px = np.unravel_index(int(hm.argmax()), hm.shape)
        gt = info["box"]
        bbox = e.get("bbox") or [0, 0, 0, 0]
        iou = _iou(bbox, gt)
        hit = iou >= 0.5
        peak = gt[0] <= px < gt[2] and gt[1] <= py < gt[3]
        hits += hit
        peaks += peak
        correct += top["label"] == info["label"]
        print(f"{name:<22} {top['label']:<10} {top['score']:6.3f}  {info['label']:<10} "
              f"{str(bbox):<18} {str(gt):<18} {iou:5.2f}  {'yes' if hit else 'no ':<4} "
              f"{'yes' if peak else 'no'}")
    n = len(boxes)
    print(f"\n{correct}/{n} correct, bbox hits (IoU >= 0.5) {hits}/{n}, heatmap peak inside the "
          f"true box {peaks}/{n}; overlays in {_rel(DEMO_OUT)}/")
    if (ROOT / props.get("model_store", "model_store") / f"{DET_MODEL}.mar").is_file():
        demo_detection(props)
    return 0


def demo_detection(props: dict[str, str]) -> None:
    """Explain the detector's sample scenes: each explained detection's overlay (its box drawn)
    to demo/<scene>_<i>_<label>.png, and whether its map peaks in the true box."""
    import numpy as np
    from PIL import Image

    truth = json.loads((DET_SAMPLES / "boxes.json").read_text())
    client = CamClient(props.get("inference_address", "http://127.0.0.1:8080"),
                       token=read_token(ROOT / "key_file.json", "inference"), model=DET_MODEL)
    print(f"\n{'scene':<16} {'objects':<34} detections (label score, peak in its box)")
    found = peaks = total = explained = 0
    for name, objects in sorted(truth.items()):
        ans = client.explain((DET_SAMPLES / name).read_bytes(), outputs="heatmap,overlay")
        shown = []
        for i, d in enumerate(ans["detections"]):
            e = d.get("explanation")
            if e is None:
                continue
            explained += 1
            (DEMO_OUT / f"{Path(name).stem}_{i}_{d['label']}.png").write_bytes(
                base64.b64decode(e["overlay"]))
            hm = np.asarray(Image.open(io.BytesIO(base64.b64decode(e["heatmap"]))))
            py, px = np.unravel_index(int(hm.argmax()), hm.shape)
            gt = next((o["box"] for o in objects if o["label"] == d["label"]), None)
            peak = gt is not None and gt[0] <= px < gt[2] and gt[1] <= py < gt[3]
            peaks += peak
            shown.append(f"{d['label']} {d['score']:.2f} {'yes' if peak else 'no'}")
        labels = {d["label"] for d in ans["detections"]}
        found += sum(o["label"] in labels for o in objects)
        total += len(objects)
        print(f"{name:<16} {', '.join(o['label'] for o in objects):<34} {'; '.join(shown)}")
    print(f"\ndetector: {found}/{total} objects found; {peaks}/{explained} maps peak in the true "
          f"box of their label; "
          f"overlays (box drawn) in {_rel(DEMO_OUT)}/")


def main(argv: Optional[list[str]] = None) -> int:
    """CLI entry point."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("command", choices=("start", "stop", "demo"))
    ap.add_argument("--name", help="start: serve model_store/NAME.mar as model NAME (default: "
                                   "config.properties' load_models, the shapes model)")
    args = ap.parse_args(argv)
    os.chdir(ROOT)
    try:
        if args.command == "start":
            return start(name=args.name)
        return {"stop": stop, "demo": demo}[args.command]()
    except (ServeError, ClientError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
