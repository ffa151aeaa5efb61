"""Domain errors. Each knows the HTTP status and machine code of ``API.md``."""

from __future__ import annotations

__all__ = [
    "Busy",
    "InvalidArgument",
    "NotCalibrated",
    "NotFound",
    "RecsysError",
    "StatementTimeout",
    "TooLarge",
    "UnsupportedMediaType",
]


class RecsysError(Exception):
    """Base of the errors a client is told about."""

    status = 500
    code = "internal"

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field

    def to_body(self) -> dict[str, str]:
        body = {"error": self.message, "code": self.code}
        if self.field is not None:
            body["field"] = self.field
        return body


class InvalidArgument(RecsysError):
    status = 400
    code = "invalid_argument"


class NotFound(RecsysError):
    status = 404
    code = "not_found"


class NotCalibrated(RecsysError):
    status = 409
    code = "not_calibrated"


class TooLarge(RecsysError):
    status = 413
    code = "too_large"


class UnsupportedMediaType(RecsysError):
    status = 415
    code = "unsupported_media_type"


class Busy(RecsysError):
    """The pool is exhausted or the database cannot be reached; the client should retry."""

    status = 503
    code = "busy"

    def __init__(self, message: str = "Service temporarily busy, please retry", *, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class StatementTimeout(RecsysError):
    status = 504
    code = "timeout"
