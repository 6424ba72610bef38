"""The installed core: importing camserve (engine, serving) loads none of the extras."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXTRAS = ("onnx", "onnxruntime", "onnxscript", "onnx_ir", "ts")


def _modules_after(imports: str) -> set[str]:
    """The top-level names in sys.modules after ``import <imports>`` in a fresh interpreter."""
    code = f"import json, sys; import {imports}; print(json.dumps(sorted(sys.modules)))"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=str(ROOT), timeout=120, check=True).stdout
    return {m.split(".")[0] for m in json.loads(out.strip().splitlines()[-1])}


def test_core_imports_no_extras() -> None:
    loaded = _modules_after("camserve, camserve.engine, camserve.serving")
    assert "camserve" in loaded
    assert not loaded & set(EXTRAS), f"the core imports extras: {sorted(loaded & set(EXTRAS))}"


def test_onnx_package_import_is_light() -> None:
    """``import camserve.onnx`` imports none of its modules (nor onnx/onnxruntime)."""
    assert not _modules_after("camserve.onnx") & set(EXTRAS)
