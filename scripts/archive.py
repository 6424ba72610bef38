"""Build ``model_store/NAME.mar`` for any model folder: ``python -m scripts.archive MODEL_DIR``.

    python -m scripts.archive models/shapes                     # model_store/shapes.mar
    python -m scripts.archive models/pets --name pets --out model_store
    python -m scripts.archive models/pets --list                # show what goes in, build nothing
    python -m scripts.archive models/shapes --backend onnxruntime   # serve the CAM graph

The backend is the folder's ``handler.backend`` unless ``--backend`` says otherwise. For
``onnxruntime`` the archive holds the config (with ``backend: onnxruntime``), the labels and the
folder's CAM graph ``model.cam.onnx`` as the serialized file — no model code, no weights: the
worker needs neither. The graph is exported (and verified against the PyTorch engine) into the
folder first when the folder has none, or when it is older than the weights, model code or labels
it was made from, or no longer fits the folder's ``handler:`` block (``--methods``: the methods
it carries; default every method a graph can carry).

For ``torch`` the archive holds exactly what the folder's ``handler.arch`` needs and nothing else:
``model-config.yaml``; the weights (``handler.weights``, as the serialized file); the labels
(``handler.labels``, else ``index_to_name.json`` when present); for ``FILE:Class`` the model file
``FILE.py``; for ``hf:SUB`` the Hugging Face files of ``SUB/`` (``config.json``, ``*.safetensors``
and its index, ``preprocessor_config.json``) under the same relative path; for ``yolo:FILE`` the
model ``.yaml`` or ``.pt``. Relative paths inside
the folder are kept (TorchServe extracts the archive into one folder, the handler loads it with
``camserve.models.load_model_dir``). Exit status: 0 built, 2 usage or folder problem, 1 the
archiver failed.
"""
from __future__ import annotations

import argparse
import logging
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml

from camserve.backends import GRAPH_FILE
from camserve.models import BACKENDS, ConfigError

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
HANDLER = ROOT / "handler" / "gradcam_handler.py"
CONFIG = "model-config.yaml"
LABELS_FILE = "index_to_name.json"
HF_FILES = ("config.json", "preprocessor_config.json", "model.safetensors.index.json")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class ArchiveError(ValueError):
    """A model folder that cannot be archived; the message says what is missing or wrong."""


@dataclass
class ArchivePlan:
    """What goes into the archive: ``serialized`` (weights, the CAM graph, or None),
    ``model_file`` (``FILE.py`` at the archive root or None) and ``extra``: (source path, path
    inside the archive); ``backend`` the one it is served with, ``sources`` the folder's files
    the model is made from (what an exported graph must not be older than)."""

    folder: Path
    config: Path
    serialized: Optional[Path] = None
    model_file: Optional[Path] = None
    extra: list[tuple[Path, str]] = field(default_factory=list)
    backend: str = "torch"
    sources: list[Path] = field(default_factory=list)
    labels: Optional[tuple[Path, str]] = None

    def members(self) -> list[str]:
        """Archive paths of the folder's files (besides the handler and the manifest)."""
        out = [CONFIG]
        if self.serialized is not None:
            out.append(self.serialized.name)
        if self.model_file is not None:
            out.append(self.model_file.name)
        return out + [rel for _, rel in self.extra]


def _inside(folder: Path, rel: str, key: str) -> Path:
    path = (folder / rel).resolve()
    if folder.resolve() not in path.parents and path != folder.resolve():
        raise ArchiveError(f"handler.{key}: {rel[:100]!r} lies outside {folder}")
    return path


def _config(folder: Path) -> tuple[Path, dict[str, Any]]:
    cfg_path = folder / CONFIG
    if not cfg_path.is_file():
        raise ArchiveError(f"{cfg_path} not found (a model folder needs model-config.yaml; "
                           f"`python -m camserve.scaffold {folder} --arch ...` writes one)")
    try:
        doc: Any = yaml.safe_load(cfg_path.read_text())
    except yaml.YAMLError as e:
        raise ArchiveError(f"{cfg_path} is not valid YAML: {str(e)[:200]}") from None
    handler = doc.get("handler") if isinstance(doc, dict) else None
    if not isinstance(handler, dict) or not isinstance(handler.get("arch"), str):
        raise ArchiveError(f"{cfg_path} needs a handler block with arch")
    return cfg_path, doc


def plan_archive(folder: str | Path, backend: Optional[str] = None) -> ArchivePlan:
    """Read ``folder/model-config.yaml`` and list the files its ``arch`` needs (``backend``:
    default the folder's ``handler.backend``; for ``onnxruntime`` the graph and the labels)."""
    folder = Path(folder)
    cfg_path, doc = _config(folder)
    handler = doc["handler"]
    backend = str(backend or handler.get("backend") or "torch").strip().lower()
    if backend not in BACKENDS:
        raise ArchiveError(f"invalid value for --backend: {backend[:100]!r} (known: "
                           f"{', '.join(BACKENDS)})")
    plan = _torch_plan(folder, cfg_path, handler)
    if backend == "torch":
        return plan
    return ArchivePlan(folder=folder, config=cfg_path, serialized=folder / GRAPH_FILE,
                       extra=[plan.labels] if plan.labels else [], backend=backend,
                       sources=plan.sources, labels=plan.labels)


def _torch_plan(folder: Path, cfg_path: Path, handler: dict[str, Any]) -> ArchivePlan:
    """The torch backend's files; ``sources``: the weights, model code and labels among them."""
    arch: str = handler["arch"].strip()
    plan = ArchivePlan(folder=folder, config=cfg_path)
    weights = handler.get("weights")
    if weights:
        w = _inside(folder, str(weights), "weights")
        if not w.is_file():
            raise ArchiveError(f"handler.weights: {str(weights)[:100]!r} not found in {folder}")
        if Path(str(weights)).name != str(weights):
            raise ArchiveError(f"handler.weights: {str(weights)[:100]!r} must be a file at the top "
                               f"of the folder (TorchServe stores the serialized file there)")
        plan.serialized = w
    labels = handler.get("labels") or (LABELS_FILE if (folder / LABELS_FILE).is_file() else None)
    if labels:
        lab = _inside(folder, str(labels), "labels")
        if not lab.is_file():
            raise ArchiveError(f"handler.labels: {str(labels)[:100]!r} not found in {folder}")
        plan.labels = (lab, str(labels))
        plan.extra.append(plan.labels)
    if arch.startswith("hf:"):
        sub = arch[3:].strip("/")
        hf = _inside(folder, sub or ".", "arch")
        if not (hf / "config.json").is_file():
            raise ArchiveError(f"handler.arch {arch[:100]!r}: no config.json in {hf}")
        weights_files = sorted(hf.glob("*.safetensors"))
        if not weights_files:
            raise ArchiveError(f"handler.arch {arch[:100]!r}: no *.safetensors in {hf} "
                               f"(save with save_pretrained(..., safe_serialization=True))")
        prefix = f"{sub}/" if sub else ""
        for f in [hf / n for n in HF_FILES if (hf / n).is_file()] + weights_files:
            plan.extra.append((f, prefix + f.name))
    elif arch.startswith("yolo:"):
        rel = arch[5:].strip()
        src = _inside(folder, rel, "arch")
        if not src.is_file():
            raise ArchiveError(f"handler.arch {arch[:100]!r}: {rel[:100]!r} not found in {folder} "
                               f"(a model .yaml or an Ultralytics .pt inside the folder)")
        plan.extra.append((src, rel))
    elif ":" in arch:
        mod = arch.partition(":")[0]
        file = folder / (mod.replace(".", "/") + ".py")
        if file.is_file():
            if "." in mod:
                plan.extra.append((file, mod.replace(".", "/") + ".py"))
            else:
                plan.model_file = file
        # else: an importable package.module:Class; the server's environment must have it
    plan.sources = [p for p in (plan.serialized, plan.model_file) if p is not None] + \
        [p for p, _ in plan.extra]
    return plan


def stale_graph(plan: ArchivePlan) -> Optional[str]:
    """Why the folder's CAM graph must be exported (again), or None when it is current: missing,
    older than a file it is made from, or contradicting the folder's ``handler:`` block."""
    graph = plan.folder / GRAPH_FILE
    if not graph.is_file():
        return f"the folder has no {GRAPH_FILE}"
    newer = [p.name for p in plan.sources if p.stat().st_mtime > graph.stat().st_mtime]
    if newer:
        return f"{GRAPH_FILE} is older than {newer[0]}"
    from camserve.backends import load_backend
    from camserve.models import ConfigError, spec_of_dir

    try:
        load_backend(spec_of_dir(plan.folder, {"backend": "onnxruntime"}), plan.folder, threads=1)
    except ConfigError as exc:
        return str(exc)
    return None


def export_graph(folder: Path, methods: Optional[Sequence[str]] = None,
                 verify: bool = True) -> Path:
    """Export (and verify) the folder's model to ``folder/model.cam.onnx`` with ``methods``
    (default: every method a graph can carry)."""
    from camserve.methods import available_methods
    from camserve.models import load_model_dir
    from camserve.onnx.export import export_cam_onnx

    loaded = load_model_dir(folder, overrides={"backend": "torch"})
    return export_cam_onnx(loaded, folder / GRAPH_FILE, verify=verify,
                           methods=tuple(methods or available_methods(exportable=True))).path


def _archiver() -> str:
    local = Path(sys.executable).parent / "torch-model-archiver"
    found = str(local) if local.is_file() else shutil.which("torch-model-archiver")
    if not found:
        raise ArchiveError("torch-model-archiver not found: `make install` (extra 'serve') "
                           "installs it")
    return found


def build_archive(folder: str | Path, name: Optional[str] = None, out: str | Path = "model_store",
                  handler: Path = HANDLER, timeout: float = 600, backend: Optional[str] = None,
                  methods: Optional[Sequence[str]] = None) -> Path:
    """Build ``out/NAME.mar`` for ``folder`` (see the module docstring); returns its path.
    ``backend``: default the folder's; ``methods``: a graph exported for onnxruntime carries."""
    plan = plan_archive(folder, backend)
    name = name or Path(folder).resolve().name
    if not NAME_RE.match(name):
        raise ArchiveError(f"--name {name[:80]!r}: letters, digits, '_', '-', '.' (at most 64)")
    if plan.backend == "onnxruntime":
        why = stale_graph(plan)
        if why:
            log.info("exporting %s: %s", plan.folder / GRAPH_FILE, why)
            export_graph(plan.folder, methods)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="camserve-archive-") as tmp:
        config = plan.config
        if plan.backend != "torch":  # the archive's config names the backend it serves with
            _, doc = _config(plan.folder)
            doc["handler"]["backend"] = plan.backend
            config = Path(tmp) / CONFIG
            config.write_text(yaml.safe_dump(doc, sort_keys=False))
        cmd = [_archiver(), "--model-name", name, "--version", "1.0", "--handler", str(handler),
               "--config-file", str(config), "--export-path", str(out), "--force"]
        if plan.serialized is not None:
            cmd += ["--serialized-file", str(plan.serialized)]
        if plan.model_file is not None:
            cmd += ["--model-file", str(plan.model_file)]
        if plan.extra:
            # the archiver copies a folder's *contents*: stage the files under their relative paths
            stage = Path(tmp) / "extra"
            for src, rel in plan.extra:
                dst = stage / rel
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dst)
            cmd += ["--extra-files", str(stage)]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if res.returncode != 0:
            raise RuntimeError(f"torch-model-archiver failed ({res.returncode}): "
                               f"{(res.stderr or res.stdout).strip()[-800:]}")
    return out / f"{name}.mar"


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m scripts.archive",
                                description="Build NAME.mar for a camserve model folder.")
    p.add_argument("model_dir")
    p.add_argument("--name", help="archive/model name (default: the folder's name)")
    p.add_argument("--out", default="model_store", help="output folder (default: model_store)")
    p.add_argument("--list", action="store_true", help="print the archive's files; build nothing")
    p.add_argument("--backend", choices=BACKENDS,
                   help="serve with this backend (default: the folder's handler.backend)")
    p.add_argument("--methods", help="comma-separated methods of an exported graph (default: "
                                     "every method a graph can carry)")
    try:
        args = p.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    methods = [m for m in (args.methods or "").split(",") if m.strip()] or None
    try:
        if args.list:
            for member in plan_archive(args.model_dir, args.backend).members():
                print(member)
            return 0
        path = build_archive(args.model_dir, args.name, args.out, backend=args.backend,
                             methods=methods)
    except (ArchiveError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
