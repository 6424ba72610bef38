"""pyproject.toml, the Makefile and .ci/run: the installed distribution is camserve alone, the core
needs and imports no extra, every console script names a ``main``, the test tiers are registered."""
from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
EXTRAS = PROJECT["project"]["optional-dependencies"]
EXTRA_MODULES = ("onnx", "onnxruntime", "onnxscript", "onnx_ir", "ts")


def _name(requirement: str) -> str:
    return re.split(r"[\[=<>!~;\s]", requirement, maxsplit=1)[0].lower()


def test_only_the_camserve_package_is_installed() -> None:
    assert PROJECT["tool"]["setuptools"]["packages"]["find"]["include"] == ["camserve*"]


def test_core_dependencies_are_pinned_and_extra_free() -> None:
    deps = PROJECT["project"]["dependencies"]
    assert all("==" in d for d in deps), deps
    names = {_name(d) for d in deps}
    assert {"torch", "torchvision", "pillow", "numpy", "pyyaml"} <= names
    assert not names & {"torchserve", "onnx", "onnxruntime", "onnxscript", "kserve", "ray",
                        "transformers", "timm", "requests", "ultralytics"}


def test_every_extra_is_pinned_and_all_means_all() -> None:
    assert set(EXTRAS) == {"serve", "onnx", "timm", "hf", "ray", "kserve", "yolo", "test", "all"}
    for extra, reqs in EXTRAS.items():
        if extra != "all":
            assert all("==" in r for r in reqs), (extra, reqs)
    [everything] = EXTRAS["all"]
    assert set(everything.split("[", 1)[1].rstrip("]").split(",")) == set(EXTRAS) - {"all"}


@pytest.mark.parametrize("script,target", sorted(PROJECT["project"]["scripts"].items()))
def test_console_script_names_a_main(script: str, target: str) -> None:
    module, _, func = target.partition(":")
    assert script.startswith("camserve-") and module.startswith("camserve.") and func == "main"
    path = ROOT.joinpath(*module.split(".")).with_suffix(".py")
    if not path.is_file():
        pytest.skip(f"{module} is not in this checkout yet")
    pytest.importorskip(module, reason=f"{module} needs an extra that is not installed")
    assert callable(getattr(importlib.import_module(module), func))


def test_the_tiers_are_registered_with_a_timeout() -> None:
    ini = PROJECT["tool"]["pytest"]["ini_options"]
    assert {m.split(":")[0] for m in ini["markers"]} == {"zoo", "torchserve", "train", "slow",
                                                         "browser"}
    assert "--strict-markers" in ini["addopts"] and ini["timeout"] >= 300


def test_make_test_is_the_whole_suite_and_ci_calls_it() -> None:
    make = (ROOT / "Makefile").read_text()
    assert re.search(r"^TEST_PATHS\s*=\s*tests camserve tools --doctest-modules$", make, re.M)
    assert re.search(r"^test: install\n\t\$\(PYTEST\) \$\(TEST_PATHS\)$", make, re.M)
    assert re.search(r'^test-fast: install\n\t\$\(PYTEST\) \$\(TEST_PATHS\) -m "\$\(FAST_MARKS\)"$',
                     make, re.M)
    assert re.search(r"^FAST_MARKS\s*=\s*not zoo and not torchserve and not train and not slow$",
                     make, re.M)
    assert "\nmake test\n" in (ROOT / ".ci" / "run").read_text()


def test_install_stamp_depends_on_pyproject_and_installs_all() -> None:
    make = (ROOT / "Makefile").read_text()
    assert "$(STAMP): pyproject.toml" in make and "-e '.[all]'" in make


def test_no_sys_path_edits() -> None:
    """Shared test tooling lives in camserve.testing; nothing patches sys.path."""
    offenders = {str(p.relative_to(ROOT)) for p in ROOT.rglob("*.py")
                 if ".venv" not in p.parts and p.name != "test_packaging.py"
                 and re.search(r"sys\.path\.(insert|append)|sys\.path\s*(\[[^]]*\])?\s*[+]?=", p.read_text())}
    assert offenders == set()


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
    assert not loaded & set(EXTRA_MODULES), f"the core imports extras: {sorted(loaded & set(EXTRA_MODULES))}"


def test_onnx_package_import_is_light() -> None:
    """``import camserve.onnx`` imports none of its modules (nor onnx/onnxruntime)."""
    assert not _modules_after("camserve.onnx") & set(EXTRA_MODULES)
