"""Test tooling shared by the test suite, the benchmarks and ``scripts/serve.py``.

Not imported by :mod:`camserve`; each module is imported on its own, and only
:mod:`camserve.testing.torchserve` needs an extra (``camserve[serve]``: TorchServe, requests):

* :mod:`camserve.testing.torchserve`: a private TorchServe (temporary home, free loopback ports,
  token auth) and ``.mar`` archiving;
* :mod:`camserve.testing.context`: a fake TorchServe context (system properties, manifest, model
  config, per-row request headers, per-row response status and content type, recorded metrics);
* :mod:`camserve.testing.handler`: load a handler file the way TorchServe 0.12's model loader does;
* :mod:`camserve.testing.nets`: tiny networks for tests and BatchNorm calibration of random nets;
* :mod:`camserve.testing.hostile`: a corpus of hostile image files with their expected outcomes;
* :mod:`camserve.testing.jobs`: synthetic batch-job folders (results lines and artefacts) for the
  report's tests and benchmark;
* :mod:`camserve.testing.browser`: a private headless Chromium driven over the DevTools protocol
  (needs Chromium and websocket-client, the ``test`` extra).

None of it is part of the public API.
"""
