"""Serve a model folder as a native KServe predictor (``camserve-kserve``).

``camserve-kserve MODEL_DIR [--model-name NAME] [--host 127.0.0.1] [--http-port 8080] ...``, or
``python -m camserve.kserve MODEL_DIR ...``; ``--help`` lists every option, a bad argument exits
with status 2. The manual: ``docs/kserve.md``.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Optional, Sequence

from ..models import BACKENDS
from .batcher import DEFAULT_PREPARE_THREADS
from .wire import DEFAULT_MAX_INSTANCES

#: a model name goes in the routes: letters, digits, '.', '_', '-'
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def build_parser() -> argparse.ArgumentParser:
    """The command line (``--help``); a new option is one more ``add_argument`` here."""
    ap = argparse.ArgumentParser(prog="camserve-kserve", description=__doc__.split("\n\n")[0])
    ap.add_argument("model_dir", type=Path, help="model folder (model-config.yaml, weights, labels)")
    ap.add_argument("--model-name", default=None, help="name in the routes (default: folder name)")
    ap.add_argument("--host", default="127.0.0.1",
                    help="address to listen on, REST and gRPC (default 127.0.0.1; containers: 0.0.0.0)")
    ap.add_argument("--http-port", type=int, default=8080)
    ap.add_argument("--grpc-port", type=int, default=8081, help="0 turns gRPC off")
    ap.add_argument("--workers", type=int, default=1, help="REST server processes")
    ap.add_argument("--max-batch-size", type=int, default=8,
                    help="rows gathered from concurrent requests into one model call")
    ap.add_argument("--max-batch-delay", type=float, default=5.0,
                    help="ms to wait for more requests once one has arrived")
    ap.add_argument("--max-instances", type=int, default=DEFAULT_MAX_INSTANCES,
                    help="images allowed in one request")
    ap.add_argument("--prepare-threads", type=int, default=DEFAULT_PREPARE_THREADS,
                    help="threads decoding and preparing requests beside the model thread")
    ap.add_argument("--backend", choices=BACKENDS, default=None,
                    help="what runs the model: torch, or onnxruntime over the folder's "
                         "model.cam.onnx (default: the folder's handler.backend)")
    ap.add_argument("--no-ui", action="store_true",
                    help="no viewer page at GET / (it calls this predictor's own v1 routes; "
                         "see docs/kserve.md)")
    return ap


def check_args(args: argparse.Namespace) -> Optional[str]:
    """What is wrong with parsed arguments (naming the flag and what is allowed), else None."""
    if not (args.model_dir / "model-config.yaml").is_file():
        return f"{str(args.model_dir)!r} is not a model folder (no model-config.yaml)"
    name = model_name(args)
    if not MODEL_NAME.fullmatch(name):
        flag = "--model-name" if args.model_name else "the folder name (set --model-name)"
        return (f"invalid value for {flag}: {name[:100]!r} (letters, digits, '.', '_', '-', "
                f"at most 128; it goes in the routes)")
    if not 1 <= args.http_port <= 65535:
        return f"invalid value for --http-port: {args.http_port} (1..65535)"
    if not 0 <= args.grpc_port <= 65535:
        return f"invalid value for --grpc-port: {args.grpc_port} (0..65535; 0 turns gRPC off)"
    for flag in ("workers", "max_batch_size", "max_instances", "prepare_threads"):
        if getattr(args, flag) < 1:
            value = getattr(args, flag)
            return f"invalid value for --{flag.replace('_', '-')}: {value} (at least 1)"
    if not args.max_batch_delay >= 0:
        return f"invalid value for --max-batch-delay: {args.max_batch_delay} (at least 0)"
    return None


def model_name(args: argparse.Namespace) -> str:
    """``--model-name``, else the model folder's name."""
    return args.model_name or args.model_dir.resolve().name


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Serve a model folder with KServe's ModelServer until stopped (SIGTERM/SIGINT)."""
    args = build_parser().parse_args(argv)
    error = check_args(args)
    if error is not None:
        print(f"error: {error}", file=sys.stderr)
        return 2
    from .model import CamModel
    from .server import serve

    model = CamModel(model_name(args), args.model_dir, max_batch_size=args.max_batch_size,
                     max_batch_delay_ms=args.max_batch_delay, max_instances=args.max_instances,
                     prepare_threads=args.prepare_threads, backend=args.backend,
                     workers=args.workers, ui=not args.no_ui)
    model.load()
    serve(model, host=args.host, http_port=args.http_port, grpc_port=args.grpc_port,
          workers=args.workers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
