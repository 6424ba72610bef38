"""The batch job's Ray runner (camserve.onnx.ray): the pool size and the actor's batch function
without a cluster, then real jobs on a real two-node local Ray cluster bound to 127.0.0.1 (marked
slow)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import psutil
import pytest
from PIL import Image

from camserve.onnx.batch import run_job
from camserve.onnx.inputs import Item, UsageError, iter_inputs
from camserve.onnx.job import EXIT_OK, EXIT_PARTIAL, JobConfig, JobStats, plan_job
from camserve.onnx.outputs import Outputs
from camserve.onnx.ray import CamBatchWorker, RayOptions, pool_size

from .conftest import RAY_ENV, ROOT, job_env, photo

LOOPBACK = {"127.0.0.1", "::ffff:127.0.0.1", "::1"}
JsonLines = Callable[[Path], list[dict]]


# -- helpers ------------------------------------------------------------------------------------------

def _folder(root: Path, n: int, size: tuple[int, int], corrupt: bool = True) -> Path:
    """``n`` images (half PNG, half JPEG, in two subfolders), plus two corrupt files."""
    for i in range(n):
        sub = "a" if i % 2 else "b/c"
        photo(root / sub / f"img{i:03d}.{'png' if i % 3 else 'jpg'}",
             (size[0] + 7 * (i % 5), size[1] + 3 * (i % 7)), i)
    if corrupt:
        (root / "a" / "empty.png").write_bytes(b"")
        (root / "b" / "notes.jpg").write_text("not an image\n")
    return root


def _descendants() -> list[psutil.Process]:
    return psutil.Process().children(recursive=True)


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    """A real two-node Ray cluster (1 CPU per node, no dashboard) on 127.0.0.1; its address.
    Stops it at the end, and any process it left behind, by PID."""
    pytest.importorskip("ray", reason="the ray extra is not installed")
    saved = {k: os.environ.get(k) for k in RAY_ENV}
    os.environ.update(RAY_ENV)
    from ray._private import ray_constants
    from ray.cluster_utils import Cluster

    # read when ray is first imported: if an earlier test imported it, apply the variable now
    enable_cluster = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        c.add_node(num_cpus=1)
        c.wait_for_nodes()
        yield c.address
    finally:
        started = _descendants()
        c.shutdown()
        _, alive = psutil.wait_procs(started, timeout=10)
        for p in alive:  # stragglers this cluster started, by PID
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        ray_constants.ENABLE_RAY_CLUSTER = enable_cluster
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _job(graph: Path, inputs: list[Path], out: Path, address: str, *extra: str,
         popen: bool = False) -> subprocess.CompletedProcess | subprocess.Popen:
    cmd = [sys.executable, "-m", "export.batch_cam", "--model", str(graph), *map(str, inputs),
           "--out", str(out), "--ray", address, *extra]
    if popen:
        return subprocess.Popen(cmd, cwd=ROOT, env=job_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, cwd=ROOT, env=job_env(), capture_output=True, text=True, timeout=300)


def _wait_lines(path: Path, n: int, proc: subprocess.Popen, timeout: float = 120) -> int:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        have = len(path.read_text().splitlines()) if path.exists() else 0
        if have >= n or proc.poll() is not None:
            return have
        time.sleep(0.05)
    raise AssertionError(f"no {n} lines in {path} after {timeout}s")


def _sockets(procs: list[psutil.Process]) -> list[tuple[str, str, str]]:
    """(process, status, address) of every inet socket of ``procs``: local for LISTEN, remote
    for connections."""
    found = []
    for p in procs:
        try:
            name = p.name()
            conns = (p.net_connections if hasattr(p, "net_connections")
                     else p.connections)(kind="inet")  # older psutil
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        for cn in conns:
            if cn.status == psutil.CONN_LISTEN:
                found.append((name, cn.status, cn.laddr.ip))
            elif cn.raddr:
                found.append((name, cn.status, cn.raddr.ip))
    return found


def _heatmap(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path), dtype=np.int16)


# -- the driver and the actor, without a cluster -------------------------------------------------------

def test_pool_size() -> None:
    res = {"CPU": 8.0, "GPU": 2.0}
    assert pool_size(RayOptions("auto"), res) == (1, 8)
    assert pool_size(RayOptions("auto", cpus_per_actor=3), res) == (1, 2)
    assert pool_size(RayOptions("auto", gpus_per_actor=1), res) == (1, 2)
    assert pool_size(RayOptions("auto", actors=(2, 16)), res) == (2, 16)
    with pytest.raises(UsageError, match="allowed at most 4"):
        pool_size(RayOptions("auto", actors=(5, 5), cpus_per_actor=2), res)
    with pytest.raises(UsageError, match="cluster has 8 CPU and 0 GPU"):
        pool_size(RayOptions("auto", gpus_per_actor=1), {"CPU": 8.0})


def _rows_of(items: list) -> dict[str, np.ndarray]:
    return {"id": np.arange(len(items)), "path": np.array([i.path for i in items], object),
            "name": np.array([i.name for i in items], object),
            "abspath": np.array([os.path.abspath(i.path) for i in items], object)}


def test_worker_batch_equals_local_job(shapes_graph: Path, tmp_path: Path,
                                       json_lines: JsonLines) -> None:
    """The actor's batch function, called in-process: the local job's lines, files and errors."""
    root = _folder(tmp_path / "photos", 5, (50, 60))
    local = tmp_path / "local"
    cfg = JobConfig(model=shapes_graph, inputs=[str(root)], out=local, batch_size=8,
                    save=("heatmap", "overlay", "npy"))
    assert run_job(cfg).exit_status == EXIT_PARTIAL
    items = list(iter_inputs([str(root)]))
    out = tmp_path / "ray"
    worker = CamBatchWorker(plan_job(JobConfig(model=shapes_graph, inputs=[str(root)], out=out,
                                               save=("heatmap", "overlay", "npy"))))
    assert worker.threads == 1  # outside Ray: one thread, not the machine's cores
    rows = worker(_rows_of(items))
    assert list(rows["id"]) == list(range(len(items)))
    got = [json.loads(t) for t, ok in zip(rows["line"], rows["ok"]) if ok]
    errs = [json.loads(t) for t, ok in zip(rows["line"], rows["ok"]) if not ok]
    assert sorted(got, key=lambda r: r["path"]) == sorted(json_lines(local / "results.jsonl"),
                                                          key=lambda r: r["path"])
    assert sorted(errs, key=lambda r: r["path"]) == sorted(json_lines(local / "errors.jsonl"),
                                                           key=lambda r: r["path"])
    assert len(errs) == 2
    for r in got:
        for rel in r["files"].values():
            assert (out / rel).read_bytes() == (local / rel).read_bytes()


def test_worker_metrics_equal_local_job(shapes_graph: Path, tmp_path: Path,
                                        json_lines: JsonLines) -> None:
    """``--metrics`` in the actor's batch function: computed through the actor's session, the
    lines' ``"metrics"`` exactly the local job's for the same batch, the unrounded values in the
    ``metrics`` column, nothing for error rows."""
    root = _folder(tmp_path / "photos", 4, (50, 60))
    keys = ("deletion", "avg_drop")
    local = tmp_path / "local"
    stats = run_job(JobConfig(model=shapes_graph, inputs=[str(root)], out=local, batch_size=8,
                              save=(), metrics=keys, metrics_steps=5))
    assert stats.exit_status == EXIT_PARTIAL and stats.metrics_images == 4
    items = list(iter_inputs([str(root)]))
    plan = plan_job(JobConfig(model=shapes_graph, inputs=[str(root)], out=tmp_path / "ray", save=(),
                              metrics=keys, metrics_steps=5))
    assert (plan.metrics, plan.metrics_steps, plan.metrics_baseline) == (keys, 5, "mean")
    worker = CamBatchWorker(plan)
    calls = []
    sess = worker.explainer.sess
    run = sess.run
    sess.run = lambda fetch, feed: calls.append(list(fetch)) or run(fetch, feed)
    rows = worker(_rows_of(items))
    # one CAM run, then the audit through the same session: 1 reference + 5 steps + 1 confidence
    assert calls[0] == ["logits", plan.cam_output] and len(calls) == 1 + 7
    got = {r["path"]: r for r in (json.loads(t) for t, ok in zip(rows["line"], rows["ok"]) if ok)}
    theirs = {r["path"]: r for r in json_lines(local / "results.jsonl")}
    assert got == theirs and len(got) == 4
    assert all(list(r["metrics"]) == list(keys) for r in got.values())
    raw = [json.loads(m) if ok else m for m, ok in zip(rows["metrics"], rows["ok"])]
    assert [m for m, ok in zip(raw, rows["ok"]) if not ok] == ["", ""]
    for m, text, ok in zip(raw, rows["line"], rows["ok"]):
        if ok:
            assert {k: round(v, 6) for k, v in m.items()} == json.loads(text)["metrics"]
    assert rows["metrics_seconds"].sum() > 0
    # without --metrics: no "metrics" key, an empty column
    plain = CamBatchWorker(plan_job(JobConfig(model=shapes_graph, inputs=[str(root)],
                                              out=tmp_path / "p",
                                              save=())))(_rows_of(items))
    assert all("metrics" not in json.loads(t) for t in plain["line"])
    assert list(plain["metrics"]) == [""] * len(items)


def test_driver_means_each_written_line_once(tmp_path: Path, json_lines: JsonLines) -> None:
    """The driver averages the metrics of the lines it writes with the local job's MetricMeans:
    a retried batch's rows (same ids) count once, error rows not at all."""
    from camserve.onnx import ray as cam_ray
    from camserve.onnx.audit import MetricMeans

    assert cam_ray.MetricMeans is MetricMeans  # one accumulator, not a copy
    items = [Item(f"{n}.png", f"{n}.png") for n in "abc"]

    def block(ids: list[int], values: list[float | None]) -> dict[str, np.ndarray]:
        ok = [v is not None for v in values]
        lines = [json.dumps({"path": f"{'abc'[i]}.png", "name": f"{'abc'[i]}.png",
                             "metrics": {"deletion": round(v, 6)}}) if v is not None
                 else json.dumps({"path": f"{'abc'[i]}.png", "type": "InvalidImage",
                                  "reason": "corrupt"}) for i, v in zip(ids, values)]
        raw = [json.dumps({"deletion": v}) if v is not None else "" for v in values]
        return {"id": np.array(ids), "ok": np.array(ok), "line": np.array(lines, object),
                "provider": np.array(["CPUExecutionProvider"] * len(ids), object),
                "seconds": np.full(len(ids), 0.1), "metrics": np.array(raw, object),
                "metrics_seconds": np.full(len(ids), 0.5)}

    class Dataset:
        def iter_batches(self, **kw: object) -> Iterator[dict[str, np.ndarray]]:
            yield block([0, 1], [0.1234567, None])
            yield block([0, 1], [0.1234567, None])  # a retried batch
            yield block([2], [0.3])

    outputs = Outputs(tmp_path, False)
    stats, means = JobStats(), MetricMeans()

    class Bar:
        def update(self, n: int) -> None:
            pass

    try:
        cam_ray._drain(Dataset(), items, outputs, Bar(), time.perf_counter(), None, stats, means)
    finally:
        outputs.close()
    assert means.images == 2
    assert means.means() == {"deletion": (0.1234567 + 0.3) / 2}  # unrounded, as the local job
    assert stats.metrics_seconds == pytest.approx(1.5)
    assert len(json_lines(tmp_path / "results.jsonl")) == 2


# -- a real two-node cluster on loopback --------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.timeout(600)
def test_cluster_loopback_only(cluster: str) -> None:
    assert cluster.startswith("127.0.0.1:")
    import ray

    socks = _sockets(_descendants())
    assert any(s[1] == psutil.CONN_LISTEN for s in socks)
    assert not [s for s in socks if s[2] not in LOOPBACK], socks
    assert ray.is_initialized() is False  # the test process is no driver: the jobs are


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_same_as_local_job(cluster: str, shapes_graph: Path, tmp_path: Path,
                           json_lines: JsonLines) -> None:
    root = _folder(tmp_path / "photos", 24, (70, 90))
    local, out = tmp_path / "local", tmp_path / "ray"
    cfg = JobConfig(model=shapes_graph, inputs=[str(root)], out=local, batch_size=4,
                    save=("heatmap", "npy"))
    assert run_job(cfg).exit_status == EXIT_PARTIAL
    res = _job(shapes_graph, [root], out, cluster, "--batch-size", "4", "--save", "heatmap,npy",
               "--actors", "2", "--report")
    assert res.returncode == EXIT_PARTIAL, res.stderr[-2000:]
    assert "24 images explained, 2 failed, 0 skipped (resume)" in res.stdout
    # --report on Ray: the page over every line, a thumbnail of each image and its heatmap
    assert f"report: {out / 'report.html'} (0 failed previews)" in res.stdout
    assert len(list((out / "thumbs").glob("*/*.jpg"))) == 2 * 24
    mine = sorted(json_lines(out / "results.jsonl"), key=lambda r: r["path"])
    theirs = sorted(json_lines(local / "results.jsonl"), key=lambda r: r["path"])
    assert [r["path"] for r in mine] == [r["path"] for r in theirs]
    assert len({r["path"] for r in mine}) == 24
    exact = 0
    for a, b in zip(mine, theirs):
        exact += a == b
        assert a == b or _close(a, b), (a, b)
        assert np.abs(_heatmap(out / a["files"]["heatmap"])
                      - _heatmap(local / b["files"]["heatmap"])).max() <= 1
    errs = sorted(json_lines(out / "errors.jsonl"), key=lambda r: r["path"])
    assert errs == sorted(json_lines(local / "errors.jsonl"), key=lambda r: r["path"])
    assert {Path(e["path"]).name for e in errs} == {"empty.png", "notes.jpg"}
    print(f"\n{exact}/{len(mine)} result lines identical to the local job's")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_metrics_same_as_local_job(cluster: str, shapes_graph: Path, tmp_path: Path,
                                   json_lines: JsonLines) -> None:
    """``--ray`` with ``--metrics deletion,avg_drop``: every line's metrics and the summary's means
    are the local job's on the same images (within 1e-5)."""
    root = _folder(tmp_path / "photos", 8, (70, 90), corrupt=False)
    local, out = tmp_path / "local", tmp_path / "ray"
    flags = ["--batch-size", "4", "--save", "none", "--metrics", "deletion,avg_drop",
             "--metrics-steps", "10"]
    ref = subprocess.run([sys.executable, "-m", "export.batch_cam", "--model", str(shapes_graph),
                          str(root), "--out", str(local), *flags], cwd=ROOT, env=job_env(),
                         capture_output=True, text=True, timeout=300)
    assert ref.returncode == EXIT_OK, ref.stderr[-2000:]
    res = _job(shapes_graph, [root], out, cluster, *flags, "--actors", "2")
    assert res.returncode == EXIT_OK, res.stderr[-2000:]
    assert "8 images explained, 0 failed" in res.stdout
    assert "metrics (mean of 8 images, 12 session runs per image" in res.stdout
    mine = {r["path"]: r["metrics"] for r in json_lines(out / "results.jsonl")}
    theirs = {r["path"]: r["metrics"] for r in json_lines(local / "results.jsonl")}
    assert sorted(mine) == sorted(theirs) and len(mine) == 8
    for path, m in mine.items():
        assert list(m) == ["deletion", "avg_drop"], path
        for k in m:
            assert abs(m[k] - theirs[path][k]) <= 1e-5, (path, k, m[k], theirs[path][k])
    means = [line.split("): ", 1)[1].strip() for line in (res.stdout, ref.stdout)]
    for key in ("deletion", "avg_drop"):
        a, b = (float(text.split(f"{key}=")[1].split()[0]) for text in means)
        assert abs(a - b) <= (0.01 if key == "avg_drop" else 1e-4), (key, a, b)


def _close(a: dict, b: dict) -> bool:
    """Equal lines up to float32 noise between batch compositions (scores 1e-5, bbox 1 px)."""
    same = {k: v for k, v in a.items() if k not in ("topk", "score", "bbox")}
    if same != {k: v for k, v in b.items() if k not in ("topk", "score", "bbox")}:
        return False
    if [t["index"] for t in a["topk"]] != [t["index"] for t in b["topk"]]:
        return False
    scores = [(t["score"], u["score"]) for t, u in zip(a["topk"], b["topk"])]
    scores.append((a["score"], b["score"]))
    bb = a["bbox"] is None and b["bbox"] is None or (
        a["bbox"] is not None and b["bbox"] is not None
        and max(abs(x - y) for x, y in zip(a["bbox"], b["bbox"])) <= 1)
    return bb and all(abs(x - y) <= 1e-5 for x, y in scores)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_killed_actor_every_image_once(cluster: str, shapes_graph: Path, tmp_path: Path,
                                       json_lines: JsonLines) -> None:
    """SIGKILL one actor process mid-job: it is replaced, its batches rerun, no line lost or
    duplicated. Also: every socket of the cluster, the driver and the actors is on loopback."""
    n = 40
    root = _folder(tmp_path / "photos", n, (600, 800), corrupt=False)
    out = tmp_path / "out"
    before = {p.pid for p in _descendants()}
    t0 = time.monotonic()
    proc = _job(shapes_graph, [root], out, cluster, "--batch-size", "2", "--actors", "2",
                "--save", "heatmap,overlay", popen=True)
    try:
        have = _wait_lines(out / "results.jsonl", 2, proc)
        actors = [p for p in _descendants() if p.pid not in before and _is_actor(p)]
        socks = _sockets(_descendants())
        assert proc.poll() is None and have < n, "the job ended before an actor could be killed"
        assert actors, "no actor process found"
        victim = actors[0]
        victim.kill()
        killed_at = len((out / "results.jsonl").read_text().splitlines())
        seen = {p.pid for p in actors}
        replacements: set[int] = set()
        end = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < end:
            replacements |= {p.pid for p in _descendants() if p.pid not in before | seen
                             and _is_actor(p)}
            time.sleep(0.2)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    seconds = time.monotonic() - t0
    assert proc.returncode == EXIT_OK, stderr[-3000:]
    assert f"{n} images explained, 0 failed" in stdout
    paths = [r["path"] for r in json_lines(out / "results.jsonl")]
    assert len(paths) == len(set(paths)) == n
    assert not json_lines(out / "errors.jsonl")
    assert not psutil.pid_exists(victim.pid) or victim.status() == psutil.STATUS_ZOMBIE
    assert replacements, "no actor process replaced the killed one"
    assert not [s for s in socks if s[2] not in LOOPBACK], socks
    print(f"\nkilled actor pid {victim.pid} after {killed_at}/{n} lines; replaced by pid "
          f"{sorted(replacements)}; job finished with {len(paths)} unique lines in {seconds:.1f}s; "
          f"{len(socks)} sockets of {len(_descendants())} processes, all loopback")


def _is_actor(p: psutil.Process) -> bool:
    try:
        return "CamBatchWorker" in " ".join(p.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_ctrl_c_then_resume(cluster: str, shapes_graph: Path, tmp_path: Path,
                            json_lines: JsonLines) -> None:
    """SIGINT to the driver mid-job: exit 130, whole lines each at most once; then ``--resume``
    (after a torn last line, as a killed driver may leave) explains the rest and retries the
    failures."""
    n = 30
    root = _folder(tmp_path / "photos", n, (600, 800))
    out = tmp_path / "out"
    proc = _job(shapes_graph, [root], out, cluster, "--batch-size", "2", "--actors", "2",
                "--save", "heatmap,overlay", popen=True)
    try:
        have = _wait_lines(out / "results.jsonl", 2, proc)
        assert proc.poll() is None and have < n, "the job ended before Ctrl-C"
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, stderr[-3000:]
    assert "run again with --resume" in stderr
    text = (out / "results.jsonl").read_text()
    assert text.endswith("\n")
    done = [r["path"] for r in json_lines(out / "results.jsonl")]  # whole lines, each at most once
    assert len(done) == len(set(done)) < n
    with (out / "results.jsonl").open("a") as fh:
        fh.write('{"path": "torn')
    again = _job(shapes_graph, [root], out, cluster, "--batch-size", "2", "--resume")
    assert again.returncode == EXIT_PARTIAL, again.stderr[-2000:]
    assert (f"{n - len(done)} images explained, 2 failed, {len(done)} skipped (resume)"
            in again.stdout)
    paths = [r["path"] for r in json_lines(out / "results.jsonl")]
    assert len(paths) == len(set(paths)) == n
    assert {Path(e["path"]).name for e in json_lines(out / "errors.jsonl")} == {"empty.png",
                                                                            "notes.jpg"}


def test_runners_share_the_job_model(shapes_graph: Path, tmp_path: Path) -> None:
    """Both runners check options with the job's one plan and explain with the job's one
    BatchExplainer, not copies; the actor's explainer has the actor's threads."""
    from camserve.onnx import batch, job
    from camserve.onnx import ray as cam_ray

    assert cam_ray.plan_job is batch.plan_job is job.plan_job
    assert cam_ray.BatchExplainer is batch.BatchExplainer is job.BatchExplainer
    for name in ("result_lines", "audit_lines", "check_session", "ort_session"):
        assert not hasattr(cam_ray, name) and not hasattr(batch, name), name
    worker = CamBatchWorker(plan_job(JobConfig(model=shapes_graph, inputs=[str(tmp_path)],
                                               out=tmp_path / "out")))
    assert isinstance(worker.explainer, job.BatchExplainer)
    assert worker.explainer.sess.get_session_options().intra_op_num_threads == worker.threads == 1


def test_worker_keeps_non_utf8_names(shapes_graph: Path, tmp_path: Path) -> None:
    """Names travel to the actors as file-system bytes: a name that is not UTF-8 is explained,
    its line is valid UTF-8 JSON giving the original bytes back."""
    raw = os.fsencode(tmp_path) + b"/caf\xe9.png"
    photo(Path(os.fsdecode(raw)), (40, 40), 0)
    items = list(iter_inputs([str(tmp_path)]))
    from camserve.onnx.ray import build_dataset  # noqa: F401  (the columns it builds are bytes)

    worker = CamBatchWorker(plan_job(JobConfig(model=shapes_graph, inputs=[str(tmp_path)],
                                               out=tmp_path / "out")))
    rows = worker({"id": np.arange(1), "path": np.array([os.fsencode(items[0].path)], object),
                   "name": np.array([os.fsencode(items[0].name)], object),
                   "abspath": np.array([os.fsencode(os.path.abspath(items[0].path))], object)})
    assert list(rows["ok"]) == [True]
    line = rows["line"][0]
    line.encode("utf-8")
    assert os.fsencode(json.loads(line)["path"]) == raw
    assert (tmp_path / "out" / json.loads(line)["files"]["heatmap"]).is_file()
