"""Typed request errors with their HTTP status: what a row of a batch answers when it cannot be
served. Every error body is ``{"code": int, "type": str, "message": str}``.

Types: ``InvalidImage`` / ``InvalidRequest`` / ``MethodUnavailable`` (400), ``ImageTooLarge`` / ``ResponseTooLarge`` /
``WorkTooLarge`` (413), ``InvalidOption`` (422), ``InternalError`` (500, the message carries a
short error id that is also in the log next to the traceback).

Example::

    >>> err = OptionError("invalid value for topk: 0 (allowed: 1..5)")
    >>> err.code, err.phrase, err.to_body()["type"]
    (422, 'Unprocessable Entity', 'InvalidOption')
    >>> InternalError.new().message.startswith("internal error (id ")
    True
"""
from __future__ import annotations

import http
import secrets
from typing import Any, Sequence


class RequestError(ValueError):
    """A request that cannot be answered: ``code`` is the HTTP status, ``type`` a short name."""

    def __init__(self, message: str, code: int = 400, type: str = "InvalidRequest") -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.type = type

    @property
    def phrase(self) -> str:
        """The HTTP reason phrase of :attr:`code`."""
        try:
            return http.HTTPStatus(self.code).phrase
        except ValueError:
            return "Error"

    def to_body(self) -> dict[str, Any]:
        """The JSON error body: ``{"code": ..., "type": ..., "message": ...}``."""
        return {"code": self.code, "type": self.type, "message": self.message}


class InvalidImage(RequestError):
    """No usable image in the request (400)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, 400, "InvalidImage")


class OptionError(RequestError):
    """An option value that is not allowed (HTTP 422); the message names the option."""

    def __init__(self, message: str) -> None:
        super().__init__(message, 422, "InvalidOption")


class MethodUnavailable(RequestError):
    """A known CAM method this model does not serve (400), e.g. one its exported graph does not
    carry; the message names the methods it has."""

    def __init__(self, method: str, available: Sequence[str], what: str = "") -> None:
        why = f"; {what}" if what else ""
        super().__init__(f"invalid value for method: {method!r} is not served by this model "
                         f"(available: {', '.join(available)}{why})", 400, "MethodUnavailable")
        self.method = method
        self.available = tuple(available)


class ResponseTooLarge(RequestError):
    """The answer would exceed the response size limit (413); the message says what to drop."""

    def __init__(self, size: int, limit: int, drop: Sequence[str]) -> None:
        hint = f"; ask for fewer targets or drop {', '.join(drop)}" if drop else ""
        super().__init__(f"response too large: {size} bytes exceeds the limit of {limit} bytes"
                         f"{hint} (option 'outputs', 'target')", 413, "ResponseTooLarge")
        self.size = size
        self.limit = limit


class WorkTooLarge(RequestError):
    """A request (or what is left of its batch's budget) over the work budget (413); the message
    says what to reduce."""

    def __init__(self, message: str) -> None:
        super().__init__(message, 413, "WorkTooLarge")


class InternalError(RequestError):
    """A bug while answering one row (500). ``error_id`` is logged with the traceback."""

    def __init__(self, error_id: str) -> None:
        super().__init__(f"internal error (id {error_id}); the server log has the details",
                         500, "InternalError")
        self.error_id = error_id

    @classmethod
    def new(cls) -> "InternalError":
        """An internal error with a fresh short id (8 hex digits)."""
        return cls(secrets.token_hex(4))


def from_image_error(exc: Exception) -> RequestError:
    """A :class:`camserve.images.ImageError` (``code``, ``type``, message) as a request error."""
    return RequestError(str(exc), int(getattr(exc, "code", 400)),
                        str(getattr(exc, "type", "InvalidImage")))
