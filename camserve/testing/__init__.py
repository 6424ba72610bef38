"""Test tooling shared by the test suite, the benchmarks and ``scripts/serve.py``.

Never imported by camserve's own modules (a test checks it); each module is imported on its own,
and only :mod:`camserve.testing.torchserve` and :mod:`camserve.testing.kserve` need an extra
(``camserve[serve]``: TorchServe, requests):

* :mod:`camserve.testing.torchserve`: a private TorchServe (temporary home, free loopback ports,
  token auth) and ``.mar`` archiving;
* :mod:`camserve.testing.kserve`: a private camserve KServe predictor (a child process on free
  loopback ports, stopped by its PID);
* :mod:`camserve.testing.context`: a fake TorchServe context (system properties, manifest, model
  config, per-row request headers, per-row response status and content type, recorded metrics);
* :mod:`camserve.testing.handler`: load a handler file the way TorchServe 0.12's model loader does;
* :mod:`camserve.testing.nets`: tiny networks for tests and BatchNorm calibration of random nets;
* :mod:`camserve.testing.hostile`: a corpus of hostile image files with their expected outcomes;
* :mod:`camserve.testing.zoo`: the torchvision architectures the contract tests run over, and
  their ONNX exports (the zoo tests, ``python -m bench.onnx_parity``);
* :mod:`camserve.testing.load`: a closed-loop load generator for the serving benchmarks.
* :mod:`camserve.testing.equality`: how far two servers' (or backends') answers are apart.
* :mod:`camserve.testing.jobs`: synthetic batch-job folders (results lines and artefacts) for the
  report's tests and benchmark;
* :mod:`camserve.testing.browser`: a private headless Chromium driven over the DevTools protocol
  (needs Chromium and websocket-client, the ``test`` extra).

None of it is part of the public API.
"""
