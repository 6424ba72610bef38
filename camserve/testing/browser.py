"""A private headless Chromium driven over the DevTools protocol: the browser tier of the tests and
the report benchmark.

:class:`Chromium` starts Debian's ``chromium`` (or ``$CAMSERVE_CHROMIUM``) headless with a fresh
profile, no sandbox (the tests run as root), no GPU and every background connection off, and talks
to it over the ``--remote-debugging-port`` websocket (loopback only; the port is the one the
browser picked and wrote into its profile). One page per browser; :meth:`Chromium.evaluate` runs an
expression in it, :meth:`Chromium.wait_for` polls one, and every protocol event is kept
(:meth:`Chromium.events`): console messages, uncaught exceptions, JavaScript dialogs (dismissed at
once and recorded, so an ``alert`` can be detected and never blocks). The browser is stopped by
its process group, which it was started in, and its profile removed.

:func:`find_chromium` is None when no browser is installed: the ``browser`` tests skip with
:data:`MISSING` as their reason.

Example (skipped where no Chromium is installed)::

    >>> if find_chromium():
    ...     with Chromium() as browser:
    ...         browser.navigate("data:text/html,<title>t</title><p>hi</p>")
    ...         browser.evaluate("document.querySelector('p').textContent")
    ... else:
    ...     'hi'
    'hi'
"""
from __future__ import annotations

import base64
import itertools
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

__all__ = ["Chromium", "BrowserError", "find_chromium", "MISSING", "CHROMIUM_FLAGS"]

#: where :func:`find_chromium` looks, in order (``$CAMSERVE_CHROMIUM`` first)
CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
#: the skip reason of the browser tier when no browser is found
MISSING = ("Chromium is not installed: `make browser` installs Debian's chromium (as root, where "
           "apt-get is available), or set CAMSERVE_CHROMIUM to a Chromium binary")
#: headless, no sandbox (root), no GPU, and nothing that reaches out to the network by itself
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--no-default-browser-check", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--disable-extensions",
                  "--disable-default-apps", "--mute-audio", "--hide-scrollbars",
                  "--password-store=basic", "--use-mock-keychain",
                  "--disable-features=Translate,MediaRouter,OptimizationHints")


class BrowserError(RuntimeError):
    """The browser did not start, a protocol call failed, or a wait timed out."""


def find_chromium() -> Optional[str]:
    """The Chromium binary: ``$CAMSERVE_CHROMIUM`` when set, else the first of
    :data:`CANDIDATES` on ``PATH``; None when there is none."""
    env = os.environ.get("CAMSERVE_CHROMIUM")
    if env:
        return env if os.access(env, os.X_OK) else None
    for name in CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    return None


class Chromium:
    """A headless Chromium with one page; a context manager (stopped on exit).

    ``size``: the window (W, H) in CSS pixels, also the screenshot size. ``timeout``: seconds for
    the browser to start and for each protocol call."""

    def __init__(self, binary: Optional[str] = None, *, size: tuple[int, int] = (1280, 900),
                 timeout: float = 30.0) -> None:
        self.binary = binary or find_chromium()
        if self.binary is None:
            raise BrowserError(MISSING)
        self.size = size
        self.timeout = timeout
        self.proc: Optional[subprocess.Popen[bytes]] = None
        self.profile: Optional[str] = None
        self._ws: Any = None
        self._session: Optional[str] = None
        self._ids = itertools.count(1)
        self._events: list[dict[str, Any]] = []

    # -- life cycle -----------------------------------------------------------------------------

    def __enter__(self) -> "Chromium":
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def start(self) -> None:
        """Start the browser, connect, open the page and enable the events kept."""
        import websocket  # websocket-client (the ``test`` extra)

        self.profile = tempfile.mkdtemp(prefix="camserve-chromium-")
        cmd = [self.binary, *CHROMIUM_FLAGS, f"--user-data-dir={self.profile}",
               "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
               f"--window-size={self.size[0]},{self.size[1]}", "about:blank"]
        try:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.DEVNULL, start_new_session=True)
            port, path = self._devtools_port()
            self._ws = websocket.create_connection(f"ws://127.0.0.1:{port}{path}",
                                                   timeout=self.timeout, suppress_origin=True)
            target = self.call("Target.createTarget", {"url": "about:blank"}, session=False)
            self._session = self.call("Target.attachToTarget",
                                      {"targetId": target["targetId"], "flatten": True},
                                      session=False)["sessionId"]
            for domain in ("Page", "Runtime", "Log"):
                self.call(f"{domain}.enable")
            self.call("Emulation.setDeviceMetricsOverride",
                      {"width": self.size[0], "height": self.size[1], "deviceScaleFactor": 1,
                       "mobile": False})
        except BaseException:
            self.stop()
            raise

    def _devtools_port(self) -> tuple[int, str]:
        """(port, browser websocket path) from the profile's ``DevToolsActivePort``."""
        assert self.profile is not None and self.proc is not None
        marker = Path(self.profile) / "DevToolsActivePort"
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BrowserError(f"{self.binary} exited with status {self.proc.returncode} "
                                   f"before opening its DevTools port")
            try:
                lines = marker.read_text().split("\n")
            except FileNotFoundError:
                lines = []
            if len(lines) >= 2 and lines[0].strip().isdigit() and lines[1].strip():
                return int(lines[0]), lines[1].strip()
            time.sleep(0.05)
        raise BrowserError(f"{self.binary} did not open its DevTools port within {self.timeout} s")

    def stop(self) -> None:
        """Close the connection, stop the browser's process group (SIGTERM, then SIGKILL after
        5 s) and remove its profile."""
        if self._ws is not None:
            try:
                self._ws.close()
            except OSError:
                pass
            self._ws = None
        if self.proc is not None:
            if self.proc.poll() is None:
                _signal_group(self.proc.pid, signal.SIGTERM)
                try:
                    self.proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    _signal_group(self.proc.pid, signal.SIGKILL)
                    self.proc.wait(timeout=5)
            else:  # the browser is gone; its helpers may not be
                _signal_group(self.proc.pid, signal.SIGKILL)
            self.proc = None
        if self.profile is not None:
            shutil.rmtree(self.profile, ignore_errors=True)
            self.profile = None

    # -- protocol -------------------------------------------------------------------------------

    def call(self, method: str, params: Optional[dict[str, Any]] = None, *,
             session: bool = True, timeout: Optional[float] = None) -> dict[str, Any]:
        """One DevTools command (on the page unless ``session`` is False); its ``result``.
        Events that arrive meanwhile are kept."""
        if self._ws is None:
            raise BrowserError("the browser is not started")
        msg: dict[str, Any] = {"id": next(self._ids), "method": method, "params": params or {}}
        if session and self._session:
            msg["sessionId"] = self._session
        self._ws.send(json.dumps(msg))
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            reply = self._receive(deadline, f"the answer to {method}")
            if reply.get("id") == msg["id"]:
                if "error" in reply:
                    raise BrowserError(f"{method} failed: {reply['error'].get('message')}")
                return reply.get("result", {})

    def _receive(self, deadline: float, what: str) -> dict[str, Any]:
        import websocket

        left = deadline - time.monotonic()
        if left <= 0:
            raise BrowserError(f"timed out waiting for {what}")
        self._ws.settimeout(left)
        try:
            reply = json.loads(self._ws.recv())
        except websocket.WebSocketTimeoutException:
            raise BrowserError(f"timed out waiting for {what}") from None
        if "method" in reply:
            self._events.append(reply)
            if reply["method"] == "Page.javascriptDialogOpening":
                # answered at once, so a dialog never blocks the page; it stays recorded
                self._ws.send(json.dumps({"id": next(self._ids), "sessionId": self._session,
                                          "method": "Page.handleJavaScriptDialog",
                                          "params": {"accept": False}}))
        return reply

    def pump(self, seconds: float) -> None:
        """Keep the events that arrive within ``seconds``."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                self._receive(deadline, "events")
            except BrowserError:
                return

    def events(self, method: Optional[str] = None) -> list[dict[str, Any]]:
        """The protocol events kept so far (``params`` included), of one ``method`` or all."""
        return [e for e in self._events if method is None or e["method"] == method]

    def clear_events(self) -> None:
        """Forget the events kept so far (before the next check of :meth:`problems`)."""
        self._events.clear()

    def problems(self) -> list[str]:
        """Uncaught exceptions, console errors and log errors of the page so far, as text."""
        out = []
        for e in self._events:
            p = e.get("params", {})
            if e["method"] == "Runtime.exceptionThrown":
                d = p.get("exceptionDetails", {})
                out.append(f"exception: {d.get('exception', {}).get('description') or d.get('text')}")
            elif e["method"] == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                out.append("console: " + " ".join(str(a.get("value", a.get("description")))
                                                   for a in p.get("args", [])))
            elif e["method"] == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
                out.append(f"log: {p['entry'].get('text')} {p['entry'].get('url', '')}".rstrip())
        return out

    # -- the page -------------------------------------------------------------------------------

    def navigate(self, url: str, *, timeout: Optional[float] = None) -> None:
        """Open ``url`` and wait for its ``load`` event."""
        before = len(self._events)
        reply = self.call("Page.navigate", {"url": url})
        if reply.get("errorText"):
            raise BrowserError(f"cannot open {url}: {reply['errorText']}")
        deadline = time.monotonic() + (timeout or self.timeout)
        while not any(e["method"] == "Page.loadEventFired" for e in self._events[before:]):
            self._receive(deadline, f"the load event of {url}")

    def evaluate(self, expression: str, *, timeout: Optional[float] = None) -> Any:
        """The value of a JavaScript expression in the page (promises awaited); BrowserError
        with the exception's text when it throws."""
        result = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                "awaitPromise": True}, timeout=timeout)
        if "exceptionDetails" in result:
            d = result["exceptionDetails"]
            raise BrowserError(f"{expression[:80]!r} threw: "
                               f"{d.get('exception', {}).get('description') or d.get('text')}")
        return result.get("result", {}).get("value")

    def wait_for(self, expression: str, *, timeout: Optional[float] = None,
                 interval: float = 0.05) -> Any:
        """Poll ``expression`` until its JSON value is truthy in Python; that value. BrowserError
        after ``timeout``. (A DOM node comes back as ``{}``, which is falsy: compare it with
        ``null`` instead.)"""
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise BrowserError(f"timed out waiting for {expression[:120]!r}")
            self.pump(interval)

    def click(self, selector: str) -> None:
        """``element.click()`` on the first element matching ``selector`` (BrowserError when
        there is none)."""
        if not self.evaluate(f"(() => {{ const e = document.querySelector({json.dumps(selector)});"
                             f" if (!e) return false; e.click(); return true; }})()"):
            raise BrowserError(f"no element matches {selector!r}")

    def set_files(self, selector: str, paths: list[str | Path]) -> None:
        """Choose ``paths`` in the file input matching ``selector``, as a user would (the input's
        ``change`` event fires); BrowserError when there is no such element."""
        root = self.call("DOM.getDocument", {"depth": 0})["root"]["nodeId"]
        node = self.call("DOM.querySelector", {"nodeId": root, "selector": selector})["nodeId"]
        if not node:
            raise BrowserError(f"no element matches {selector!r}")
        self.call("DOM.setFileInputFiles", {"nodeId": node, "files": [str(p) for p in paths]})

    def screenshot(self, path: str | Path, *, full_page: bool = False) -> Path:
        """A PNG of the page (the window, or the whole page) written to ``path``."""
        params: dict[str, Any] = {"format": "png"}
        if full_page:
            metrics = self.call("Page.getLayoutMetrics")
            content = metrics.get("cssContentSize") or metrics["contentSize"]
            params["clip"] = {"x": 0, "y": 0, "width": content["width"],
                              "height": content["height"], "scale": 1}
            params["captureBeyondViewport"] = True
        data = base64.b64decode(self.call("Page.captureScreenshot", params, timeout=60)["data"])
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return path


def _signal_group(pid: int, sig: int) -> None:
    """``sig`` to the process group the browser was started in (its own session)."""
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
