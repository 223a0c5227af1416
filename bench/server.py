"""Run the real service as a subprocess on a free loopback port (used by the tests and the benchmarks)."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# Variables of the router that must not leak from the developer's shell into a test server.
ROUTER_ENV = (
    "MODEL_PATH",
    "HF_MODEL_ID",
    "HF_MODEL_REVISION",
    "REDIS_URL",
    "CONFIDENCE_THRESHOLD",
    "CACHE_L1_SIZE",
    "MODEL_BACKEND",
    "MAX_BATCH_SIZE",
    "MAX_LATENCY_MS",
    "MAX_QUEUE",
    "SHED_DELAY_MS",
)


EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")


def free_port() -> int:
    """A free loopback port below the kernel's ephemeral range. A port from that range (what binding port 0 gives)
    can become the local end of any outgoing connection on the machine in the seconds before `bentoml serve` binds
    it, and the server then exits with "address already in use"."""
    low = int(EPHEMERAL_RANGE.read_text().split()[0]) if EPHEMERAL_RANGE.exists() else 32768
    candidates = [random.randrange(max(1024, low - 10000), low) for _ in range(100)] if low > 2048 else []
    for port in [*candidates, 0]:  # 0: the kernel's choice, where there is no room below its range
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return int(s.getsockname()[1])
    raise RuntimeError("no free loopback port")


def metric_values(url: str, name: str, labels: Mapping[str, str], timeout: float = 10) -> list[float]:
    """The samples called `name` whose labels include `labels`, from the server at `url`: one per worker process for
    a `liveall` gauge, whose sum is the server's total for a counter."""
    text = httpx.get(f"{url}/metrics", timeout=timeout).text
    return [
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    ]


@dataclass
class Server:
    url: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def classify(self, text: object, **extra: object) -> httpx.Response:
        return httpx.post(f"{self.url}/v1/query-classify", json={"text": text, **extra}, timeout=30)

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples called `name` whose labels include `labels` (0 when absent)."""
        return sum(metric_values(self.url, name, labels))

    def deep(self) -> dict[str, object]:
        return dict(httpx.get(f"{self.url}/health/deep", timeout=10).json())

    def wait_until_loaded(self, timeout: float = 30) -> httpx.Response:
        """The first /health/ready answer whose status is no longer "loading" (ready or failed)."""
        deadline = time.monotonic() + timeout
        while True:
            response = httpx.get(f"{self.url}/health/ready", timeout=5)
            if response.json()["status"] != "loading" or time.monotonic() > deadline:
                return response
            time.sleep(0.1)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def wait_for(url: str, process: subprocess.Popen[bytes], log_path: Path, path: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{log_path.read_text()[-4000:]}")
        try:
            if httpx.get(url + path, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url}{path} not 200 after {timeout} s:\n{log_path.read_text()[-4000:]}")


def stop_process_group(process: subprocess.Popen[bytes], timeout: float = 20) -> None:
    """SIGTERM the process's whole group (bentoml serve forks workers), SIGKILL it if it lingers."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@contextmanager
def serve(
    env: dict[str, str],
    log_dir: Path,
    ready: bool = True,
    timeout: float = 180,
    target: str = "service:QueryRouter",
    ready_path: str = "/health/ready",
    cwd: Path = REPO,
) -> Iterator[Server]:
    """Run `bentoml serve <target>` (from the repo unless `cwd` says otherwise) on a free loopback port."""
    port = free_port()
    full_env = {k: v for k, v in os.environ.items() if k not in ROUTER_ENV}
    full_env.update({"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "TORCH_THREADS": "1"})
    # BentoML wipes $BENTOML_HOME/prometheus_multiproc_dir when a server starts: servers sharing a home (tests run
    # two side by side) would erase each other's metrics, so each one gets its own.
    full_env["BENTOML_HOME"] = str(log_dir / f"bentoml-home-{port}")
    full_env.update(env)
    full_env["PATH"] = f"{BIN}{os.pathsep}{full_env.get('PATH', '')}"
    log_path = log_dir / f"server-{port}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [str(BIN / "bentoml"), "serve", target, "--host", "127.0.0.1", "--port", str(port)],
            cwd=cwd,
            env=full_env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(url, process, log_path, ready_path if ready else "/livez", timeout)
        yield Server(url, process, log_path)
    finally:
        stop_process_group(process)
