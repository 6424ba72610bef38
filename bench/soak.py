"""Soak and fault benchmark against a private TorchServe serving models/shapes (``make soak``).

1. **Soak**: N mixed requests at C concurrent clients — predict (raw body), explain
   (``/explanations``), JSON with label targets (``{"data": base64, "target": [labels]}``) and
   hostile images from :mod:`camserve.testing.hostile` (corrupt, truncated, outside the format
   list, bombs) — every answer checked: its status, that the body is JSON of the expected type
   (``predictions``, ``explanations`` with the asked labels, or an error body
   ``{"code", "type", "message"}`` with the expected type). The worker's RSS (psutil, on the PID
   from the management API's ``GET /models/NAME``) is read before and after.
2. **Worst request**: the worst request the default work budget allows (36 MP x 8 targets x all
   four outputs), alone: status, seconds, the worker's peak RSS above idle (``VmHWM``).
3. **Fault**: a stream of predict requests at C clients; when a quarter of it is answered the
   worker is killed (SIGKILL to its PID). Counted: failed answers, and the time from the kill
   until the first 200 to a request sent after it.

Prints requests, clients, lost (no answer or a wrong one), req/s, p50/p99 latency, RSS before and
after, failed during the kill, recovery time; ``--json`` prints the same as one JSON object.
The server runs on free loopback ports with token authorization, from a temporary folder, and is
stopped at the end (:class:`camserve.testing.torchserve.LocalTorchServe`).

Usage::

    python -m bench.soak                       # 1000 requests, 16 clients, then the kill
    python -m bench.soak -n 300 -c 8 --kill-requests 200 --json
"""
from __future__ import annotations

import argparse
import base64
import concurrent.futures as cf
import json
import os
import random
import signal
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import psutil
import requests
import yaml

from camserve.testing.hostile import hostile_corpus
from camserve.testing.torchserve import LocalTorchServe, archive

ROOT = Path(__file__).resolve().parents[1]

MODEL_DIR = ROOT / "models" / "shapes"
MODEL = "shapes"
KINDS = ("predict", "explain", "json_labels", "hostile")


@dataclass(frozen=True)
class Job:
    """One request: ``kind``, route, requests kwargs, expected status and what the body must be
    (``"predictions"``, ``"explanations"`` or an error type), expected labels for label targets."""

    kind: str
    route: str
    kwargs: dict
    status: int
    expect: str
    labels: tuple[str, ...] = ()


@dataclass
class Answer:
    job: Job
    status: Optional[int]
    ok: bool
    seconds: float
    started: float
    finished: float
    problem: str = ""


@dataclass
class SoakReport:
    requests: int = 0
    clients: int = 0
    lost: int = 0
    wrong: list[str] = field(default_factory=list)
    by_kind: dict[str, int] = field(default_factory=dict)
    req_per_s: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    rss_before_mb: float = 0.0
    rss_after_mb: float = 0.0
    kill_requests: int = 0
    failed_during_kill: int = 0
    lost_during_kill: int = 0
    recovery_s: Optional[float] = None
    worker_pid_before: int = 0
    worker_pid_after: int = 0
    load_average: float = 0.0
    worst_status: int = 0
    worst_seconds: float = 0.0
    worst_peak_above_idle_mb: Optional[float] = None

    def lines(self) -> list[str]:
        rec = "never" if self.recovery_s is None else f"{self.recovery_s:.2f} s"
        kinds = ", ".join(f"{k} {v}" for k, v in self.by_kind.items())
        peak = self.worst_peak_above_idle_mb
        return [
            f"requests            {self.requests} ({kinds})",
            f"clients             {self.clients}",
            f"lost                {self.lost}",
            f"req/s               {self.req_per_s:.1f}",
            f"latency p50 / p99   {self.p50_ms:.0f} / {self.p99_ms:.0f} ms",
            f"worker RSS          {self.rss_before_mb:.0f} -> {self.rss_after_mb:.0f} MB",
            f"kill stream         {self.kill_requests} requests, {self.failed_during_kill} failed "
            f"({self.lost_during_kill} without an answer), recovery {rec}",
            f"worker pid          {self.worker_pid_before} -> {self.worker_pid_after}",
            f"worst request       36 MP x 8 targets x 4 outputs: {self.worst_status} in "
            f"{self.worst_seconds:.1f} s, worker peak +"
            f"{'?' if peak is None else f'{peak:.0f}'} MB",
            f"load average        {self.load_average:.1f} on {os.cpu_count()} cores",
        ]


def sample_images() -> list[tuple[str, bytes]]:
    """(label, PNG bytes) of the committed samples (their file names start with the label)."""
    out = []
    for p in sorted((MODEL_DIR / "samples").glob("*.png")):
        out.append((p.name.rsplit("_", 1)[0], p.read_bytes()))
    if not out:
        raise FileNotFoundError(f"no samples in {MODEL_DIR / 'samples'} (make samples)")
    return out


def hostile_jobs() -> list[Job]:
    """Light hostile entries (heavy ones decode tens of megapixels) as raw predict bodies."""
    jobs = []
    for e in hostile_corpus().values():
        if e.heavy or len(e.data) > 100_000:
            continue
        status = e.status
        expect = "predictions" if status == 200 else str(e.error_type)
        jobs.append(Job("hostile", f"predictions/{MODEL}", {"data": e.data}, status, expect))
    return jobs


def make_jobs(n: int, seed: int = 0) -> list[Job]:
    """``n`` jobs, the kinds in turn, images and hostile entries drawn with ``seed``."""
    rng = random.Random(seed)
    samples = sample_images()
    labels = [lab for lab, _ in samples]
    hostile = hostile_jobs()
    jobs = []
    for i in range(n):
        kind = KINDS[i % len(KINDS)]
        _, data = rng.choice(samples)
        if kind == "predict":
            jobs.append(Job(kind, f"predictions/{MODEL}", {"data": data}, 200, "predictions"))
        elif kind == "explain":
            jobs.append(Job(kind, f"explanations/{MODEL}", {"data": data}, 200, "explanations"))
        elif kind == "json_labels":
            want = tuple(rng.sample(labels, 2))
            body = {"data": base64.b64encode(data).decode(), "explain": True,
                    "target": [w.upper() if rng.random() < 0.5 else w for w in want],
                    "outputs": ["bbox", "heatmap"]}
            jobs.append(Job(kind, f"predictions/{MODEL}", {"json": body}, 200, "explanations",
                            want))
        else:
            jobs.append(rng.choice(hostile))
    return jobs


def check(job: Job, status: int, text: str) -> str:
    """'' when the answer is the expected one, else what is wrong (short)."""
    if status != job.status:
        return f"{job.kind}: status {status}, expected {job.status}: {text[:200]!r}"
    try:
        body = json.loads(text)
    except ValueError:
        return f"{job.kind}: body is not JSON: {text[:200]!r}"
    if not isinstance(body, dict):
        return f"{job.kind}: body is not an object: {text[:200]!r}"
    if job.expect == "predictions":
        if not isinstance(body.get("predictions"), list) or not body["predictions"]:
            return f"{job.kind}: no predictions: {text[:200]!r}"
    elif job.expect == "explanations":
        ex = body.get("explanations")
        if not isinstance(ex, list) or not ex or not isinstance(body.get("predictions"), list):
            return f"{job.kind}: no explanations: {text[:200]!r}"
        if job.labels and tuple(e.get("label") for e in ex) != job.labels:
            return f"{job.kind}: labels {[e.get('label') for e in ex]}, expected {job.labels}"
        if job.kind == "json_labels" and not all("heatmap" in e and "bbox" in e for e in ex):
            return f"{job.kind}: outputs missing"
    else:
        if set(body) != {"code", "type", "message"} or body["type"] != job.expect \
                or body["code"] != status:
            return f"{job.kind}: error body {text[:200]!r}, expected type {job.expect}"
    return ""


class Client:
    """Sends jobs with one requests.Session per thread."""

    def __init__(self, url: str, token: str, timeout: float = 120.0) -> None:
        self.url = url
        self.headers = {"Authorization": f"Bearer {token}"}
        self.timeout = timeout
        self.local = threading.local()

    def send(self, job: Job) -> Answer:
        s = getattr(self.local, "session", None)
        if s is None:
            s = self.local.session = requests.Session()
        t0 = time.monotonic()
        try:
            r = s.post(f"{self.url}/{job.route}", headers=self.headers, timeout=self.timeout,
                       **job.kwargs)
        except requests.RequestException as exc:
            t1 = time.monotonic()
            return Answer(job, None, False, t1 - t0, t0, t1, f"no answer: {type(exc).__name__}")
        t1 = time.monotonic()
        problem = check(job, r.status_code, r.text)
        return Answer(job, r.status_code, not problem, t1 - t0, t0, t1, problem)


def worker_pid(ts: LocalTorchServe, model: str = MODEL, timeout: float = 120.0,
               not_pid: int = 0) -> int:
    """The PID of the model's (single) worker from the management API, waiting until there is
    one (other than ``not_pid``) that is READY."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            r = requests.get(f"{ts.management}/models/{model}", timeout=30,
                             headers={"Authorization": f"Bearer {ts.management_token}"})
            workers = r.json()[0]["workers"] if r.status_code == 200 else []
            ready = [int(w["pid"]) for w in workers
                     if str(w.get("status", "")).upper() == "READY" and int(w.get("pid", -1)) > 0
                     and int(w["pid"]) != not_pid]
            if ready:
                return ready[0]
        except (requests.RequestException, ValueError, KeyError, IndexError):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"no READY worker for {model} within {timeout:.0f} s")
        time.sleep(0.25)


def rss_mb(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / 2 ** 20


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    v = sorted(values)
    return v[min(len(v) - 1, int(round(q * (len(v) - 1))))]


def shapes_server(home: Path, batch_size: int = 8, max_batch_delay: int = 20) -> LocalTorchServe:
    """Archive models/shapes with the camserve handler; the TorchServe that serves it from
    ``home`` (``with shapes_server(home) as ts:`` starts it and stops it)."""
    config = yaml.safe_load((MODEL_DIR / "model-config.yaml").read_text())
    config.update(batchSize=batch_size, maxBatchDelay=max_batch_delay, minWorkers=1,
                  maxWorkers=1)
    archive(home / "store", MODEL, str(ROOT / "handler" / "gradcam_handler.py"),
            MODEL_DIR / "weights.pt", config, MODEL_DIR / "model.py",
            [MODEL_DIR / "index_to_name.json"])
    return LocalTorchServe(home, [MODEL], ready_timeout=300,
                           properties={"max_request_size": 20971520})


def soak(ts: LocalTorchServe, n: int, clients: int,
         seed: int = 0) -> tuple[SoakReport, list[Answer]]:
    """Phase 1 on a running server."""
    rep = SoakReport(requests=n, clients=clients)
    pid = worker_pid(ts)
    rep.worker_pid_before = pid
    client = Client(ts.url, ts.token)
    for job in make_jobs(min(n, 2 * len(KINDS)), seed + 1):  # warm the worker's paths
        client.send(job)
    rep.rss_before_mb = rss_mb(pid)
    jobs = make_jobs(n, seed)
    rep.by_kind = {k: sum(j.kind == k for j in jobs) for k in KINDS}
    t0 = time.monotonic()
    with cf.ThreadPoolExecutor(clients) as pool:
        answers = list(pool.map(client.send, jobs))
    wall = time.monotonic() - t0
    rep.rss_after_mb = rss_mb(pid)
    rep.lost = sum(not a.ok for a in answers)
    rep.wrong = [a.problem for a in answers if not a.ok][:20]
    rep.req_per_s = n / wall if wall > 0 else 0.0
    lat = [a.seconds * 1000.0 for a in answers]
    rep.p50_ms, rep.p99_ms = percentile(lat, 0.5), percentile(lat, 0.99)
    return rep, answers


def kill_stream(ts: LocalTorchServe, rep: SoakReport, n: int, clients: int,
                seed: int = 0) -> list[Answer]:
    """Phase 2: ``n`` predict requests; the worker is killed once a quarter is answered."""
    samples = sample_images()
    rng = random.Random(seed)
    jobs = [Job("predict", f"predictions/{MODEL}", {"data": rng.choice(samples)[1]}, 200,
                "predictions") for _ in range(n)]
    client = Client(ts.url, ts.token)
    pid = worker_pid(ts)
    done = 0
    lock = threading.Lock()
    killed = threading.Event()
    t_kill = [0.0]

    def send(job: Job) -> Answer:
        nonlocal done
        a = client.send(job)
        with lock:
            done += 1
            if done >= n // 4 and not killed.is_set():
                killed.set()
                t_kill[0] = time.monotonic()
                os.kill(pid, signal.SIGKILL)
        return a

    with cf.ThreadPoolExecutor(clients) as pool:
        answers = list(pool.map(send, jobs))
    rep.kill_requests = n
    rep.failed_during_kill = sum(not a.ok for a in answers)
    rep.lost_during_kill = sum(a.status is None for a in answers)
    after = [a.finished for a in answers if a.ok and a.started > t_kill[0]]
    rep.recovery_s = (min(after) - t_kill[0]) if after else None
    rep.worker_pid_after = worker_pid(ts, not_pid=pid)
    return answers


def _hwm_reset(pid: int) -> bool:
    """Reset the kernel's peak-RSS mark of ``pid`` to its current RSS (Linux >= 4.0)."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _hwm(pid: int) -> Optional[int]:
    """``VmHWM`` of ``pid`` in bytes (peak RSS since the last reset), or None."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def worst_body() -> dict:
    """The worst request the default budget allows: a GIF of a few kB declaring 6000x6000
    (36 MP), 8 targets, all four outputs, as a JSON request."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("P", (6000, 6000), 2).save(buf, "GIF")
    return {"data": base64.b64encode(buf.getvalue()).decode(), "explain": True,
            "target": list(range(8)), "outputs": ["heatmap", "overlay", "raw", "bbox"]}


def worst_request(ts: LocalTorchServe) -> dict[str, Any]:
    """Send :func:`worst_body` alone to the warmed-up worker: its status, body, seconds, and the
    worker's peak RSS above idle (from its high-water mark, None where it cannot be reset)."""
    pid = worker_pid(ts)
    headers = {"Authorization": f"Bearer {ts.token}"}
    sample = next((MODEL_DIR / "samples").glob("*.png")).read_bytes()
    requests.post(f"{ts.url}/explanations/{MODEL}", headers=headers, data=sample, timeout=120)
    body = worst_body()
    idle = psutil.Process(pid).memory_info().rss
    exact = _hwm_reset(pid)
    t0 = time.monotonic()
    r = requests.post(f"{ts.url}/predictions/{MODEL}", headers=headers, json=body, timeout=120)
    seconds = time.monotonic() - t0
    peak = _hwm(pid) if exact else None
    try:
        answer = r.json()
    except ValueError:
        answer = {"text": r.text[:300]}
    return {"status": r.status_code, "body": answer, "seconds": seconds, "pid": pid,
            "pid_after": worker_pid(ts),
            "peak_above_idle_mb": None if peak is None else (peak - idle) / 2 ** 20}


def run(n: int = 1000, clients: int = 16, kill_requests: int = 400, seed: int = 0,
        home: Optional[Path] = None) -> SoakReport:
    """Start a private TorchServe, run both phases, stop it; the report."""
    with tempfile.TemporaryDirectory(prefix="camserve-soak-") as tmp:
        with shapes_server(Path(home or tmp)) as ts:
            rep, _ = soak(ts, n, clients, seed)
            w = worst_request(ts)
            rep.worst_status, rep.worst_seconds = w["status"], w["seconds"]
            rep.worst_peak_above_idle_mb = w["peak_above_idle_mb"]
            if kill_requests:
                kill_stream(ts, rep, kill_requests, clients, seed)
            rep.load_average = os.getloadavg()[0]
            return rep


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description="Soak and worker-kill benchmark (models/shapes)")
    ap.add_argument("-n", "--requests", type=int, default=1000)
    ap.add_argument("-c", "--clients", type=int, default=16)
    ap.add_argument("--kill-requests", type=int, default=400,
                    help="predict requests in the worker-kill stream (0: no kill)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    rep = run(args.requests, args.clients, args.kill_requests, args.seed)
    if args.json:
        print(json.dumps(asdict(rep)))
    else:
        print("\n".join(rep.lines()))
        for w in rep.wrong:
            print(f"  wrong: {w}")
    return 0 if rep.lost == 0 and rep.recovery_s is not None else 1


if __name__ == "__main__":
    sys.exit(main())
