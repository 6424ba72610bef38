"""Values from clients and configs: bounded echoing, strict integers, comma lists of choices.

The one home of the small rules every parser in camserve follows:

* :func:`short_repr` / :func:`log_name` — a value or a user-supplied name as it may appear in an
  error message or a log line: bounded, escaped, never the repr of something huge;
* :func:`parse_int` — an integer as a client may write it (ASCII digits, one optional sign, at most
  18 digits), else None;
* :func:`parse_choices` — "a comma list checked against an allowed set" (request outputs, image
  formats, metric keys, the batch job's ``--save``): one parser, one error shape,
  ``invalid value for KEY: 'item' (allowed: a, b, c)``;
* :data:`MIN_INPUT_SIDE` / :data:`MAX_INPUT_SIDE` — the bounds of a model's input size, for the
  model config, the scaffold and the ONNX graph's metadata alike.

Example::

    >>> parse_choices("Heatmap, bbox,heatmap", ("heatmap", "overlay", "bbox"), key="outputs")
    ('heatmap', 'bbox')
    >>> parse_choices(["cam"], ("heatmap", "bbox"), key="outputs")
    Traceback (most recent call last):
    ...
    ValueError: invalid value for outputs: 'cam' (allowed: heatmap, bbox)
    >>> short_repr("x" * 500, 12), parse_int(" -42 "), parse_int("4.2")
    ("'xxxxxxxx...", -42, None)
"""
from __future__ import annotations

import re
import reprlib
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

#: An integer as a client may write it: optional sign, ASCII digits, at most 18 of them.
_INT = re.compile(r"[+-]?[0-9]{1,18}")
#: Echoed values are cut to this many characters.
ECHO_LIMIT = 100
#: A model's input side (pixels), for ``handler.input_size``, the scaffold and graph metadata.
MIN_INPUT_SIDE = 8
MAX_INPUT_SIDE = 4096


def _bounded_repr(limit: int) -> reprlib.Repr:
    r = reprlib.Repr()
    r.maxlevel, r.maxlist, r.maxtuple, r.maxdict, r.maxset = 3, 8, 8, 8, 8
    r.maxstring = r.maxother = r.maxlong = 2 * limit
    return r


def short_repr(value: Any, limit: int = ECHO_LIMIT) -> str:
    """``repr(value)`` cut to ``limit`` characters (error messages never echo unbounded input).

    Never builds the repr of a huge value and never recurses deeply: containers are shown a few
    levels and items deep (a list nested thousands deep is fine). Newlines and other control
    characters come out escaped, so a value cannot forge a log line::

        >>> short_repr("x" * 500, 12)
        "'xxxxxxxx..."
        >>> short_repr([[[[[[1]]]]]])
        '[[[[...]]]]'
    """
    if isinstance(value, (str, bytes, bytearray)):
        text = repr(value[: 4 * limit])  # repr of a huge value is never built
    elif isinstance(value, (int, float, bool)) or value is None:
        text = repr(value) if not isinstance(value, int) or abs(value) < 10 ** 30 else \
            f"<int of {len(str(abs(value))) if value.bit_length() < 10000 else 'many'} digits>"
    else:
        try:
            text = _bounded_repr(limit).repr(value)
        except Exception:  # a foreign object whose __repr__ fails
            text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def log_name(value: Any, limit: int = 60) -> str:
    """A user-supplied name (JSON key, form field) safe for logs and messages: ``repr``-escaped
    (no raw newline or control character) and cut to ``limit`` characters."""
    return short_repr(value if isinstance(value, str) else str(type(value).__name__), limit)


def parse_int(text: str) -> Optional[int]:
    """``text`` as an integer when it is one (ASCII, optional sign, at most 18 digits), else None."""
    s = text.strip()
    return int(s) if _INT.fullmatch(s) else None


def parse_choices(value: Any, allowed: Sequence[str], *, key: str,
                  exc: Callable[[str], Exception] = ValueError,
                  normalize: Callable[[str], str] = str.lower,
                  groups: Optional[Mapping[str, Sequence[str]]] = None,
                  skip: Iterable[str] = (), empty_ok: bool = False) -> tuple[str, ...]:
    """A comma-separated string, or a list/tuple of strings, as a tuple of ``allowed`` names: order
    kept, repeats dropped, items stripped and ``normalize``-d (lower case by default).

    ``groups`` maps a word to the names it stands for (``{"all": METRIC_KEYS}``); words in ``skip``
    (e.g. ``"none"``) are ignored; an empty result is an error unless ``empty_ok``. Every failure is
    ``exc("invalid value for KEY: ... (allowed: ...)")`` with the item cut by :func:`short_repr`.

    Example::

        >>> parse_choices("all,b", ("a", "b", "c"), key="--metrics", groups={"all": ("a", "c")})
        ('a', 'c', 'b')
        >>> parse_choices("none", ("a",), key="--save", skip=("none",), empty_ok=True)
        ()
        >>> parse_choices("", ("a", "b"), key="outputs")
        Traceback (most recent call last):
        ...
        ValueError: invalid value for outputs: empty (allowed: a, b)
    """
    groups = dict(groups or {})
    skipped = frozenset(skip)
    names = list(allowed) + [g for g in groups if g not in allowed] + sorted(skipped)
    allowed_text = ", ".join(names)
    if isinstance(value, str):
        items: list[Any] = value.split(",")
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        raise exc(f"invalid value for {key}: {short_repr(value)} (a comma-separated string or a "
                  f"list of names; allowed: {allowed_text})")
    out: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise exc(f"invalid value for {key}: {short_repr(item)} is not a name (a "
                      f"comma-separated string or a list of names; allowed: {allowed_text})")
        name = normalize(item.strip())
        if not name or name in skipped:
            continue
        expanded = groups.get(name, (name,) if name in allowed else None)
        if expanded is None:
            raise exc(f"invalid value for {key}: {short_repr(item.strip())} (allowed: "
                      f"{allowed_text})")
        out.extend(n for n in expanded if n not in out)
    if not out and not empty_ok:
        raise exc(f"invalid value for {key}: empty (allowed: {allowed_text})")
    return tuple(out)
