"""camserve on KServe: a native predictor (a ``kserve.Model``) over the same serving core.

``camserve-kserve MODEL_DIR`` (or ``python -m camserve.kserve MODEL_DIR``; extra ``kserve``,
KServe 0.21.0) serves one model folder with KServe's ``ModelServer``: v1 ``:predict`` and
``:explain`` with many images per request, v2 ``/infer`` over REST and gRPC, per-image answers in
the TorchServe handler's JSON, concurrent requests batched into one model call. The manual (routes,
bodies, statuses, stages, batching, metrics): ``docs/kserve.md``.

The package, one job a module:

* :mod:`camserve.kserve.wire`: KServe v1/v2 bodies -> the core's request records (no kserve
  import);
* :mod:`camserve.kserve.batcher`: the prepared requests of concurrent callers -> one model call;
* :mod:`camserve.kserve.model`: the ``kserve.Model`` (``CamModel``): KServe's stage hooks over
  :class:`camserve.serving.CamService` — preprocess (wire, options, decoding), predict / explain
  (the batched model pass), postprocess (the answer body);
* :mod:`camserve.kserve.server`: the few KServe 0.21 internals camserve overrides (bind address,
  its own v2 REST route, answers with their status), and ``serve``;
* ``camserve/kserve/__main__.py``: the command line.

Importing this package imports no kserve; :func:`import_kserve` is how its modules do.
"""
from __future__ import annotations

import sys


def import_kserve() -> None:
    """Import kserve with an empty command line: KServe 0.21's ``kserve.model_server`` parses
    ``sys.argv`` when imported (its own server's flags), and ours are not meant for it."""
    if "kserve.model_server" in sys.modules:
        return
    saved, sys.argv = sys.argv, sys.argv[:1]
    try:
        import kserve  # noqa: F401
    finally:
        sys.argv = saved
