"""The server's one error type: an HTTP status and OpenAI's error body."""

from __future__ import annotations


class ApiError(Exception):
    """A request that cannot be served: `status`, and the body {"error": {"message", "type", "param", "code"}}.

    `headers`: extra response headers (Retry-After on a 429)."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None, status: int = 400,
                 type: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.message, self.param, self.code, self.status, self.type = message, param, code, status, type
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def shutting_down() -> ApiError:
    return ApiError("the server is shutting down; retry on another instance or after it restarts", None,
                    "shutting_down", 503, "server_error", {"Retry-After": "5"})
