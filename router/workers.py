"""Worker processes (SERVICE_WORKERS > 1): each worker its own listening socket, so new connections spread.

BentoML's arbiter opens one listening socket and every worker accepts on it. uvloop accepts every pending connection
on each wake-up, so the worker that wakes first takes a burst whole: 64 connections opened at once landed all on one
of two workers in 3 of 20 tries, and keep-alive connections stay where they land (docs/performance.md). Here each
worker after the first binds a socket of its own to the same address, with SO_REUSEPORT also set on the arbiter's
socket, which the first worker keeps: the kernel then spreads new connections over the sockets (64 at once split
24/40 at worst in 20 tries). Where that fails, the worker shares the arbiter's socket as before, and says so.
"""

from __future__ import annotations

import itertools
import logging
import os
import socket
import sys
from collections.abc import Sequence

log = logging.getLogger(__name__)

DEFAULT_BACKLOG = 2048  # BentoML's default `--backlog`


def argument(argv: Sequence[str], name: str) -> int | None:
    """The integer after `name` in the worker's command line (BentoML passes `--fd N --backlog N --worker-id N`)."""
    for flag, value in itertools.pairwise(argv):
        if flag == name and value.isdigit():
            return int(value)
    return None


def listen_on_own_socket(fd: int, backlog: int) -> None:
    """Put a socket of this worker's own, bound to the address of the listening socket `fd`, in place of `fd`."""
    with socket.socket(fileno=os.dup(fd)) as shared:
        # Set on the listening socket itself (the arbiter's, shared by every worker): the kernel then groups it with
        # the sockets that bind the same address with SO_REUSEPORT and hashes each new connection to one of them.
        shared.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        own = socket.socket(shared.family, shared.type)
        try:
            own.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            own.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            own.bind(shared.getsockname())
            own.listen(backlog)
            os.dup2(own.fileno(), fd)  # BentoML hands `fd` to uvicorn after the service is imported
        finally:
            own.close()


def spread_connections(workers: int, worker_id: int | None, argv: Sequence[str]) -> None:
    """In worker 2, 3, ... of a server (BentoML numbers them from 1), listen on a socket of its own."""
    fd = argument(argv, "--fd")
    if workers < 2 or worker_id is None or worker_id < 2 or fd is None:
        return  # one worker, the first worker (it keeps the arbiter's socket), or not a BentoML worker process
    if not sys.platform.startswith("linux"):
        return  # Linux hashes connections over a SO_REUSEPORT group; macOS and the BSDs give them all to one socket
    try:
        listen_on_own_socket(fd, argument(argv, "--backlog") or DEFAULT_BACKLOG)
    except OSError as exc:
        log.warning("worker %d shares the listening socket (%s): new connections may not spread", worker_id, exc)
