"""The worst requests the default work budget allows, each measured in a fresh process.

Each case runs ``CamService.handle_batch`` on the shapes model (``models/shapes``) in its own
Python process, limited to 2 threads, and reports the peak RSS above the idle (warmed-up) process
(the kernel's high-water mark ``VmHWM``, reset just before the request through
``/proc/self/clear_refs``, minus the RSS before the request) and the wall and
CPU seconds of the request, with the answer's status and type. The images are built in the
parent and handed over as bytes: a tiny GIF whose header declares 36 MP (the decompression case),
and a noise JPEG (incompressible overlays) where the case says so.

Usage::

    python -m bench.worst_request            # all cases, a table
    python -m bench.worst_request --json     # one JSON line per case

The machine's load average is printed with the table: on a shared machine the seconds are an
upper bound of what the request costs alone.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL_DIR = ROOT / "models" / "shapes"
ALL = "heatmap,overlay,raw,bbox"

#: name, (W, H), image kind, targets, outputs, rows in the batch[, max_response_size]
CASES: list[tuple] = [
    ("36MP gif x 8 targets x all outputs", (6000, 6000), "gif", 8, ALL, 1),
    ("36MP noise jpeg x 8 targets x all outputs", (6000, 6000), "jpeg", 8, ALL, 1),
    ("40MP gif x 1 target x all outputs (full size)", (8000, 5000), "gif", 1, ALL, 1),
    ("40MP noise jpeg x 1 target x all outputs (full size)", (8000, 5000), "jpeg", 1, ALL, 1),
    ("4.2MP noise jpeg x 9 targets x all outputs", (2048, 2048), "jpeg", 9, ALL, 1),
    ("36MP gif x 16 targets x all outputs (refused)", (6000, 6000), "gif", 16, ALL, 1),
    ("8 rows of 36MP gif x 8 targets x all outputs", (6000, 6000), "gif", 8, ALL, 8),
    ("8 rows of 40MP gif x 1 target x overlay (full size)", (8000, 5000), "gif", 1, "overlay", 8),
    ("36MP noise jpeg x 8 targets x all, 500 MB answers", (6000, 6000), "jpeg", 8, ALL, 1,
     500_000_000),
    ("40MP noise jpeg x 1 target x all, 500 MB answers", (8000, 5000), "jpeg", 1, ALL, 1,
     500_000_000),
]


def make_image(size: tuple[int, int], kind: str) -> bytes:
    """A GIF of one colour (a few hundred bytes for any size) or a noise JPEG."""
    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    if kind == "gif":
        Image.new("P", size, 3).save(buf, "GIF")
    else:
        rng = np.random.default_rng(0)
        w, h = size
        tile = rng.integers(0, 256, (h // 4 + 1, w // 4 + 1, 3), dtype=np.uint8)
        img = Image.fromarray(tile, "RGB").resize((w, h), Image.NEAREST)
        img.save(buf, "JPEG", quality=60)
    return buf.getvalue()


CHILD = r"""
import json, os, resource, sys, time
import psutil, torch
torch.set_num_threads(2)
from camserve.serving import CamService
svc = CamService.from_model_dir(sys.argv[1])
data = open(sys.argv[2], "rb").read()
targets, outputs, rows = sys.argv[3], sys.argv[4], int(sys.argv[5])
row = {"data": data, "explain": "true", "target": targets, "outputs": outputs}
import io
from PIL import Image
small = io.BytesIO(); Image.new("RGB", (640, 480), "gray").save(small, "PNG")
svc.handle_batch([{"data": small.getvalue(), "explain": "true", "outputs": outputs}])  # warm
import gc; gc.collect()
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
try:  # reset the peak to the current RSS (Linux >= 4.0); else the peak since start
    open("/proc/self/clear_refs", "w").write("5")
except OSError:
    pass
idle = psutil.Process().memory_info().rss
base_peak = hwm()
c0, t0 = time.process_time(), time.perf_counter()
out = svc.handle_batch([dict(row) for _ in range(rows)])
wall, cpu = time.perf_counter() - t0, time.process_time() - c0
peak = hwm()
res = out.results
print(json.dumps({"idle_mb": idle / 2**20, "peak_above_idle_mb": (peak - idle) / 2**20,
                  "peak_before_mb": base_peak / 2**20, "wall_s": wall, "cpu_s": cpu,
                  "statuses": [r.status for r in res],
                  "types": sorted({r.body.get("type", "ok") for r in res}),
                  "bytes": max(len(r.text) for r in res),
                  "scaled": any(e.get("scaled") for r in res
                                for e in r.body.get("explanations", []))}))
"""


def run_case(size, kind, targets: int, outputs: str, rows: int,
             max_response_size: int | None = None, timeout: float = 600) -> dict:
    """One case in a fresh process (2 threads); its JSON figures. ``max_response_size``: the
    answer limit (default TorchServe's, 6553500 bytes), raised to see the budget alone."""
    with tempfile.TemporaryDirectory() as tmp:
        img = Path(tmp) / f"image.{kind}"
        img.write_bytes(make_image(size, kind))
        env = dict(os.environ, OMP_NUM_THREADS="2", MKL_NUM_THREADS="2",
                   PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
        env.pop("TS_MAX_RESPONSE_SIZE", None)
        if max_response_size:
            env["TS_MAX_RESPONSE_SIZE"] = str(max_response_size)
        tlist = json.dumps([i % 8 for i in range(targets)])  # the shapes model has 8 classes
        p = subprocess.run([sys.executable, "-c", CHILD, str(MODEL_DIR), str(img), tlist, outputs,
                            str(rows)], capture_output=True, text=True, timeout=timeout, env=env)
        if p.returncode != 0:
            raise RuntimeError(f"case failed (exit {p.returncode}): {p.stderr[-2000:]}")
        out = json.loads(p.stdout.strip().splitlines()[-1])
        out["body_bytes"] = img.stat().st_size
        return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", action="store_true", help="one JSON line per case")
    ap.add_argument("--only", type=int, nargs="*", help="case numbers (0-based)")
    args = ap.parse_args(argv)
    print(f"# load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores", flush=True)
    for i, (name, size, kind, t, outs, rows, *limit) in enumerate(CASES):
        if args.only and i not in args.only:
            continue
        r = run_case(size, kind, t, outs, rows, *limit)
        r["case"] = name
        if args.json:
            print(json.dumps(r), flush=True)
        else:
            codes = ",".join(str(s) for s in r["statuses"])
            print(f"{name:55s} peak +{r['peak_above_idle_mb']:7.0f} MB  {r['wall_s']:6.1f} s wall "
                  f"{r['cpu_s']:6.1f} s cpu  status {codes} {'/'.join(r['types'])}"
                  f"{' scaled' if r['scaled'] else ''}  answer {r['bytes']} B", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
