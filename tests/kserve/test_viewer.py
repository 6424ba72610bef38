"""The predictor's viewer page (camserve.kserve.viewer) in a real headless Chromium against a real
``camserve-kserve models/shapes`` on a free loopback port: a sample uploaded, a method and targets
picked, the overlays and the top-k shown are the predictor's answer (the TorchServe handler's for
the same options); a hostile upload is answered as text; ``--no-ui`` serves no page. Screenshots
go to build/kserve/."""
from __future__ import annotations

import base64
import json
import re
from pathlib import Path
from typing import Any, Iterator

import pytest
import requests

from camserve.kserve.__main__ import build_parser
from camserve.kserve.viewer import CSP, viewer_page
from camserve.serving import CamService
from camserve.testing.kserve import LocalPredictor

from ..conftest import assert_ran_nothing
from .conftest import MODEL_DIR, NAME, ROOT, SAMPLES, b64, handler_answers

BUILD = ROOT / "build" / "kserve"
READY = "document.documentElement.dataset.state"
#: the result's figures, when every image in them has loaded (else 0)
FIGURES_LOADED = ("(() => { const i = Array.from(document.querySelectorAll('#figures img'));"
                  " return i.length && i.every((x) => x.complete && x.naturalWidth > 0) ? i.length : 0;"
                  " })()")


def test_the_page_and_the_flag() -> None:
    page = viewer_page('a"><script>x</script>').decode()
    assert "<script>x" not in page and 'content="a&quot;&gt;&lt;script&gt;x&lt;/script&gt;"' in page
    assert re.findall(r"<script[^>]*>", page) == ['<script src="/viewer/viewer.js">']
    assert "'unsafe-inline'" not in CSP and "script-src 'self'" in CSP
    assert build_parser().parse_args(["models/shapes"]).no_ui is False
    assert build_parser().parse_args(["models/shapes", "--no-ui"]).no_ui is True


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalPredictor]:
    log = tmp_path_factory.mktemp("kserve_viewer") / "server.log"
    with LocalPredictor(MODEL_DIR, NAME, log_path=log, env={"CAMSERVE_DEVICE": "cpu"}) as srv:
        yield srv


def select(b: Any, element: str, values: list[str]) -> None:
    b.evaluate(f"(() => {{ const e = document.getElementById({json.dumps(element)});"
               f" const want = {json.dumps(values)};"
               f" for (const o of e.options) o.selected = want.includes(o.value);"
               f" e.dispatchEvent(new Event('change')); }})()")


def texts(b: Any, selector: str) -> list[str]:
    return b.evaluate(f"Array.from(document.querySelectorAll({json.dumps(selector)}))"
                      f".map((e) => e.textContent)")


@pytest.mark.browser
@pytest.mark.slow
def test_routes_headers_and_describe(server: LocalPredictor, service: CamService) -> None:
    r = requests.get(f"{server.url}/", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert r.headers["content-security-policy"] == CSP
    assert r.headers["x-content-type-options"] == "nosniff"
    assert f'<meta name="camserve-model" content="{NAME}">' in r.text
    js = requests.get(f"{server.url}/viewer/viewer.js", timeout=10)
    assert js.status_code == 200 and js.headers["content-type"].startswith("text/javascript")
    assert requests.get(f"{server.url}/viewer/nope.js", timeout=10).status_code == 404
    d = requests.get(f"{server.url}/v1/models/{NAME}/describe", timeout=10)
    assert d.status_code == 200
    mine, theirs = d.json(), service.describe()
    assert {k: v for k, v in mine.items() if k != "threads"} == \
        {k: v for k, v in json.loads(json.dumps(theirs)).items() if k != "threads"}
    assert requests.get(f"{server.url}/v1/models/nope/describe", timeout=10).status_code == 404


@pytest.mark.browser
@pytest.mark.slow
def test_an_upload_is_explained_end_to_end(chromium: Any, server: LocalPredictor,
                                           service: CamService, tmp_path: Path) -> None:
    chromium.clear_events()
    chromium.navigate(f"{server.url}/")
    assert chromium.wait_for(READY) == "ready", chromium.problems()
    methods = chromium.evaluate("Array.from(document.getElementById('method').options)"
                                ".map((o) => o.value)")
    assert methods == [m["name"] for m in service.describe()["methods"]]
    assert chromium.evaluate("document.getElementById('method').value") == "gradcam"
    assert texts(chromium, "#targets option")[:2] == ["0: circle", "1: square"]
    sample = next(p for p in SAMPLES if p.name == "circle_000.png")
    chromium.set_files("#file", [sample])
    chromium.wait_for("!document.getElementById('explain').disabled")
    select(chromium, "method", ["gradcam++"])
    select(chromium, "targets", ["0", "3"])                          # circle and star
    chromium.evaluate("document.getElementById('topk').value = '4'")
    chromium.click("#explain")
    chromium.wait_for("document.querySelectorAll('#figures img').length === 3", timeout=120)
    assert chromium.wait_for(FIGURES_LOADED) == 3                    # the upload, two overlays
    assert chromium.evaluate(READY) == "ready"
    # what the page shows is the handler's answer for the same image and options
    [want] = handler_answers(service, [{"body": sample.read_bytes(), "method": "gradcam++",
                                        "target": "0,3", "topk": "4", "outputs": "overlay,bbox"}],
                             explain_route=True)
    assert want.status == 200
    body = want.body
    overlays = chromium.evaluate("Array.from(document.querySelectorAll('#figures img'))"
                                 ".slice(1).map((i) => i.src)")
    assert [base64.b64decode(u.split(",", 1)[1]) for u in overlays] == [
        base64.b64decode(e["overlay"]) for e in body["explanations"]]
    assert texts(chromium, "#figures figcaption")[1:] == [
        f"{e['label']} ({e['target']}) · {e['score']:.4f} · gradcam++" for e in body["explanations"]]
    rows = chromium.evaluate("Array.from(document.querySelectorAll('#side table')[0].rows)"
                             ".slice(1).map((r) => Array.from(r.cells).map((c) => c.textContent))")
    assert rows == [[p["label"], str(p["index"]), f"{p['score']:.4f}"] for p in body["predictions"]]
    assert chromium.evaluate("document.querySelectorAll('#figures .box').length") == 2
    BUILD.mkdir(parents=True, exist_ok=True)
    chromium.screenshot(BUILD / "viewer.png")
    assert_ran_nothing(chromium)


@pytest.mark.browser
@pytest.mark.slow
def test_a_hostile_upload_is_answered_as_text(chromium: Any, server: LocalPredictor,
                                              tmp_path: Path) -> None:
    chromium.call("Network.enable")
    chromium.clear_events()
    chromium.navigate(f"{server.url}/")
    assert chromium.wait_for(READY) == "ready", chromium.problems()
    bad = tmp_path / "<img src=x onerror=window.__pwned=1>.png"
    bad.write_text("<script>window.__pwned=2</script> not an image\n")
    chromium.set_files("#file", [bad])
    chromium.wait_for("!document.getElementById('explain').disabled")
    chromium.click("#explain")
    chromium.wait_for(f"{READY} === 'error'", timeout=60)
    err = texts(chromium, "#side .error")
    assert len(err) == 1 and err[0].startswith("InvalidImage: ")
    assert texts(chromium, "#figures figcaption") == [f"uploaded: {bad.name}"]
    assert "(HTTP 400)" in chromium.evaluate("document.getElementById('status').textContent")
    # the page loads nothing from elsewhere: every request went to the predictor
    urls = [e["params"]["request"]["url"] for e in chromium.events("Network.requestWillBeSent")]
    assert all(u.startswith(server.url) or u.startswith(("data:", "blob:")) for u in urls)
    # the one problem logged is the predictor's answer itself (400)
    assert [p for p in chromium.problems() if "400" not in p] == []
    assert chromium.evaluate("window.__csp") == [] and \
        chromium.evaluate("typeof window.__pwned") == "undefined"


@pytest.mark.browser
@pytest.mark.slow
def test_no_ui(tmp_path: Path) -> None:
    with LocalPredictor(MODEL_DIR, NAME, args=["--no-ui", "--grpc-port", "0"],
                        log_path=tmp_path / "server.log", env={"CAMSERVE_DEVICE": "cpu"}) as srv:
        r = requests.get(f"{srv.url}/", timeout=10)
        assert "text/html" not in r.headers.get("content-type", "")
        assert r.json() == {"status": "alive"}                       # KServe's own answer
        assert requests.get(f"{srv.url}/viewer/viewer.js", timeout=10).status_code == 404
        # the API is all there, describe included
        assert requests.get(f"{srv.url}/v1/models/{NAME}/describe", timeout=10).status_code == 200
        ok = requests.post(f"{srv.url}/v1/models/{NAME}:predict",
                           json={"instances": [{"data": b64(SAMPLES[0].read_bytes())}]}, timeout=60)
        assert ok.status_code == 200
