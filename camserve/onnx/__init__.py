"""camserve's ONNX side (the ``onnx`` extra: onnx, onnxruntime, onnxscript).

* :mod:`.trace` — :class:`~camserve.onnx.trace.CamGraph` and its ``make_fx`` trace;
* :mod:`.decompositions` — backward operations rewritten into exportable ones;
* :mod:`.passes` — FX passes (out-of-place rewriting, constants to inputs);
* :mod:`.translate` — FX graph -> ONNX (the one module using ``torch.onnx`` internals);
* :mod:`.format` — the graph's inputs, outputs and metadata (:class:`~camserve.onnx.format.GraphMeta`);
* :mod:`.verify` — the graph against :class:`camserve.CamEngine`;
* :mod:`.session` — onnxruntime sessions (providers, threads, options);
* :mod:`.export` — export + verify, the ``camserve-export`` command (docs/export.md);
* the offline batch job (docs/batch.md): :mod:`.job` (its model: plan, stats, the
  ``BatchExplainer``), :mod:`.batch` (the local runner), :mod:`.ray` (the Ray runner),
  :mod:`.cli` (the ``camserve-batch`` command), its reading side (:mod:`.inputs`: listing, bounded reads,
  decoding) and writing side (:mod:`.outputs`: safe writes, ``results.jsonl``/``errors.jsonl``
  and ``--resume``);
* :mod:`.audit` — faithfulness metrics of the maps through the graph's session (``--metrics``).

Importing this package imports none of them (and neither onnx nor onnxruntime).
"""
