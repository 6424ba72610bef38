"""Write the storage layout KServe's TorchServe runtime expects for a camserve model folder.

    python scripts/kserve_layout.py MODEL_DIR [--name NAME] [--out build/kserve]
    make kserve-layout MODEL=models/shapes [NAME=shapes]

writes ``OUT/NAME/config/config.properties`` and ``OUT/NAME/model-store/NAME.mar`` and prints
``OUT/NAME``. Upload that folder to the InferenceService's ``storageUri``: KServe mounts it at
/mnt/models and its runtime starts
``torchserve --start --model-store=/mnt/models/model-store --ts-config=/mnt/models/config/config.properties``.

Choices written into config.properties (each also explained there, and in deploy/README.md):

* ``enable_envvars_config=false`` and no ``service_envelope``: the runtime sets
  ``TS_SERVICE_ENVELOPE`` (kserve / kservev2) from the protocol, and TorchServe applies it only
  when env-var config is on. Off, the KServe routes hand the request body to the camserve handler
  unchanged, and the handler's own envelope parsing reads KServe v1 (one instance) and v2 (one
  BYTES input named ``data`` plus request ``parameters``) bodies. TorchServe 0.12's envelopes
  would not do: ``kserve`` reads only the first request of a server-side batch (with
  ``batchSize`` > 1 the other requests lose their data) and wraps the handler's JSON as strings;
  ``kservev2`` drops request ``parameters`` and passes tensor metadata as options.
* token authorization off (``disable_token_authorization=true``) — for this layout only: on
  KServe the ingress / service mesh (Istio AuthorizationPolicy, Knative/Gateway auth) carries
  authentication, and keys written to a pod's local key file cannot be handed to clients.
  camserve's own ``config.properties`` for ``make serve`` keeps token auth on.
* inference on 0.0.0.0:8080 (KServe's container port) and metrics on 0.0.0.0:8082 (Prometheus
  scrape); the management API on 127.0.0.1:8081 and gRPC on loopback (KServe does not use them,
  and with token auth off they must not be reachable from the pod network); model API off;
  archives only from local files.
* ``model_snapshot`` registers NAME.mar at start with the workers and batching of the model
  folder's ``model-config.yaml`` (minWorkers, maxWorkers, batchSize, maxBatchDelay,
  responseTimeout).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import yaml

from camserve.testing.torchserve import archive

ROOT = Path(__file__).resolve().parents[1]

HANDLER = ROOT / "handler" / "gradcam_handler.py"
SNAPSHOT_KEYS = {"minWorkers": 1, "maxWorkers": 1, "batchSize": 1, "maxBatchDelay": 100,
                 "responseTimeout": 120}

PROPERTIES = """\
# TorchServe config for KServe's TorchServe runtime (written by `make kserve-layout`).
# The runtime starts: torchserve --start --model-store=/mnt/models/model-store
#                                --ts-config=/mnt/models/config/config.properties
inference_address=http://0.0.0.0:8080
metrics_address=http://0.0.0.0:8082
# Management API and gRPC: loopback only (KServe uses neither; token auth is off below).
management_address=http://127.0.0.1:8081
grpc_inference_address=127.0.0.1
grpc_inference_port=7070
grpc_management_address=127.0.0.1
grpc_management_port=7071

# Envelope: none. The runtime sets TS_SERVICE_ENVELOPE (kserve/kservev2), which TorchServe applies
# only with enable_envvars_config=true. Off, /v1/models/{name}:predict|:explain and
# /v2/models/{name}/infer hand the body to the camserve handler unchanged; it parses KServe v1
# (one instance) and v2 (BYTES input "data" + parameters) itself, and TorchServe batches
# concurrent requests (0.12's kserve envelope reads only the first request of a batch; its
# kservev2 envelope drops request parameters).
enable_envvars_config=false

# Token authorization OFF, deliberately and for this layout only: on KServe, authentication lives
# in the ingress / service mesh in front of the predictor (see deploy/README.md). `make serve`
# keeps it on.
disable_token_authorization=true
enable_model_api=false
allowed_urls=^file://.*

model_store=/mnt/models/model-store
model_snapshot={snapshot}

max_request_size=52428800
max_response_size=104857600
metrics_mode=prometheus
model_metrics_auto_detect=true
"""


class LayoutError(ValueError):
    """A model folder that cannot be archived; the message names the file or key."""


def _load_config(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "model-config.yaml"
    if not path.is_file():
        raise LayoutError(f"{str(model_dir)!r} is not a model folder: model-config.yaml is missing")
    cfg = yaml.safe_load(path.read_text()) or {}
    if not isinstance(cfg, Mapping) or not isinstance(cfg.get("handler"), Mapping):
        raise LayoutError(f"{path}: expected a mapping with a 'handler:' block")
    return dict(cfg)


def snapshot(name: str, cfg: Mapping[str, Any]) -> dict[str, Any]:
    """TorchServe's ``model_snapshot`` registering ``name.mar`` with ``cfg``'s worker settings.

    Example::

        >>> snapshot("m", {"batchSize": 4})["models"]["m"]["1.0"]["batchSize"]
        4
    """
    entry: dict[str, Any] = {"defaultVersion": True, "marName": f"{name}.mar"}
    for key, default in SNAPSHOT_KEYS.items():
        entry[key] = int(cfg.get(key, default))
    return {"name": "startup.cfg", "modelCount": 1, "models": {name: {"1.0": entry}}}


def write_layout(model_dir: Path, out: Path, name: Optional[str] = None) -> Path:
    """``out/NAME/config/config.properties`` and ``out/NAME/model-store/NAME.mar``; returns
    ``out/NAME``."""
    model_dir = Path(model_dir)
    cfg = _load_config(model_dir)
    name = name or model_dir.resolve().name
    if not name.replace("-", "").replace("_", "").isalnum():
        raise LayoutError(f"invalid value for NAME: {name!r} (letters, digits, '-' and '_')")
    handler = cfg["handler"]
    weights = handler.get("weights")
    if not weights or not (model_dir / weights).is_file():
        raise LayoutError(f"invalid value for handler.weights in {model_dir}/model-config.yaml: "
                          f"{weights!r} is not a file of the folder (the archive needs it)")
    arch = str(handler.get("arch", ""))
    model_file = None
    if ":" in arch and "." not in arch.split(":")[0]:
        model_file = model_dir / f"{arch.split(':')[0]}.py"
        if not model_file.is_file():
            raise LayoutError(f"invalid value for handler.arch: {arch!r} names {model_file.name}, "
                              f"which is missing")
    extra = [p for p in (model_dir / "index_to_name.json",) if p.is_file()]
    labels = handler.get("labels")
    if isinstance(labels, str) and (model_dir / labels).is_file() and model_dir / labels not in extra:
        extra.append(model_dir / labels)
    root = Path(out) / name
    if root.exists():
        shutil.rmtree(root)
    (root / "config").mkdir(parents=True)
    archive(root / "model-store", name, str(HANDLER), model_dir / weights, cfg, model_file, extra)
    (root / f"{name}-config.yaml").unlink(missing_ok=True)  # archive()'s scratch copy
    text = PROPERTIES.replace("{snapshot}", json.dumps(snapshot(name, cfg), separators=(",", ":")))
    (root / "config" / "config.properties").write_text(text)
    return root


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--name", default=None, help="model name (default: the folder's name)")
    ap.add_argument("--out", type=Path, default=ROOT / "build" / "kserve")
    args = ap.parse_args(argv)
    try:
        root = write_layout(args.model_dir, args.out, args.name or None)
    except LayoutError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
