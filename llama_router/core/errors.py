"""OpenAI-shaped errors: every failure a client sees is `{"error": {"message", "type", "code"}}`."""

from __future__ import annotations

from typing import Any

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}


# Characters of a client's value (a model name, a path) echoed in an error message or a log line.
ECHO_LIMIT = 200


def printable(value: object, limit: int = ECHO_LIMIT) -> str:
    """A client's value made safe to echo in an error or a log line: characters that are not
    printable (line breaks, escapes, bidirectional overrides) written as Python escapes, so a value
    cannot forge a log line or a terminal's state, and cut to `limit` characters, saying how long it
    was."""
    text = str(value)
    if len(text) <= limit and text.isprintable():
        return text
    cut = text[:limit]
    if not cut.isprintable():
        cut = "".join(char if char.isprintable() else ascii(char)[1:-1] for char in cut)
    return cut if len(text) <= limit else f"{cut}… ({len(text)} characters)"


class RouterError(Exception):
    """An error to answer a client with; carries the HTTP status and OpenAI error fields."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        type: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.type = type or error_type(status)
        self.retry_after = retry_after

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, code=self.code, type=self.type)


def error_type(status: int) -> str:
    return _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")


def error_body(
    status: int, message: str, *, code: str | None = None, type: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type or error_type(status), "code": code}}
