"""The architecture zoo: torchvision classifiers with fixed-seed random weights (BatchNorm
calibrated), two target layers each (the last stage and an earlier one), small inputs. The
contract tests run over :data:`ARCHS`; :func:`export_zoo` exports and verifies each one as an ONNX
CAM graph (the zoo tests check the results, ``python -m bench.onnx_parity`` reports them).

Example::

    >>> ARCH_BY_NAME["swin_t"].layout, len(ARCHS) > 10
    ('nhwc', True)
"""
from __future__ import annotations

import multiprocessing as mp
import os
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional

import torch
import torchvision.models as tvm
from torch import nn

from .nets import calibrate_bn

NUM_CLASSES = 10


@dataclass(frozen=True)
class Arch:
    name: str
    layers: tuple[str, str]
    size: int = 64
    layout: Optional[str] = None  # None: NCHW conv maps
    kwargs: tuple = ()

    def build(self, dtype: torch.dtype = torch.float64) -> nn.Module:
        torch.manual_seed(0)
        model = tvm.get_model(self.name, weights=None, num_classes=NUM_CLASSES, **dict(self.kwargs))
        for m in model.modules():  # ViT zero-initialises its head: every gradient would be 0
            if isinstance(m, nn.Linear) and not m.weight.any():
                nn.init.normal_(m.weight, std=0.02)
        calibrate_bn(model, self.size)  # 3 batches of 4, seed 123
        return model.to(dtype).eval()

    def input(self, batch: int, dtype: torch.dtype = torch.float64, seed: int = 1) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return torch.randn(batch, 3, self.size, self.size, generator=g).to(dtype)


ARCHS: list[Arch] = [
    Arch("resnet18", ("layer4", "layer3")),
    Arch("resnet50", ("layer4", "layer3")),
    Arch("vgg11_bn", ("features.27", "features.14")),
    Arch("densenet121", ("features.denseblock4", "features.denseblock3")),
    Arch("mobilenet_v2", ("features.18", "features.14")),
    Arch("mobilenet_v3_small", ("features.12", "features.8")),
    Arch("efficientnet_b0", ("features.8", "features.5")),
    Arch("regnet_y_400mf", ("trunk_output.block4", "trunk_output.block3")),
    Arch("convnext_tiny", ("features.7", "features.5")),
    Arch("shufflenet_v2_x1_0", ("conv5", "stage3")),
    Arch("googlenet", ("inception5b", "inception4e"),
         kwargs=(("aux_logits", False), ("init_weights", True))),
    Arch("mnasnet0_5", ("layers.16", "layers.11")),
    Arch("vit_b_16", ("encoder.layers.encoder_layer_11.ln_1", "encoder.layers.encoder_layer_8.ln_1"),
         layout="tokens", kwargs=(("image_size", 64),)),
    Arch("swin_t", ("features.7", "features.5"), layout="nhwc"),
]

ARCH_BY_NAME = {a.name: a for a in ARCHS}


def reshape_for_reference(layout: Optional[str]):
    """The reshape_transform pytorch-grad-cam needs for the layout (None for NCHW)."""
    if layout == "tokens":
        def tokens(t: torch.Tensor) -> torch.Tensor:
            b, n, c = t.shape
            side = int((n - 1) ** 0.5)
            return t[:, 1:, :].reshape(b, side, side, c).permute(0, 3, 1, 2)
        return tokens
    if layout == "nhwc":
        return lambda t: t.permute(0, 3, 1, 2)
    return None


#: Heaviest first, so a pool of workers finishes early (DenseNet, ViT, Swin take a minute each).
HEAVY_FIRST = ["densenet121", "swin_t", "vit_b_16", "vgg11_bn", "resnet50", "convnext_tiny",
               "regnet_y_400mf", "efficientnet_b0", "mobilenet_v2", "googlenet", "mobilenet_v3_small",
               "shufflenet_v2_x1_0", "mnasnet0_5", "resnet18"]


def export_arch(job: tuple[str, str]) -> list[dict[str, Any]]:
    """Build one architecture (``job = (name, out_dir)``) and export + verify each of its layers
    with :func:`camserve.onnx.export.export_cam_onnx` (gradcam, one thread). One row per layer:
    ``key`` (``name-layer``), ``errors`` and ``baseline`` (relative errors of the graph and of
    PyTorch float32 against float64, per target case and output), ``exporter``, ``redrawn``,
    ``timings``, ``logits_std``, ``seconds``; or ``failure`` (the traceback) where it failed.
    Needs the ``onnx`` extra; a pool worker (module-level, picklable)."""
    from camserve.models import ModelSpec, from_module
    from camserve.onnx.export import export_cam_onnx

    name, out_dir = job
    torch.set_num_threads(1)
    arch = ARCH_BY_NAME[name]
    model = arch.build(torch.float32)
    for p in model.parameters():
        p.requires_grad_(False)
    results = []
    for layer in arch.layers:
        t0 = time.perf_counter()
        row: dict[str, Any] = {"key": f"{name}-{layer}"}
        try:
            spec = ModelSpec(arch=name, input_size=(arch.size, arch.size), target_layer=layer,
                             layout=arch.layout)
            src = from_module(model, spec, labels=[str(i) for i in range(NUM_CLASSES)])
            path = Path(out_dir) / f"{name}-{layer}.onnx"
            info = export_cam_onnx(src, path, methods=("gradcam",), threads=1)
            probe = torch.randn(2, 3, arch.size, arch.size, generator=torch.Generator().manual_seed(9))
            with torch.inference_mode():
                logits_std = float(model(probe).std())
            row.update(errors=info.errors, baseline=info.baseline, exporter=info.exporter,
                       redrawn=info.redrawn, timings=info.timings, logits_std=logits_std)
            path.unlink()
        except Exception:  # noqa: BLE001 - reported by whoever reads the row
            row["failure"] = traceback.format_exc()
        row["seconds"] = time.perf_counter() - t0
        results.append(row)
    return results


def export_zoo(names: Iterable[str], out_dir: str | Path, workers: Optional[int] = None
               ) -> dict[str, dict[str, Any]]:
    """:func:`export_arch` for each of ``names`` in a pool of single-threaded worker processes
    (``workers``: default up to 4, one per CPU), heaviest first; the rows by key."""
    names = sorted(set(names), key=lambda n: HEAVY_FIRST.index(n) if n in HEAVY_FIRST
                   else len(HEAVY_FIRST))
    workers = workers or max(1, min(4, os.cpu_count() or 1))
    results: dict[str, dict[str, Any]] = {}
    pool = mp.get_context("spawn").Pool(workers, maxtasksperchild=4)
    try:
        for rows in pool.imap_unordered(export_arch, [(n, str(out_dir)) for n in names]):
            results.update({r["key"]: r for r in rows})
        pool.close()
    except BaseException:
        pool.terminate()
        raise
    finally:
        pool.join()
    return results
