"""The batch job's command line, ``camserve-batch`` (``make batch`` runs it through
``export/batch_cam.py``): the parser, its values parsed into a :class:`~camserve.onnx.job.JobConfig`
(and :class:`~camserve.onnx.ray.RayOptions` with ``--ray``), and :func:`main`, which runs the
local runner or the Ray runner, prints the summary line and returns the exit status.

The manual (options, outputs, exit statuses, limits): docs/batch.md; on Ray: docs/ray.md.

Example::

    >>> parse_actors("4"), parse_actors("1,8")
    ((4, 4), (1, 8))
    >>> check_address("ray://head.example:10001")
    'ray://head.example:10001'
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import re
import sys
import traceback
from pathlib import Path
from typing import Optional, Sequence

from ..parsing import parse_choices, short_repr
from ..report import write_report
from .audit import AUDIT_KEYS, BASELINES, cost_help, format_means, parse_metric_keys, \
    runs_per_image
from .batch import run_job
from .inputs import DEFAULT_MAX_FILE_SIZE, UsageError
from .job import (DEFAULT_WINDOW_BYTES, EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_USAGE, SAVE_KINDS,
                  JobConfig, JobStats)
from .outputs import ERRORS
from .ray import RayOptions, run_ray_job  # imports ray itself only when a job runs on it

log = logging.getLogger(__name__)


# -- the parser ---------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    """The command line's parser: the job's options, then one group per feature (limits, the
    faithfulness audit, Ray)."""
    p = argparse.ArgumentParser(
        prog="camserve-batch",
        description="Grad-CAM heatmaps for many images with a camserve CAM graph on onnxruntime.",
        epilog="Outputs, exit statuses, limits and name rules: docs/batch.md; on Ray: "
               "docs/ray.md.")
    _job_options(p)
    _limit_options(p.add_argument_group("limits (see docs/batch.md)"))
    _metrics_options(p.add_argument_group(
        "faithfulness audit (camserve.onnx.audit)",
        "Score each map through the graph itself: results.jsonl lines get \"metrics\": {key: value} "
        "and the summary line their means. Cost, in session runs per image (each run covers the "
        f"whole batch, as the CAM run): {cost_help()} (with --metrics-steps 50); ROAD also solves "
        "a linear system per step. Example: deletion,insertion,road_morf,avg_drop = "
        f"{runs_per_image(('deletion', 'insertion', 'road_morf', 'avg_drop'))} runs per image."))
    _ray_options(p.add_argument_group("Ray cluster (camserve.onnx.ray)"))
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def _job_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="image file, folder (recursive) or .txt file listing paths")
    p.add_argument("--model", required=True, type=Path, help="CAM graph from camserve-export")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--batch-size", type=int, default=32, help="images per session run (default 32)")
    p.add_argument("--threads", type=int, help="onnxruntime intra-op threads (default: all CPUs)")
    p.add_argument("--workers", type=int, help="decode/write threads (default: min(8, CPUs), >= 2)")
    p.add_argument("--method", help="which CAM output of the graph (default: its first method)")
    p.add_argument("--save", default="heatmap",
                   help=f"comma-separated artefacts per image: {', '.join(SAVE_KINDS)} or none "
                        f"(default heatmap); results.jsonl is always written")
    p.add_argument("--target", help="explain this class (index or label) for every image; "
                                    "default: each image's top-1 class (segmentation: its largest "
                                    "predicted class but the background)")
    p.add_argument("--reference", metavar="FILE",
                   help="embedding graphs: what every image is compared with, an image file or a "
                        ".json / .npy vector of the graph's dimension")
    p.add_argument("--topk", type=int, help="predictions per image in results.jsonl "
                                            "(default: the graph's)")
    p.add_argument("--explain-top", type=int, metavar="N",
                   help="detection graphs: maps for each image's N best detections (0..the "
                        "graph's explain_top; default: all the graph computes)")
    p.add_argument("--resume", action="store_true",
                   help="skip images already in DIR/results.jsonl")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="cuda uses CUDAExecutionProvider when onnxruntime has it, else CPU")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar (default: when stderr is a terminal)")
    p.add_argument("--overlap", action=argparse.BooleanOptionalAction, default=None,
                   help="decode while the session runs (default: when the session leaves CPUs "
                        "free, i.e. --device cuda or --threads below the CPU count)")
    p.add_argument("--report", action="store_true",
                   help="after the run (also one with failed items) write DIR/report.html, the "
                        "page camserve-report writes (docs/report.md)")


def _limit_options(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--max-file-size", type=parse_bytes, default=DEFAULT_MAX_FILE_SIZE,
                   metavar="BYTES", help="larger input files are refused (default 64M; "
                                         "suffixes K, M, G)")
    g.add_argument("--max-pixels", type=parse_bytes, metavar="N",
                   help="larger images are refused (default: the graph's, at most 40000000)")
    g.add_argument("--window-bytes", type=parse_bytes, default=DEFAULT_WINDOW_BYTES,
                   metavar="BYTES", help="decoded data held ahead of the session and writes "
                                         "(default 256M)")


def _metrics_options(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--metrics", metavar="KEYS",
                   help=f"comma-separated: {', '.join(AUDIT_KEYS)}, or all (default: none)")
    g.add_argument("--metrics-steps", type=int, default=50, metavar="N",
                   help="deletion/insertion steps = session runs per image for each (default 50)")
    g.add_argument("--metrics-baseline", choices=BASELINES, default="mean",
                   help="what replaces removed pixels: each image's mean colour or its blur "
                        "(default mean)")


def _ray_options(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--ray", metavar="ADDRESS", help="run on Ray: local (a private Ray, stopped at "
                   "the end), auto, HOST:PORT or ray://HOST:PORT; inputs, graph and DIR must be on "
                   "a filesystem every node sees")
    g.add_argument("--actors", metavar="N|MIN,MAX", help="actor pool size, fixed or autoscaling "
                   "(default: as many as fit, may shrink to 1)")
    g.add_argument("--cpus-per-actor", type=float, metavar="C",
                   help="CPUs per actor = its onnxruntime threads (default 1)")
    g.add_argument("--gpus-per-actor", type=float, metavar="G",
                   help="GPUs per actor (default 0; 1 with --device cuda)")


# -- values -------------------------------------------------------------------------------------------

def parse_bytes(text: str) -> int:
    """``1234``, ``64K``, ``64M``, ``2G`` (powers of 1024) -> a positive int.

    Example::

        >>> parse_bytes("64M"), parse_bytes("2 GiB")
        (67108864, 2147483648)
    """
    m = re.fullmatch(r"\s*([0-9]{1,15})\s*([kKmMgG]?)[iI]?[bB]?\s*", text)
    if not m or int(m.group(1)) < 1:
        raise argparse.ArgumentTypeError(f"{short_repr(text)} (allowed: a positive number of bytes, "
                                         f"optionally with K, M or G)")
    return int(m.group(1)) * 1024 ** " KMG".index((m.group(2) or " ").upper())


def job_config(args: argparse.Namespace) -> JobConfig:
    """The job's options of a parsed command line; UsageError for a value not allowed."""
    for opt in ("threads", "workers", "topk"):
        v = getattr(args, opt)
        if v is not None and v < 1:
            raise UsageError(f"invalid value for --{opt}: {v} (allowed: 1 or more)")
    return JobConfig(model=args.model, inputs=list(args.inputs), out=args.out,
                     batch_size=args.batch_size, threads=args.threads, workers=args.workers,
                     method=args.method, save=_parse_save(args.save), resume=args.resume,
                     device=args.device, target=args.target, topk=args.topk,
                     progress=args.progress, overlap=args.overlap,
                     max_file_size=args.max_file_size, max_pixels=args.max_pixels,
                     window_bytes=args.window_bytes, metrics=_parse_metrics(args.metrics),
                     metrics_steps=args.metrics_steps, metrics_baseline=args.metrics_baseline,
                     reference=args.reference, explain_top=args.explain_top)


def _parse_save(text: str) -> tuple[str, ...]:
    return parse_choices(text, SAVE_KINDS, key="--save", exc=UsageError, skip=("none",),
                         empty_ok=True)


def _parse_metrics(text: Optional[str]) -> tuple[str, ...]:
    if text is None:
        return ()
    try:
        return parse_metric_keys(text)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def check_address(text: str) -> str:
    """``local``, ``auto``, ``HOST:PORT`` or ``ray://HOST:PORT``; UsageError otherwise."""
    value = text.strip()
    if value in ("local", "auto"):
        return value
    rest = value[len("ray://"):] if value.startswith("ray://") else value
    host, sep, port = rest.rpartition(":")
    if sep and host and "/" not in host and port.isdigit() and 0 < int(port) < 65536:
        return value
    raise UsageError(f"invalid value for --ray: {short_repr(text)} (allowed: local, auto, HOST:PORT or "
                     f"ray://HOST:PORT)")


def parse_actors(text: str) -> tuple[int, int]:
    """``N`` (a fixed pool) or ``MIN,MAX`` (an autoscaling pool) -> (min, max); UsageError
    otherwise."""
    parts = [p.strip() for p in text.split(",")]
    try:
        nums = [int(p) for p in parts]
    except ValueError:
        nums = []
    if len(nums) == 1:
        nums = nums * 2
    if len(nums) != 2 or nums[0] < 1 or nums[1] < nums[0]:
        raise UsageError(f"invalid value for --actors: {short_repr(text)} (allowed: N or MIN,MAX with "
                         f"1 <= MIN <= MAX)")
    return nums[0], nums[1]


def ray_options(args: argparse.Namespace) -> Optional[RayOptions]:
    """The Ray options of a parsed command line, or None without ``--ray``. UsageError for a Ray
    option without ``--ray`` and for local-runner options that do not apply to actors."""
    ray_only = [f"--{name.replace('_', '-')}" for name in ("actors", "cpus_per_actor",
                                                           "gpus_per_actor")
                if getattr(args, name, None) is not None]
    if getattr(args, "ray", None) is None:
        if ray_only:
            raise UsageError(f"invalid option {ray_only[0]}: it needs --ray ADDRESS")
        return None
    for name in ("threads", "workers", "overlap"):
        if getattr(args, name, None) is not None:
            raise UsageError(f"invalid option --{name} with --ray: each actor uses the CPUs Ray "
                             f"assigns it (set them with --cpus-per-actor)")
    cpus = 1.0 if args.cpus_per_actor is None else float(args.cpus_per_actor)
    gpus = args.gpus_per_actor
    if gpus is None:
        gpus = 1.0 if getattr(args, "device", "cpu") == "cuda" else 0.0
    if not (cpus > 0 and math.isfinite(cpus)):
        raise UsageError(f"invalid value for --cpus-per-actor: {cpus:g} (allowed: more than 0)")
    if not (gpus >= 0 and math.isfinite(gpus)):
        raise UsageError(f"invalid value for --gpus-per-actor: {gpus:g} (allowed: 0 or more)")
    actors = None if args.actors is None else parse_actors(args.actors)
    return RayOptions(address=check_address(args.ray), actors=actors, cpus_per_actor=cpus,
                      gpus_per_actor=float(gpus))


# -- main ---------------------------------------------------------------------------------------------

def summary(stats: JobStats, out: Path) -> str:
    """The summary line printed at the end of a run."""
    rate = stats.ok / stats.seconds if stats.seconds > 0 else 0.0
    line = (f"{stats.ok} images explained, {stats.failed} failed, {stats.skipped} skipped (resume) "
            f"in {stats.seconds:.1f}s ({rate:.1f} images/s, {', '.join(stats.providers)}) -> {out}")
    if stats.metrics_runs_per_image:
        line += (f"; metrics (mean of {stats.metrics_images} images, "
                 f"{stats.metrics_runs_per_image} session runs per image, "
                 f"{stats.metrics_seconds:.1f}s): {format_means(stats.metrics) or 'none'}")
    return line


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point; returns the exit status (docs/batch.md)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = job_config(args)
        ray_opts = ray_options(args)  # None without --ray
        stats = run_job(cfg) if ray_opts is None else run_ray_job(cfg, ray_opts, args.verbose)
    except KeyboardInterrupt:
        print("interrupted: run again with --resume to continue", file=sys.stderr)
        if argv is None:  # the program itself: its files are closed and its threads done, so
            # skip the interpreter's teardown (about a second with torch and onnxruntime loaded)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(EXIT_INTERRUPTED)
        return EXIT_INTERRUPTED
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as exc:  # any other failure: reported, the traceback with -v
        if args.verbose:
            traceback.print_exc()
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    print(summary(stats, args.out))
    if stats.failed:
        print(f"see {args.out / ERRORS}", file=sys.stderr)
    if args.report:
        return _report(args, stats.exit_status)
    return stats.exit_status


def _report(args: argparse.Namespace, status: int) -> int:
    """``--report``: the job's page, after a run that wrote its lines (exit status 0 or 3); a
    report that cannot be written makes the exit status 1."""
    try:
        stats = write_report(args.out, workers=args.workers, max_file_size=args.max_file_size,
                             **({} if args.max_pixels is None else {"max_pixels": args.max_pixels}))
    except Exception as exc:  # the job's files are there; the page is not
        if args.verbose:
            traceback.print_exc()
        print(f"error: the report could not be written: {type(exc).__name__}: {exc}",
              file=sys.stderr)
        return EXIT_FAILURE
    print(f"report: {stats.page} ({stats.preview_failures} failed previews)")
    return status


if __name__ == "__main__":  # pragma: no cover - python -m camserve.onnx.cli
    sys.exit(main())
