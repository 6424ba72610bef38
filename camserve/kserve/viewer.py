"""The predictor's viewer page: ``GET /`` on ``camserve-kserve`` (off with ``--no-ui``).

A static page, its script and style (``camserve/kserve/assets``), served by the predictor itself:
upload an image, pick targets and a method from what ``GET /v1/models/NAME/describe`` lists, and
see the overlay and the top-k that ``POST /v1/models/NAME:explain`` answers. The page calls the
predictor's own API routes from the same origin, so it has exactly the API's access, limits and
answers, and adds no route that reads or computes anything: the routes here serve its three
files. The model's name is the one value written into the page (a ``<meta>`` attribute,
HTML-escaped; model names are ``[A-Za-z0-9._-]``); its Content-Security-Policy allows scripts and
styles from the predictor only, images from it and from ``data:``/``blob:`` (the answer's overlays,
the uploaded file), requests to it only, and no inline script. The manual: docs/kserve.md.

Example::

    >>> page = viewer_page("shapes")
    >>> b'<meta name="camserve-model" content="shapes">' in page
    True
"""
from __future__ import annotations

import html
from importlib import resources
from string import Template
from typing import Any, Callable

from fastapi import FastAPI
from fastapi.responses import Response

#: where the page's files are served (the page itself is ``/``)
ASSETS_PATH = "/viewer"
#: the page's Content-Security-Policy (also on its script and style)
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
       "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'; "
       "object-src 'none'")
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
           "Referrer-Policy": "no-referrer", "X-Frame-Options": "DENY",
           "Cache-Control": "no-cache"}
#: the files under :data:`ASSETS_PATH` and their media types
ASSETS = {"viewer.js": "text/javascript; charset=utf-8", "viewer.css": "text/css; charset=utf-8"}

__all__ = ["install_viewer", "viewer_page", "CSP", "ASSETS_PATH"]


def _asset(name: str) -> bytes:
    return resources.files(__package__).joinpath("assets", name).read_bytes()


def viewer_page(model_name: str) -> bytes:
    """The page for ``model_name`` (HTML-escaped into one attribute and the title)."""
    name = html.escape(model_name, quote=True)
    return Template(_asset("viewer.html").decode("utf-8")).substitute(
        model=name, assets=ASSETS_PATH).encode("utf-8")


def _serve(body: bytes, media_type: str) -> Callable[[], Any]:
    async def route() -> Response:
        return Response(body, media_type=media_type, headers=HEADERS)

    return route


def install_viewer(app: FastAPI, model_name: str) -> None:
    """``GET /`` (the page for ``model_name``) and its files on ``app``, matched before KServe's
    own ``/`` (its liveness answer); once per app (the first model installed names the page)."""
    if any(getattr(r, "path", None) == f"{ASSETS_PATH}/viewer.js" for r in app.router.routes):
        return
    routes = [("/", _serve(viewer_page(model_name), "text/html; charset=utf-8"))]
    routes += [(f"{ASSETS_PATH}/{name}", _serve(_asset(name), media))
               for name, media in ASSETS.items()]
    for path, route in routes:
        app.add_api_route(path, route, methods=["GET"], include_in_schema=False)
        app.router.routes.insert(0, app.router.routes.pop())
