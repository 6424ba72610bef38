"""Embeddings: the model outputs a vector; a target is its cosine similarity to a reference.

* **Output**: (B, D) — the model's tensor, or the output ``handler.embedding_output`` names (a key
  of a mapping, an attribute of an output object such as Hugging Face's ``pooler_output`` or
  ``image_embeds``, an index of a tuple); without the key, a tensor as is, else the first of
  ``image_embeds``, ``pooler_output``, ``embeddings``, ``embedding`` that is a (B, D) tensor.
* **Target**: a reference embedding ``r``; the score is ``cos(v, r)`` (pytorch-grad-cam's
  ``SimilarityToConceptTarget``).
* **Request**: the image and a reference — option ``reference``, a second image (base64, or a
  form file field; bounded like the image: request size, pixels, formats), or
  ``reference_embedding``, D numbers (a JSON list or its text). A reference image is forwarded in
  the same batch as the image, right after it (a companion row): each is the other's target, so
  one forward and one backward give the map of the similarity with respect to the image and the
  map with respect to the reference.
* **Answer**: ``embedding`` (the D numbers), ``similarity`` (None without a reference) and the
  explanations, each marked ``"image": "input"`` or ``"image": "reference"``. An explained row
  without a reference gets no map (there is no similarity to explain).

Example::

    >>> import torch
    >>> task = Embedding([str(i) for i in range(3)])
    >>> o = task.parse_options({"reference_embedding": "[1, 0, 0]"}, max_targets=16)
    >>> out = torch.tensor([[3.0, 4.0, 0.0]])
    >>> tb = task.request_targets(out, [o], [], [1])
    >>> task.scores(out, tb).tolist(), task.answer(task.join(out[0], []), o, 1, None, None)["similarity"]
    ([[0.6000000238418579]], 0.6)
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Mapping, NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F

from ..errors import OptionError
from ..parsing import short_repr
from ..records import round_score
from .base import Geometry, GraphInput, Shown, TargetBatch, Task, TaskError

#: Output names tried, in order, when ``handler.embedding_output`` is not set.
DEFAULT_OUTPUTS: tuple[str, ...] = ("image_embeds", "pooler_output", "embeddings", "embedding")
#: The roles of an embedding row: a request's own image, or its reference image (a companion).
ROLES: tuple[str, ...] = ("input", "reference")


@dataclass(frozen=True)
class EmbeddingOptions:
    """A request's reference: ``image`` bytes (a companion image) or ``vector`` (D numbers), or
    neither; ``role`` of the row these options belong to (``input``, or ``reference`` for the
    companion row of a reference image)."""

    image: Optional[bytes] = None
    vector: Optional[tuple[float, ...]] = None
    role: str = "input"

    @property
    def has_reference(self) -> bool:
        return self.image is not None or self.vector is not None


class EmbeddingRow(NamedTuple):
    """One request's output for its answer: its ``vector`` (D,), and its reference image's
    vector when it has one."""

    vector: torch.Tensor
    reference: Optional[torch.Tensor] = None


def _pick(raw: Any, name: Any) -> Any:
    if isinstance(raw, Mapping):
        return raw.get(name)
    if isinstance(name, int) and isinstance(raw, (tuple, list)):
        return raw[name] if -len(raw) <= name < len(raw) else None
    return getattr(raw, str(name), None) if isinstance(name, str) else None


class Embedding(Task):
    """A (B, D) embedding compared by cosine similarity (see the module docstring)."""

    name = "embedding"
    option_keys = ("reference", "reference_embedding")
    config_keys = ("embedding_output",)
    binary_options = ("reference",)
    hf_auto_class = "AutoModel"
    hf_labels = False
    graph_output = "embedding"

    def __init__(self, labels: Sequence[str] = (), settings: Optional[Mapping[str, Any]] = None) -> None:
        super().__init__(labels, settings)
        name = self.settings.get("embedding_output")
        if name is not None and (isinstance(name, bool) or not isinstance(name, (str, int))
                                 or (isinstance(name, str) and not 0 < len(name) <= 100)):
            raise TaskError(f"invalid value for handler.embedding_output: {short_repr(name)} (the "
                            f"name of a key or attribute of the model's output, or a tuple index)")
        self.output_name: Optional[str | int] = name

    @property
    def dimension(self) -> int:
        """D, the embedding's width (the model's label count: one per component)."""
        return len(self.labels)

    # -- engine side --------------------------------------------------------------------------
    def output(self, raw: Any) -> torch.Tensor:
        if self.output_name is not None:
            out = _pick(raw, self.output_name)
            where = f"output {self.output_name!r} (handler.embedding_output)"
        elif isinstance(raw, torch.Tensor):
            out, where = raw, "output"
        else:
            out = next((v for v in (_pick(raw, n) for n in DEFAULT_OUTPUTS)
                        if isinstance(v, torch.Tensor) and v.dim() == 2), None)
            where = f"output (none of {', '.join(DEFAULT_OUTPUTS)}; set handler.embedding_output)"
        if not isinstance(out, torch.Tensor) or out.dim() != 2:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise TaskError(f"the {self.name} task needs a (B, D) embedding; the model's {where} "
                            f"is {shape}")
        return out

    def count_labels(self, model: Any, raw: Any) -> int:
        """D, the embedding's width."""
        return int(self.output(raw).shape[1])

    def scores(self, out: torch.Tensor, targets: TargetBatch) -> torch.Tensor:
        """``cos(out[r], reference[r, k])`` (R, K)."""
        if targets.reference is None:
            raise TaskError("invalid value for targets: embedding targets need a reference")
        ref = targets.reference.to(device=out.device, dtype=out.dtype)
        return F.cosine_similarity(out[:, None, :], ref, dim=-1)

    def probability(self, out: torch.Tensor, targets: TargetBatch) -> torch.Tensor:
        """``(1 + cos) / 2``: the similarity mapped to [0, 1] (R, K)."""
        return (1.0 + self.scores(out.detach().float(), targets)) / 2.0

    def _targets(self, reference: torch.Tensor, count: Optional[tuple[int, ...]]) -> TargetBatch:
        index = torch.zeros(reference.shape[:2], dtype=torch.long, device=reference.device)
        return TargetBatch(index, count, reference=reference)

    def default_targets(self, out: torch.Tensor) -> TargetBatch:
        """The similarity to the all-ones direction (what the engine warms up with; a request
        explains the similarity to its reference)."""
        ref = torch.ones_like(out.detach())[:, None]
        return self._targets(ref, (1,) * out.shape[0])

    def as_targets(self, value: Any, out: torch.Tensor) -> TargetBatch:
        """None, a TargetBatch, or reference embeddings as a float tensor (B, D) or (B, K, D)."""
        if value is None or isinstance(value, TargetBatch):
            return super().as_targets(value, out)
        if not isinstance(value, torch.Tensor) or not value.is_floating_point() \
                or value.dim() not in (2, 3) or value.shape[0] != out.shape[0] \
                or value.shape[-1] != out.shape[1]:
            raise TaskError(f"invalid value for targets: {short_repr(value)} (reference embeddings "
                            f"({out.shape[0]}, {out.shape[1]}) or ({out.shape[0]}, K, "
                            f"{out.shape[1]}), or a TargetBatch)")
        ref = value if value.dim() == 3 else value[:, None]
        return self._targets(ref.to(out.device), (int(ref.shape[1]),) * out.shape[0])

    def probe_score(self, out: Any) -> torch.Tensor:
        return self.output(out)[0].square().sum()

    def graph_inputs(self, input_size: tuple[int, int]) -> tuple[GraphInput, ...]:
        return (GraphInput("reference", torch.float32, (self.dimension,), "vector", None,
                           f"float32 (N, {self.dimension}): the embedding each row's cosine "
                           f"similarity is taken to; required"),)

    def graph_targets(self, out: torch.Tensor, inputs: Mapping[str, torch.Tensor]) -> TargetBatch:
        return self._targets(inputs["reference"][:, None], None)

    # -- serving ------------------------------------------------------------------------------
    def parse_options(self, options: Mapping[str, Any], *, max_targets: int) -> EmbeddingOptions:
        from ..envelopes import image_from

        image = options.get("reference")
        vector = options.get("reference_embedding")
        if image is not None and vector is not None:
            raise OptionError("invalid value for reference: give a reference image (reference) or "
                              "an embedding (reference_embedding), not both")
        if image is not None:
            return EmbeddingOptions(image=image_from(image, "reference"))
        if vector is not None:
            return EmbeddingOptions(vector=self._vector(vector))
        return EmbeddingOptions()

    def _vector(self, value: Any) -> tuple[float, ...]:
        allowed = f"{self.dimension} finite numbers, not all zero (a JSON list)"
        if isinstance(value, str):
            text = value.strip()
            try:
                value = json.loads(text if text.startswith("[") else f"[{text}]")
            except (json.JSONDecodeError, RecursionError, ValueError):
                raise OptionError(f"invalid value for reference_embedding: {short_repr(text)} "
                                  f"({allowed})") from None
        if not isinstance(value, (list, tuple)) or len(value) != self.dimension or any(
                isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
                for v in value):
            got = f"{len(value)} values" if isinstance(value, (list, tuple)) else short_repr(value)
            raise OptionError(f"invalid value for reference_embedding: {got} ({allowed})")
        if not any(value):
            raise OptionError(f"invalid value for reference_embedding: all zeros ({allowed})")
        return tuple(float(v) for v in value)

    def max_targets(self, parsed: EmbeddingOptions) -> int:
        return 1

    def companions(self, parsed: EmbeddingOptions) -> tuple[tuple[str, bytes], ...]:
        return (("reference", parsed.image),) if parsed.image is not None else ()

    def companion_options(self, parsed: EmbeddingOptions, i: int) -> EmbeddingOptions:
        return EmbeddingOptions(role="reference")

    def join(self, out_row: torch.Tensor, companions: Sequence[torch.Tensor]) -> EmbeddingRow:
        return EmbeddingRow(out_row, companions[0] if companions else None)

    def request_targets(self, out: torch.Tensor, parsed: Sequence[EmbeddingOptions],
                        geometry: Sequence[Geometry], topk: Sequence[int]) -> TargetBatch:
        """A row's reference: its ``reference_embedding``, or its reference image's embedding
        (the companion row right after it); a companion row's reference is its request's image
        (the row right before it). A row without a reference gets no target."""
        ref = torch.ones_like(out)
        count = []
        for r, p in enumerate(parsed):
            if p.role == "reference":
                ref[r] = out[r - 1]
            elif p.vector is not None:
                ref[r] = torch.tensor(p.vector, dtype=out.dtype, device=out.device)
            elif p.image is not None:
                ref[r] = out[r + 1]
            count.append(1 if p.role == "reference" or p.has_reference else 0)
        return self._targets(ref[:, None], tuple(count))

    def shown(self, out_row: torch.Tensor, targets: TargetBatch, r: int,
              geometry: Geometry) -> list[Shown]:
        assert targets.reference is not None and targets.count is not None
        return [Shown(0, "similarity", float(F.cosine_similarity(
            out_row.float(), targets.reference[r, 0].float(), dim=0)))][:targets.count[r]]

    def answer(self, out_row: EmbeddingRow, parsed: EmbeddingOptions, topk: int,
               geometry: Optional[Geometry], explanations: Optional[list[dict[str, Any]]]
               ) -> dict[str, Any]:
        vec = out_row.vector.float()
        ref = out_row.reference if out_row.reference is not None else (
            torch.tensor(parsed.vector) if parsed.vector is not None else None)
        sim = None if ref is None else float(F.cosine_similarity(vec, ref.float(), dim=0))
        body: dict[str, Any] = {
            "embedding": [round_score(v) for v in vec.tolist()],
            "similarity": None if sim is None else round_score(sim),
            "reference": "image" if parsed.image is not None else
                         ("embedding" if parsed.vector is not None else None)}
        if explanations is not None:
            roles = ["input"] + ["reference"] * (len(explanations) - 1)
            body["explanations"] = [{**e, "image": role} for e, role in zip(explanations, roles)]
        return body

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "dimension": self.dimension,
                "embedding_output": self.output_name}
