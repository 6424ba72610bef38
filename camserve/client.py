"""A small client for the camserve TorchServe model: predict, explain, save the overlay.

The token comes from TorchServe's ``key_file.json`` (written in the directory TorchServe was
started from; token authorization is on by default in TorchServe 0.12) and is sent as
``Authorization: Bearer <inference key>``.

The ``camserve-client`` command (manual: README, "Client")::

    camserve-client IMAGE [--explain] [--target 2|triangle] [--method gradcam]
        [--topk 3] [--out overlay.png] [--url http://127.0.0.1:8080] [--model shapes]
        [--key-file key_file.json]

Example (library use)::

    >>> client = CamClient("http://127.0.0.1:8080", token="...")  # doctest: +SKIP
    >>> answer = client.explain(open("cat.png", "rb").read(), target="cat")  # doctest: +SKIP
"""
from __future__ import annotations

import argparse
import base64
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import requests

log = logging.getLogger(__name__)

DEFAULT_URL = "http://127.0.0.1:8080"
DEFAULT_MANAGEMENT_URL = "http://127.0.0.1:8081"
DEFAULT_MODEL = "shapes"
KEY_KINDS: tuple[str, ...] = ("inference", "management", "API")


class ClientError(RuntimeError):
    """A request that failed: the message says what the server answered, ``status`` its code."""

    def __init__(self, message: str, status: Optional[int] = None) -> None:
        super().__init__(message)
        self.status = status


def read_token(key_file: str | Path = "key_file.json", kind: str = "inference") -> str:
    """The ``kind`` key (inference, management or API) from TorchServe's ``key_file.json``."""
    if kind not in KEY_KINDS:
        raise ValueError(f"invalid value for kind: {kind!r} (allowed: {', '.join(KEY_KINDS)})")
    path = Path(key_file)
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise ClientError(f"no token file {str(path)!r}: TorchServe writes key_file.json in the "
                          f"directory it was started from (is it running? `make serve`)") from None
    except json.JSONDecodeError as exc:
        raise ClientError(f"{path} is not JSON: {exc}") from None
    try:
        key = doc[kind]["key"]
    except (KeyError, TypeError):
        keys = ", ".join(doc) if isinstance(doc, dict) else "none"
        raise ClientError(f"{path} has no {kind!r} key (keys: {keys})") from None
    if not isinstance(key, str) or not key:
        raise ClientError(f"{path} has an empty {kind!r} key")
    return key


def wait_until_ready(management_url: str, model: str, token: Callable[[], Optional[str]],
                     timeout: float = 300.0, alive: Optional[Callable[[], bool]] = None,
                     interval: float = 0.5) -> dict[str, Any]:
    """Poll ``GET {management_url}/models/{model}`` until a worker is READY; return its description.

    ``token`` is called on each poll (the key file appears only once the server started);
    ``alive`` (optional) says whether the server process still runs — polling stops early when
    it does not. Raises :class:`ClientError` on timeout or when the server died.
    """
    deadline = time.monotonic() + timeout
    last = "no answer yet"
    while time.monotonic() < deadline:
        if alive is not None and not alive():
            raise ClientError(f"TorchServe exited before model {model!r} was ready ({last})")
        tok = token()
        if tok:
            try:
                r = requests.get(f"{management_url}/models/{model}",
                                 headers={"Authorization": f"Bearer {tok}"}, timeout=5)
                if r.status_code == 200:
                    desc = r.json()
                    desc = desc[0] if isinstance(desc, list) and desc else desc
                    workers = desc.get("workers", []) if isinstance(desc, dict) else []
                    states = [w.get("status") for w in workers]
                    if "READY" in states:
                        return desc
                    last = f"workers: {states or 'none'}"
                else:
                    last = f"HTTP {r.status_code}: {r.text.strip()[:200]}"
            except requests.RequestException as exc:
                last = f"{type(exc).__name__}"
        time.sleep(interval)
    raise ClientError(f"model {model!r} not ready after {timeout:.0f} s ({last})")


class CamClient:
    """Requests to a camserve model on TorchServe's inference API.

    Args:
        url: the inference address, e.g. ``http://127.0.0.1:8080``.
        token: the inference key (``None`` when token authorization is off).
        model: the model name.
        timeout: seconds per request.
    """

    def __init__(self, url: str = DEFAULT_URL, token: Optional[str] = None,
                 model: str = DEFAULT_MODEL, timeout: float = 120.0,
                 session: Optional[requests.Session] = None) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.model = model
        self.timeout = timeout
        self.session = session or requests.Session()

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def request(self, image: bytes, explain: bool = False, **options: Any) -> dict[str, Any]:
        """POST ``image`` (raw bytes) with ``options`` (target, topk, method, outputs) as a
        multipart form to ``/explanations/{model}`` (explain) or ``/predictions/{model}``.

        Raises :class:`ClientError` naming the server's status and message on failure.
        """
        route = "explanations" if explain else "predictions"
        fields = {k: (None, _form_value(v)) for k, v in options.items() if v is not None}
        files: dict[str, Any] = {"data": ("image", image, "application/octet-stream"), **fields}
        r = self.session.post(f"{self.url}/{route}/{self.model}", files=files,
                              headers=self._headers(), timeout=self.timeout)
        if r.status_code != 200:
            hint = (" (is the token current? TorchServe's keys expire; see key_file.json)"
                    if r.status_code == 401 else "")
            raise ClientError(f"{route}/{self.model}: HTTP {r.status_code}: {r.text.strip()[:500]}"
                              f"{hint}", r.status_code)
        try:
            return r.json()
        except ValueError:
            raise ClientError(f"{route}/{self.model}: answer is not JSON: {r.text[:200]!r}") from None

    def predict(self, image: bytes, **options: Any) -> dict[str, Any]:
        """Predictions only."""
        return self.request(image, explain=False, **options)

    def explain(self, image: bytes, **options: Any) -> dict[str, Any]:
        """Predictions and explanations."""
        return self.request(image, explain=True, **options)


def _form_value(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        return ",".join(str(x) for x in v)
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def format_predictions(answer: dict[str, Any]) -> str:
    """Human-readable top-k lines and explanation summaries of an answer."""
    lines = []
    for p in answer.get("predictions", []):
        lines.append(f"{p['score']:8.4f}  {p['index']:>4}  {p['label']}")
    for e in answer.get("explanations", []):
        lines.append(f"explained target {e['target']} ({e['label']}, score {e['score']:.4f}) with "
                     f"{e['method']} at layer {e['layer']}; bbox {e.get('bbox')}")
    return "\n".join(lines)


def save_map(explanation: dict[str, Any], out: str | Path) -> Path:
    """Write the explanation's overlay PNG (or the heatmap PNG when no overlay was asked) to
    ``out``."""
    key = "overlay" if "overlay" in explanation else "heatmap"
    if key not in explanation:
        raise ClientError("the explanation has neither an overlay nor a heatmap (outputs option)")
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(base64.b64decode(explanation[key]))
    return path


def main(argv: Optional[Sequence[str]] = None) -> int:
    """CLI entry point; returns the exit status."""
    ap = argparse.ArgumentParser(prog="camserve-client", description=__doc__.split("\n\n")[0])
    ap.add_argument("image", type=Path, help="image file (JPEG, PNG, WebP, BMP, GIF, TIFF)")
    ap.add_argument("--explain", action="store_true", help="ask for Grad-CAM explanations")
    ap.add_argument("--target", help="class index or label, or a comma-separated list "
                                     "(default: the top-1 prediction)")
    ap.add_argument("--method", help="CAM method (default: the model's)")
    ap.add_argument("--topk", type=int, help="number of predictions (default: the model's)")
    ap.add_argument("--outputs", help="comma-separated subset of heatmap,overlay,raw,bbox")
    ap.add_argument("--out", type=Path, help="write the overlay PNG here (implies --explain)")
    ap.add_argument("--url", default=DEFAULT_URL, help=f"inference address (default {DEFAULT_URL})")
    ap.add_argument("--model", default=DEFAULT_MODEL, help=f"model name (default {DEFAULT_MODEL})")
    ap.add_argument("--key-file", type=Path, default=Path("key_file.json"),
                    help="TorchServe's key file (default ./key_file.json)")
    ap.add_argument("--no-token", action="store_true", help="send no token (authorization off)")
    ap.add_argument("--json", action="store_true", help="print the whole JSON answer")
    args = ap.parse_args(argv)
    try:
        image = args.image.read_bytes()
    except OSError as exc:
        print(f"error: cannot read {args.image}: {exc.strerror}", file=sys.stderr)
        return 2
    explain = args.explain or args.out is not None
    outputs = args.outputs
    if args.out is not None and outputs is None:
        outputs = "overlay,bbox"
    try:
        token = None if args.no_token else read_token(args.key_file, "inference")
        client = CamClient(args.url, token=token, model=args.model)
        answer = client.request(image, explain=explain, target=args.target, method=args.method,
                                topk=args.topk, outputs=outputs)
    except (ClientError, requests.RequestException) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(answer, indent=2))
    else:
        print(format_predictions(answer))
    if args.out is not None and answer.get("explanations"):
        stem, suffix = args.out.with_suffix(""), args.out.suffix or ".png"
        for i, e in enumerate(answer["explanations"]):
            path = args.out if i == 0 else Path(f"{stem}_{i}{suffix}")
            try:
                print(f"wrote {save_map(e, path)}")
            except ClientError as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
