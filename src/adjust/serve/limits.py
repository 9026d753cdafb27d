"""The server's limits: what one request may ask, and how long the server waits (docs/serve.md, "Limits").

Kept apart from the server's other modules so that the CLI can show the defaults without importing torch."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import AdjustError


@dataclass(frozen=True)
class Limits:
    """What one request may ask of the server, and how long the server waits (docs/serve.md, "Limits")."""

    max_body_bytes: int = 1 << 20  # request body (413 beyond it, refused before it is read)
    max_prompts: int = 64  # prompts per request
    max_rows: int = 128  # prompts x n per request
    max_queued_rows: int = 1024  # rows waiting in the queue (429 with Retry-After beyond it)
    max_tokens: int = 1024  # cap on max_tokens (the model's context caps it too)
    max_scored_tokens: int = 8192  # prompt tokens scored per request (echo + logprobs; each costs a row)
    request_timeout: float = 300.0  # seconds from arrival to the last token (504 after it)
    read_timeout: float = 2.0  # seconds for a request's headers, and again for its body (408 after it)
    drain_timeout: float = 30.0  # on SIGTERM: seconds in-flight requests get to finish

    def __post_init__(self):
        for name in ("max_body_bytes", "max_prompts", "max_rows", "max_queued_rows", "max_tokens", "max_scored_tokens"):
            if getattr(self, name) < 1:
                raise AdjustError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        for name in ("request_timeout", "read_timeout", "drain_timeout"):
            v = getattr(self, name)
            if not (0 < v < float("inf")) and not (name == "drain_timeout" and v == 0):
                raise AdjustError(f"--{name.replace('_', '-')} must be a positive number of seconds, got {v}")
        if self.max_rows > self.max_queued_rows:
            raise AdjustError(f"--max-rows ({self.max_rows}) cannot exceed --max-queued-rows "
                              f"({self.max_queued_rows}): such a request could never be queued")
