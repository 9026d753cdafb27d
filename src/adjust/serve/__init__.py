"""`adjust serve`: an OpenAI-compatible server for masked diffusion LMs (see app.py, batching.py)."""

from __future__ import annotations

import socket
import sys

from ..errors import AdjustError


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0 = any free one), or an AdjustError saying why not."""
    if not 0 <= port <= 65535:
        raise AdjustError(f"--port must be in 0..65535, got {port}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise AdjustError(f"cannot resolve --host {host!r}: {e.strerror}") from None
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        raise AdjustError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def server(app, log_level: str = "warning"):
    """A uvicorn server for `app` (from `create_app`) with the app's limits: a request's headers must arrive
    within `read_timeout` of the connection's start or its last response (else the connection is closed),
    and SIGTERM / Ctrl-C drain the batcher (`Batcher.drain`) before the connections close."""
    import uvicorn
    from uvicorn.protocols.http.h11_impl import H11Protocol

    limits = app.state.limits
    batcher = app.state.batcher

    class Protocol(H11Protocol):
        """h11 with a deadline for each request's headers (slow or idle clients cannot hold connections)."""

        def connection_made(self, transport):
            super().connection_made(transport)
            self._arm_head_timer()

        def _arm_head_timer(self):
            cycle = self.cycle
            self._head_timer = self.loop.call_later(limits.read_timeout, self._head_timeout, cycle)

        def _idle(self, cycle) -> bool:
            """No request began since the timer was armed (and none is being answered)."""
            return self.cycle is cycle and (cycle is None or cycle.response_complete)

        def _head_timeout(self, cycle):
            if self._idle(cycle) and not self.transport.is_closing():
                self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\n"
                                     b"connection: close\r\n\r\n")
                self.transport.close()

        def on_response_complete(self):
            super().on_response_complete()
            if not self.transport.is_closing() and self._idle(self.cycle):  # (a pipelined request may be running)
                self._head_timer.cancel()
                self._arm_head_timer()

        def connection_lost(self, exc):
            self._head_timer.cancel()
            super().connection_lost(exc)

    class Server(uvicorn.Server):
        async def shutdown(self, sockets=None):
            batcher.drain(limits.drain_timeout)  # new requests: 503; in-flight ones finish or get a 503 / error
            await super().shutdown(sockets)

    config = uvicorn.Config(app, log_level=log_level, http=Protocol, h11_max_incomplete_event_size=65536,
                            timeout_keep_alive=max(1, int(limits.read_timeout)),
                            timeout_graceful_shutdown=int(limits.drain_timeout) + 5)
    return Server(config)


def run(app, sock: socket.socket, log_level: str = "warning") -> None:
    """Serve `app` on the bound socket until SIGTERM / Ctrl-C, then drain (see `server`)."""
    host, port = sock.getsockname()[:2]
    print(f"adjust serve: listening on http://{host}:{port} (playground at /, API at /v1)", file=sys.stderr,
          flush=True)
    server(app, log_level).run(sockets=[sock])
