"""router.workers: a worker's own listening socket beside the arbiter's, and the kernel spreading connections."""

from __future__ import annotations

import os
import socket

import pytest

from router.workers import argument, listen_on_own_socket, spread_connections

WORKER_ARGV = ["-m", "service:QueryRouter", "--fd", "7", "--service-name", "query_router", "--backlog", "64"]


def test_arguments_are_read_from_bentomls_worker_command_line() -> None:
    assert argument(WORKER_ARGV, "--fd") == 7
    assert argument(WORKER_ARGV, "--backlog") == 64
    assert argument(WORKER_ARGV, "--worker-id") is None
    assert argument(["--fd"], "--fd") is None


def test_only_workers_after_the_first_of_several_take_a_socket_of_their_own(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.create_server(("127.0.0.1", 0)) as arbiters:
        fd = arbiters.fileno()
        argv = ["--fd", str(fd)]
        for workers, worker_id, args in ((1, 1, argv), (2, 1, argv), (2, None, argv), (2, 2, [])):
            spread_connections(workers, worker_id, args)
            assert os.fstat(fd).st_ino == os.fstat(arbiters.fileno()).st_ino  # untouched
            assert not arbiters.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT)
        monkeypatch.setattr("sys.platform", "darwin")  # no hashing over a reuseport group there: keep sharing
        spread_connections(2, 2, argv)
        assert not arbiters.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT)


def test_the_kernel_spreads_connections_over_the_arbiters_socket_and_the_workers_own() -> None:
    with socket.create_server(("127.0.0.1", 0)) as arbiters:  # bound and listening, no SO_REUSEPORT: as BentoML's
        port = arbiters.getsockname()[1]
        workers_fd = os.dup(arbiters.fileno())  # the number the worker was handed
        try:
            listen_on_own_socket(workers_fd, backlog=128)
            with socket.socket(fileno=workers_fd) as own:
                workers_fd = -1
                assert own.getsockname() == arbiters.getsockname()
                assert os.fstat(own.fileno()).st_ino != os.fstat(arbiters.fileno()).st_ino  # another socket
                clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(64)]
                accepted = [accept_all(arbiters), accept_all(own)]
                for client in clients:
                    client.close()
        finally:
            if workers_fd >= 0:
                os.close(workers_fd)
    assert sum(accepted) == 64
    assert min(accepted) > 12, accepted  # 24/40 at worst in 20 tries; 12 or fewer is a 3e-7 binomial tail


def accept_all(listener: socket.socket) -> int:
    listener.setblocking(False)
    count = 0
    while True:
        try:
            connection, _ = listener.accept()
        except BlockingIOError:
            return count
        connection.close()
        count += 1
