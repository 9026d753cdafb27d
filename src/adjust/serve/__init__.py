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


def run(app, sock: socket.socket, log_level: str = "warning") -> None:
    """Serve `app` on the bound socket with uvicorn until interrupted."""
    import uvicorn

    host, port = sock.getsockname()[:2]
    print(f"adjust serve: listening on http://{host}:{port} (playground at /, API at /v1)", file=sys.stderr,
          flush=True)
    uvicorn.Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5)).run(sockets=[sock])
