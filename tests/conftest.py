"""Shared fixtures and the test tiers.

Tiers (markers registered in pyproject.toml): ``zoo`` (model-zoo sweeps), ``torchserve`` (starts a
real TorchServe), ``train`` (runs a training job), ``slow`` (anything else over a few seconds).
``make test-fast`` deselects the four; ``make test`` runs everything. Every test has a timeout
(pytest-timeout, counting its fixtures' setup): ``timeout`` in pyproject (600 s) for the
``torchserve``, ``train`` and ``slow`` tiers, :data:`ZOO_TIMEOUT` for ``zoo`` (a module fixture
may export the whole zoo inside its first test), :data:`FAST_TIMEOUT` for the rest, unless a test
sets its own ``@pytest.mark.timeout``.

Zoo sweeps: a test parametrized over the architectures of :mod:`camserve.testing.zoo` (an ``arch`` argument)
is marked ``zoo`` here for every architecture but those in :data:`FAST_ARCHS` (resnet18), which
stay in the fast tier; the test files need no per-case marks.

TorchServe: every test marked ``torchserve`` is skipped when Java is missing (and only then);
``start_torchserve`` is the one way a test starts a :class:`camserve.testing.torchserve.LocalTorchServe`.

Threads: the tests run torch with :data:`TEST_THREADS` (1) intra-op threads, and the processes they
start inherit ``OMP_NUM_THREADS`` (unless it is set).

Fixtures:

* ``repo_root``, ``shapes_dir`` (models/shapes), ``shapes_samples``, ``handler_file``;
* ``image_bytes`` (any format), ``png``, ``jpeg``: encoded test images (flat colour, seeded noise,
  or a given PIL image); ``image_file``: the same written to a file; ``open_image`` /
  ``decode_png``: bytes or base64 text back to an image / array;
* ``tiny_net`` (frozen :class:`camserve.testing.nets.TinyNet`, 6 classes), ``tiny_bn_net``
  (random networks get BatchNorm statistics from :func:`camserve.testing.nets.calibrate_bn`);
  ``json_lines`` (a .jsonl file's objects);
* ``model_folder``: a factory writing a model folder (model-config.yaml, weights, labels, model.py)
  under ``tmp_path``; ``shapes_folder``: the same for a randomly initialised ShapesNet with the
  shapes config (overridable handler keys); ``shapes_config``: that config as a dict;
* ``fake_context``: a factory of :class:`camserve.testing.context.FakeContext`;
* ``start_torchserve``: ``with start_torchserve(LocalTorchServe(...)) as ts:`` starts a private
  TorchServe or fails the test with its logs, and stops it;
* ``chromium``: a headless Chromium (:class:`camserve.testing.browser.Chromium`) for a module, whose
  pages record their Content-Security-Policy violations in ``window.__csp`` (an injected inline
  script or handler would be one); the ``browser`` tier, skipped with the reason when no
  Chromium is installed.
"""
from __future__ import annotations

import base64
import functools
import importlib.util
import io
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Iterator, Mapping, Optional, Sequence

import numpy as np
import pytest
import torch
from PIL import Image

from camserve.testing.context import FakeContext
from camserve.testing.nets import TinyBNNet, TinyNet, frozen, model_source, write_model_folder

if TYPE_CHECKING:
    from camserve.testing.torchserve import LocalTorchServe

ROOT = Path(__file__).resolve().parents[1]
SHAPES_DIR = ROOT / "models" / "shapes"
SHAPES_LABELS = ("circle", "square", "triangle", "star", "cross", "ring", "diamond", "hexagon")
TIERS = ("zoo", "torchserve", "train", "slow")
FAST_TIMEOUT = 120  # s per test outside the heavy tiers (the whole fast tier runs in < 2 min)
ZOO_TIMEOUT = 1800  # s: the first test of a zoo module may pay for exporting every architecture
#: A test parametrized over the zoo architectures (camserve.testing.zoo) runs these in the fast tier and
#: every other architecture in the ``zoo`` tier, so each contract keeps a fast instance.
FAST_ARCHS = frozenset({"resnet18"})
#: TorchServe's frontend is Java: without it the ``torchserve`` tests are skipped (and only then).
JAVA = shutil.which("java") is not None or bool(os.environ.get("JAVA_HOME"))
NO_JAVA = "Java is not installed: TorchServe's frontend needs Java 17+"


#: torch's intra-op threads in the test process, and ``OMP_NUM_THREADS`` of the processes the tests
#: start unless it is set: on a small shared machine a pool of spinning threads about doubles the
#: suite's CPU time (and its wall time) for no gain. ``CAMSERVE_TEST_THREADS`` changes it.
TEST_THREADS = int(os.environ.get("CAMSERVE_TEST_THREADS", "1"))
torch.set_num_threads(TEST_THREADS)
os.environ.setdefault("OMP_NUM_THREADS", str(TEST_THREADS))


def _zoo_arch(item: pytest.Item) -> Optional[str]:
    """The architecture a test is parametrized over (an ``arch`` argument holding a
    :class:`camserve.testing.zoo.Arch` or the name of one), else None."""
    params = getattr(getattr(item, "callspec", None), "params", {})
    arch = params.get("arch")
    name = getattr(arch, "name", arch)
    if isinstance(name, str):
        from camserve.testing.zoo import ARCH_BY_NAME

        return name if name in ARCH_BY_NAME else None
    return None


@pytest.hookimpl(tryfirst=True)  # before ``-m`` deselects: the zoo marks below must count
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Zoo sweeps, the Java skip and per-tier timeouts (see the module docstring); a test's own
    ``timeout`` mark wins."""
    for item in items:
        arch = _zoo_arch(item)
        if arch is not None and arch not in FAST_ARCHS:
            item.add_marker(pytest.mark.zoo)
        if not JAVA and item.get_closest_marker("torchserve"):
            item.add_marker(pytest.mark.skip(reason=NO_JAVA))
        if item.get_closest_marker("timeout") is not None:
            continue
        if item.get_closest_marker("zoo"):
            item.add_marker(pytest.mark.timeout(ZOO_TIMEOUT))
        elif not any(item.get_closest_marker(t) for t in TIERS):
            item.add_marker(pytest.mark.timeout(FAST_TIMEOUT))


# -- commands ---------------------------------------------------------------------------------------

def run_command(*args: str, timeout: float = 900) -> str:
    """A console script (``camserve-...``, from this interpreter's folder) or ``python -m ...`` in a
    subprocess from the checkout's root, the checkout first on the path; the test fails with its
    output when the exit status is not 0. Returns its stdout."""
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = ([str(Path(sys.executable).parent / args[0]), *args[1:]] if args[0].startswith("camserve-")
           else [sys.executable, *args])
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if res.returncode != 0:
        pytest.fail(f"{' '.join(args[:3])} ... exit {res.returncode}:\n{res.stdout[-3000:]}\n"
                    f"{res.stderr[-3000:]}", pytrace=False)
    return res.stdout


# -- paths ------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The checkout's root folder."""
    return ROOT


@pytest.fixture(scope="session")
def shapes_dir() -> Path:
    """The committed default model folder, models/shapes."""
    return SHAPES_DIR


@pytest.fixture(scope="session")
def shapes_samples() -> Path:
    """models/shapes/samples: one PNG per class and boxes.json."""
    return SHAPES_DIR / "samples"


@pytest.fixture(scope="session")
def handler_file() -> Path:
    """handler/gradcam_handler.py (load it with :func:`camserve.testing.handler.load_handler`)."""
    return ROOT / "handler" / "gradcam_handler.py"


# -- images -----------------------------------------------------------------------------------------

def encode_image(image: Optional[Image.Image] = None, *, fmt: str = "PNG",
                 size: tuple[int, int] = (48, 40), color: Any = (200, 30, 30),
                 seed: Optional[int] = None, mode: str = "RGB", **save_kw: Any) -> bytes:
    """Encoded image bytes: ``image`` as given, else seeded uniform noise (``seed``), else a flat
    ``color``; ``size`` is (W, H); ``mode`` converts before saving; ``save_kw`` go to
    ``Image.save`` (e.g. ``exif=...``, ``quality=...``)."""
    if image is None:
        if seed is not None:
            arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            image = Image.fromarray(arr, "RGB")
        else:
            image = Image.new("RGB", size, color)
        if mode != "RGB":
            image = image.convert(mode)
    buf = io.BytesIO()
    image.save(buf, format=fmt, **save_kw)
    return buf.getvalue()


def _open(data: bytes | str) -> Image.Image:
    raw = base64.b64decode(data) if isinstance(data, str) else data
    img = Image.open(io.BytesIO(raw))
    img.load()
    return img


@pytest.fixture(scope="session")
def image_bytes() -> Callable[..., bytes]:
    """``image_bytes(image=None, *, fmt="PNG", size=(W, H), color=..., seed=None, mode="RGB",
    **save_kw) -> bytes``."""
    return encode_image


@pytest.fixture(scope="session")
def png() -> Callable[..., bytes]:
    """PNG bytes: ``png(seed=3, size=(96, 96))``, ``png(color=(0, 0, 255))``, ``png(img)``."""
    return functools.partial(encode_image, fmt="PNG")


@pytest.fixture(scope="session")
def jpeg() -> Callable[..., bytes]:
    """JPEG bytes, as :func:`png`."""
    return functools.partial(encode_image, fmt="JPEG")


_FORMATS = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".bmp": "BMP", ".gif": "GIF",
            ".webp": "WEBP", ".tif": "TIFF", ".tiff": "TIFF"}


@pytest.fixture(scope="session")
def image_file() -> Callable[..., Path]:
    """``image_file(path, *, size=(W, H), seed=0, mode="RGB", fmt=None, **kw) -> path``: an
    encoded image written to ``path`` (parents created; the format from the suffix unless
    ``fmt``); the content as :func:`image_bytes` (seeded noise by default)."""
    def write(path: Path, *, fmt: Optional[str] = None, seed: Optional[int] = 0, **kw: Any) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encode_image(fmt=fmt or _FORMATS.get(path.suffix.lower(), "PNG"),
                                      seed=seed, **kw))
        return path
    return write


@pytest.fixture(scope="session")
def open_image() -> Callable[[bytes | str], Image.Image]:
    """Encoded bytes, or base64 text as in a JSON answer, -> a loaded PIL image."""
    return _open


@pytest.fixture(scope="session")
def decode_png() -> Callable[[bytes | str], np.ndarray]:
    """Encoded bytes, or base64 text as in a JSON answer (``"heatmap": "iVBOR..."``), -> array."""
    return lambda data: np.asarray(_open(data))


# -- nets -------------------------------------------------------------------------------------------

@pytest.fixture()
def tiny_net() -> TinyNet:
    """A frozen :class:`TinyNet` (6 classes, seed 0, target ``features``, 32×32 input)."""
    return frozen(TinyNet(num_classes=6, seed=0))


@pytest.fixture()
def tiny_bn_net() -> TinyBNNet:
    """A frozen :class:`TinyBNNet` (3 classes, seed 1: the weights ``model_folder()`` writes)."""
    torch.manual_seed(1)
    return frozen(TinyBNNet(3))


# -- model folders ----------------------------------------------------------------------------------

TINY_HANDLER: dict[str, Any] = {
    "arch": "model:TinyBNNet", "num_classes": 3, "weights": "weights.pt",
    "labels": "index_to_name.json", "target_layer": "features.3", "input_size": [40, 32],
    "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "method": "hirescam", "topk": 2}
TINY_LABELS = ("circle", "square", "star")


def shapes_handler(**over: Any) -> dict[str, Any]:
    """The ``handler:`` block of models/shapes/model-config.yaml with ``over`` applied (a value of
    ``None`` removes the key)."""
    handler = {"arch": "model:ShapesNet", "num_classes": 8, "weights": "weights.pt",
               "labels": "index_to_name.json", "target_layer": "features", "input_size": [96, 96],
               "mean": [0.5] * 3, "std": [0.25] * 3, "method": "gradcam", "topk": 3,
               "outputs": ["heatmap", "bbox"]}
    handler.update(over)
    return {k: v for k, v in handler.items() if v is not None}


def _shapes_net(seed: int) -> torch.nn.Module:
    spec = importlib.util.spec_from_file_location("shapes_model_for_tests", SHAPES_DIR / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.manual_seed(seed)
    return module.ShapesNet(num_classes=len(SHAPES_LABELS))


@pytest.fixture()
def model_folder(tmp_path: Path) -> Callable[..., Path]:
    """``model_folder(name="tiny", *, model=None, handler=None, labels=..., model_py=...,
    config=None) -> Path``: a model folder under ``tmp_path``.

    Defaults: a seeded :class:`TinyBNNet` (3 classes) with its source as ``model.py``, labels
    circle/square/star, the handler block :data:`TINY_HANDLER` (target ``features.3``, input
    [40, 32], hirescam, topk 2). Pass ``model=`` (e.g. a torchvision net) with ``model_py=None``
    and a ``handler`` naming its arch for other models; ``labels=None`` writes no labels file.
    """
    def make(name: str = "tiny", *, model: Optional[torch.nn.Module] = None,
             handler: Optional[Mapping[str, Any]] = None,
             labels: Optional[Sequence[str]] = TINY_LABELS,
             model_py: Optional[str] = "default", config: Optional[Mapping[str, Any]] = None) -> Path:
        if model is None:
            torch.manual_seed(1)
            model = TinyBNNet(len(labels) if labels else 3)
        if model_py == "default":
            model_py = model_source(TinyBNNet)
        return write_model_folder(tmp_path / name, model, TINY_HANDLER if handler is None else handler,
                                  labels=labels, model_py=model_py, config=config)
    return make


@pytest.fixture(scope="session")
def shapes_config() -> Callable[..., dict[str, Any]]:
    """``shapes_config(**handler_over) -> dict``: a whole model-config.yaml document for the shapes
    model (``batchSize: 8``, ``maxBatchDelay: 100``, :func:`shapes_handler` with ``handler_over``;
    ``None`` removes a key), e.g. for ``fake_context(folder, model_yaml_config=...)``."""
    return lambda **over: {"batchSize": 8, "maxBatchDelay": 100, "handler": shapes_handler(**over)}


@pytest.fixture(scope="session")
def shapes_folder(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """``shapes_folder(name="shapes", *, seed=0, config=None, **handler_over) -> Path``: a folder
    laid out like the extracted shapes archive (models/shapes/model.py, a randomly initialised
    ShapesNet's weights, labels, ``batchSize: 8``, ``maxBatchDelay: 100`` and
    :func:`shapes_handler` with ``handler_over``). Session-scoped, so module fixtures can share one
    folder; every call writes a fresh folder (``<tmp>/<name>N/<name>``)."""
    def make(name: str = "shapes", *, seed: int = 0, config: Optional[Mapping[str, Any]] = None,
             **handler_over: Any) -> Path:
        top = {"batchSize": 8, "maxBatchDelay": 100, **dict(config or {})}
        folder = tmp_path_factory.mktemp(name) / name
        return write_model_folder(folder, _shapes_net(seed), shapes_handler(**handler_over),
                                  labels=SHAPES_LABELS, model_py=(SHAPES_DIR / "model.py").read_text(),
                                  config=top)
    return make


# -- the fake TorchServe context --------------------------------------------------------------------

@pytest.fixture(scope="session")
def fake_context() -> Callable[..., FakeContext]:
    """``fake_context(model_dir, *, headers=None, **kw) -> FakeContext`` (see
    :class:`camserve.testing.context.FakeContext`; ``model_file`` defaults to ``model.py`` and
    ``serialized_file`` to the CAM graph ``model.cam.onnx`` when the folder has one); ``headers``
    (one mapping per row) starts a batch."""
    def make(model_dir: str | Path, *, headers: Optional[Sequence[Mapping[str, str]]] = None,
             **kw: Any) -> FakeContext:
        if "model_file" not in kw and (Path(model_dir) / "model.py").is_file():
            kw["model_file"] = "model.py"
        if "serialized_file" not in kw and (Path(model_dir) / "model.cam.onnx").is_file():
            kw["serialized_file"] = "model.cam.onnx"
        ctx = FakeContext(model_dir, **kw)
        if headers is not None:
            ctx.set_requests(headers)
        return ctx
    return make


@pytest.fixture(scope="session")
def json_lines() -> Callable[[Path], list[dict]]:
    """``json_lines(path)``: the JSON objects of a ``.jsonl`` file (blank lines skipped)."""
    return lambda path: [json.loads(line) for line in Path(path).read_text().splitlines()
                         if line.strip()]


# -- a real TorchServe ------------------------------------------------------------------------------

@contextmanager
def _started(server: "LocalTorchServe") -> Iterator["LocalTorchServe"]:
    from camserve.client import ClientError

    try:
        server.__enter__()
    except ClientError as exc:  # not ready: the message carries the server's and worker's logs
        pytest.fail(str(exc))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def start_torchserve() -> Callable[["LocalTorchServe"], ContextManager["LocalTorchServe"]]:
    """``with start_torchserve(LocalTorchServe(home, models, ...)) as ts:``: the server started,
    every model READY; a server that does not get ready fails the test (not an error) with the
    tail of its output and worker log; on exit ``torchserve --stop``, then its process group is
    killed (:meth:`camserve.testing.torchserve.LocalTorchServe.stop`)."""
    return _started


# -- the browser tier -----------------------------------------------------------------------------------

#: run in every page before its own scripts: CSP violations are kept in ``window.__csp``
CSP_WATCH = ("window.__csp = []; document.addEventListener('securitypolicyviolation', "
             "(e) => window.__csp.push(e.violatedDirective + ' ' + e.blockedURI));")


@pytest.fixture(scope="module")
def chromium() -> Iterator[Any]:
    from camserve.testing.browser import MISSING, Chromium, find_chromium

    if find_chromium() is None:
        pytest.skip(MISSING)
    pytest.importorskip("websocket", reason="websocket-client (the test extra) is not installed")
    with Chromium(size=(1400, 1000)) as browser:
        browser.call("Page.addScriptToEvaluateOnNewDocument", {"source": CSP_WATCH})
        yield browser


def assert_ran_nothing(b: Any) -> None:
    """No uncaught exception or console error on the page of ``b`` (a ``chromium``), no CSP
    violation (an injected inline script or handler would be one), no dialog, no flag set by an
    injected handler (``window.__pwned``) and no element with an inline handler."""
    b.pump(0.3)
    assert b.problems() == []
    assert b.evaluate("window.__csp") == []
    assert b.events("Page.javascriptDialogOpening") == []
    assert b.evaluate("typeof window.__pwned") == "undefined"
    assert b.evaluate("document.querySelectorAll('[onerror], [onload], [onclick], body script:not([src])')"
                      ".length") == 0
