"""locustfile.py's scenarios, run headless against a real service as its docstring tells users to: each one is
selectable by user class and by tag, answers without a failure, and the run writes its CSV and HTML reports."""

from __future__ import annotations

import csv
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
LOCUST = Path(sys.executable).with_name("locust")


def requests_by_name(stats_csv: Path) -> dict[str, tuple[int, int]]:
    """(requests, failures) per request name, from locust's `<prefix>_stats.csv`, without the Aggregated row."""
    with stats_csv.open() as f:
        rows = list(csv.DictReader(f))
    return {r["Name"]: (int(r["Request Count"]), int(r["Failure Count"])) for r in rows if r["Name"] != "Aggregated"}


@pytest.mark.parametrize(
    ("selection", "scenarios"),
    [
        (["BaselineUser", "StressUser"], {"baseline", "stress"}),
        (["--tags", "cache", "batch"], {"cache", "batch"}),
    ],
)
def test_scenarios_run_headless_with_reports(
    server_factory: Callable[..., Any], tmp_path: Path, selection: list[str], scenarios: set[str]
) -> None:
    if not LOCUST.exists():
        pytest.skip("locust is not installed (pip install -e '.[load]')")
    with server_factory({}) as server:
        hits_before = server.metric("router_cache_hits_total", level="l1")
        prefix = tmp_path / "report"
        headless = ["--headless", "-u", "6", "-r", "6", "-t", "4s", "--only-summary"]
        reports = ["--csv", str(prefix), "--html", f"{prefix}.html"]
        run = subprocess.run(
            [str(LOCUST), "-f", "locustfile.py", "--host", server.url, *headless, *reports, *selection],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]  # locust exits 1 on any failure
        counts = requests_by_name(Path(f"{prefix}_stats.csv"))
        assert set(counts) == {f"/v1/query-classify [{s}]" for s in scenarios}, counts
        for name, (requests, failures) in counts.items():
            assert requests > 0 and failures == 0, (name, requests, failures)
        assert "/v1/query-classify" in Path(f"{prefix}.html").read_text()
        if "cache" in scenarios:  # a hot set of 50 queries: after its first round, answers come from L1
            assert server.metric("router_cache_hits_total", level="l1") > hits_before
