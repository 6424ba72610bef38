"""Offline benchmark: the ONNX CAM graph against the plain ONNX graph, the PyTorch engine and
pytorch-grad-cam; then the batch job end to end against the bare session.

ResNet-50 (random weights), batch 16, 224x224, CPU. Part 1 measures side by side in one run: each
round times every contender once in a rotating order, and the table reports medians over the rounds
after warm-up, as images/s and ratios:

* ORT plain graph      — the exported logits-only graph (same trace and translation);
* ORT CAM graph        — the exported CAM graph (layer4, Grad-CAM), fetching logits and cam;
* ORT CAM graph + maps — the same plus camserve.heatmaps_at_sizes to 224x224 uint8 maps;
* camserve engine      — CamEngine in PyTorch, heatmaps at 224x224;
* pytorch-grad-cam     — GradCAM(model, [layer4]) on the top-1 class (maps at 224x224).

Each timed call starts after a 0.3 s pause, so that no contender pays for the previous one's
spinning threads. Part 2 writes ~300 JPEGs (photo sizes, 400-640 px) and runs ``export.batch_cam``
over them (heatmap PNGs, results.jsonl) twice, alternating with three measurements of the bare
CAM-graph session rate on preprocessed tensors (same session settings as the job), and compares the
medians. Usage::

    python bench/offline.py [--batch 16] [--size 224] [--rounds 15] [--images 300] [--threads N]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
import torchvision

from camserve import CamEngine, heatmaps_at_sizes
from camserve.models import ModelSpec, from_module
from camserve.onnx.batch import run_job
from camserve.onnx.export import export_cam_onnx, export_plain_onnx
from camserve.onnx.job import BatchExplainer, JobConfig, JobStats, plan_job
from camserve.onnx.session import available_cpus, ort_session
from camserve.testing.photos import write_photos

SETTLE_S = 0.3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--images", type=int, default=300)
    ap.add_argument("--threads", type=int, default=0,
                    help="onnxruntime and torch intra-op threads (0: all CPUs)")
    args = ap.parse_args()
    threads = args.threads or available_cpus()
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None).eval()
    size = (args.size, args.size)
    work = Path(tempfile.mkdtemp(prefix="camserve-bench-"))

    t0 = time.perf_counter()
    plain_path = export_plain_onnx(model, work / "plain.onnx", size)
    src = from_module(model, ModelSpec(arch="torchvision.models.resnet50", input_size=size,
                                       target_layer="layer4"))
    cam_path = export_cam_onnx(src, work / "cam.onnx", verify=False).path
    print(f"exported plain and CAM graphs in {time.perf_counter() - t0:.1f}s ({work})")

    plain_sess = ort_session(plain_path, threads=threads)
    cam_sess = ort_session(cam_path, threads=threads)
    x = torch.rand(args.batch, 3, *size)
    xn = x.numpy()
    sizes = [size] * args.batch
    engine = CamEngine(model, "layer4")

    def ort_plain() -> None:
        plain_sess.run(["logits"], {"input": xn})

    def ort_cam() -> None:
        cam_sess.run(["logits", "cam"], {"input": xn})

    def ort_cam_maps() -> None:
        _, cam = cam_sess.run(["logits", "cam"], {"input": xn})
        heatmaps_at_sizes(torch.from_numpy(cam), sizes)

    def torch_engine() -> None:
        engine(x, method="gradcam").heatmaps_uint8(size).cpu()

    from pytorch_grad_cam import GradCAM

    gc = GradCAM(model=model, target_layers=[model.layer4])

    def pgc() -> None:
        gc(input_tensor=x, targets=None)

    contenders: dict[str, Callable[[], None]] = {
        "ORT plain graph (logits)": ort_plain,
        "ORT CAM graph (logits + cam)": ort_cam,
        "ORT CAM graph + 224x224 maps": ort_cam_maps,
        "camserve engine, PyTorch": torch_engine,
        "pytorch-grad-cam GradCAM": pgc,
    }
    names = list(contenders)
    times: dict[str, list[float]] = {k: [] for k in names}
    for r in range(args.warmup + args.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            time.sleep(SETTLE_S)  # let the previous contender's idle threads stop spinning
            t = time.perf_counter()
            contenders[name]()
            if r >= args.warmup:
                times[name].append(time.perf_counter() - t)
    gc.activations_and_grads.release()
    med = {k: statistics.median(v) for k, v in times.items()}
    ips = {k: args.batch / v for k, v in med.items()}
    base = med[names[0]]
    print(f"\nResNet-50, batch {args.batch}, {args.size}x{args.size}, CPU, {threads} threads, "
          f"median of {args.rounds} rounds after {args.warmup} warm-up")
    print(f"| {'contender':30} | images/s | time x ORT plain | speed x pytorch-grad-cam |")
    print(f"|{'-' * 32}|----------|------------------|--------------------------|")
    for k in names:
        print(f"| {k:30} | {ips[k]:8.1f} | {med[k] / base:16.3f} | "
              f"{ips[k] / ips[names[4]]:24.2f} |")
    print(f"CAM graph / plain graph time = {med[names[1]] / base:.3f} (goal <= 1.05); "
          f"CAM graph + maps vs pytorch-grad-cam = {ips[names[2]] / ips[names[4]]:.2f}x images/s "
          f"(goal >= 5)")

    # -- part 2: the batch job end to end ------------------------------------------------------
    photos = work / "photos"
    write_photos(photos, args.images)
    del plain_sess, cam_sess, gc
    job_cfg = JobConfig(model=cam_path, inputs=[str(photos)], out=work / "bare")
    job_sess = BatchExplainer.open(plan_job(job_cfg), device="cpu", threads=threads).sess  # the job's

    def bare_rate() -> float:
        """images/s of the bare session (the job's settings) on preprocessed tensors."""
        runs: list[float] = []
        for r in range(args.warmup + args.rounds):
            t = time.perf_counter()
            job_sess.run(["logits", "cam"], {"input": xn})
            if r >= args.warmup:
                runs.append(time.perf_counter() - t)
        return args.batch / statistics.median(runs)

    # bare, job, bare, job, bare: the medians, so that drifts of a shared machine hit both
    bares: list[float] = []
    jobs: list[JobStats] = []
    for i in range(2):
        bares.append(bare_rate())
        jobs.append(run_job(JobConfig(model=cam_path, inputs=[str(photos)], out=work / f"out{i}",
                                      batch_size=args.batch, threads=threads, progress=False)))
    bares.append(bare_rate())
    bare_ips = statistics.median(bares)
    job_rates = [j.ok / j.seconds for j in jobs]
    job_ips = statistics.median(job_rates)
    in_session = statistics.median([j.ok / j.session_seconds for j in jobs])
    print(f"\nbatch job over {jobs[0].ok} JPEGs (400-640 px, heatmap PNG + results.jsonl), batch "
          f"{args.batch}, {threads} ORT threads: {job_ips:.1f} images/s "
          f"(runs: {', '.join(f'{r:.1f}' for r in job_rates)}; the session alone inside the job: "
          f"{in_session:.1f} images/s)")
    print(f"bare session on preprocessed tensors: {bare_ips:.1f} images/s (runs: "
          f"{', '.join(f'{b:.1f}' for b in bares)}); job / bare = {job_ips / bare_ips:.2f} "
          f"(goal >= 0.8)")
    print(f"(files in {work}; remove when done)")


if __name__ == "__main__":
    main()
