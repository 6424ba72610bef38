"""The installed core: importing camserve (engine, serving) loads none of the extras."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXTRAS = ("onnx", "onnxruntime", "onnxscript", "onnx_ir", "ts")


def test_core_imports_no_extras() -> None:
    code = ("import json, sys; import camserve, camserve.engine, camserve.serving; "
            "print(json.dumps(sorted(m for m in sys.modules)))")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=str(ROOT), timeout=120, check=True).stdout
    loaded = set(json.loads(out.strip().splitlines()[-1]))
    assert "camserve.serving" in loaded
    bad = sorted(m for m in loaded if m.split(".")[0] in EXTRAS)
    assert not bad, f"the core imports extras: {bad[:10]}"


def test_onnx_package_import_is_light() -> None:
    code = ("import json, sys; import camserve.onnx; "
            "print(json.dumps(sorted(m for m in sys.modules)))")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=str(ROOT), timeout=120, check=True).stdout
    loaded = set(json.loads(out.strip().splitlines()[-1]))
    assert not [m for m in loaded if m.split(".")[0] in ("onnx", "onnxruntime", "onnxscript")]
