"""monitoring/ is configuration as data: checked with promtool and against the metric names the code really exports.

Fast tests parse the configs and run promtool; the `integration` test starts a real router, Pushgateway and Prometheus.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from bench.server import free_port, stop_process_group
from router.config import Settings
from router.metrics import RouterMetrics
from training.pushgateway import JOB as TRAINING_JOB
from training.pushgateway import METRIC_NAMES as TRAINING_METRICS
from training.pushgateway import TrainingMetrics

REPO = Path(__file__).resolve().parents[2]
PROMETHEUS_DIR = REPO / "monitoring" / "prometheus"
DASHBOARDS_DIR = REPO / "monitoring" / "grafana" / "dashboards"
DATASOURCES = REPO / "monitoring" / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
RUNBOOK = REPO / "docs" / "operations.md"
PROMTOOL = Path("/usr/bin/promtool")
PROMETHEUS = Path("/usr/bin/prometheus")
PUSHGATEWAY = Path("/usr/bin/prometheus-pushgateway")

# Sample names a metric family of each type exposes (prometheus_client strips `_total` from counter family names).
SAMPLE_SUFFIXES = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}
PROMQL_KEYWORDS = frozenset({"and", "or", "unless", "bool", "offset", "inf", "nan"})


def router_families() -> list[Any]:
    """The metric families of the real RouterMetrics class, on a private registry."""
    registry = CollectorRegistry()
    RouterMetrics(registry)
    return list(registry.collect())


def router_metric_names() -> set[str]:
    """Every sample name RouterMetrics can expose. Derived from each family's type, because a labelled metric has
    no samples until its first `.labels()` call."""
    return {f.name + suffix for f in router_families() for suffix in SAMPLE_SUFFIXES[f.type]}


def known_metric_names() -> set[str]:
    return router_metric_names() | set(TRAINING_METRICS) | {"up"}


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects: identifiers outside strings, label matchers, ranges and grouping
    clauses that are not a call (`name(`) or a keyword."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    expr = re.sub(r"\{[^}]*\}", "{}", expr)
    expr = re.sub(r"\[[^\]]*\]", "[]", expr)
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    names = set(re.findall(r"(?<![\w$.:])([a-zA-Z_:][\w:]*)(?!\s*\(|[\w:])", expr))
    return names - PROMQL_KEYWORDS


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def dashboards() -> dict[str, dict[str, Any]]:
    return {path.name: json.loads(path.read_text()) for path in sorted(DASHBOARDS_DIR.glob("*.json"))}


def dashboard_exprs(dashboard: dict[str, Any]) -> list[str]:
    """Every PromQL expression in a dashboard: panel targets and the selector inside each label_values() variable."""
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    for variable in dashboard.get("templating", {}).get("list", []):
        query = variable.get("query")
        query = query.get("query", "") if isinstance(query, dict) else query or ""
        match = re.fullmatch(r"label_values\((.+),\s*\w+\)", query.strip())
        if match:
            exprs.append(match.group(1))
    return exprs


def all_exprs() -> dict[str, str]:
    """Where each expression lives → the expression."""
    found = {f"alerts.yml {rule['alert']}": rule["expr"] for rule in alert_rules()}
    for name, dashboard in dashboards().items():
        found.update({f"{name} #{i}": expr for i, expr in enumerate(dashboard_exprs(dashboard))})
    return found


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    if not PROMTOOL.exists():
        pytest.skip(f"{PROMTOOL} is not installed (Debian package `prometheus`)")
    return subprocess.run([str(PROMTOOL), *args], cwd=PROMETHEUS_DIR, capture_output=True, text=True, timeout=60)


# --- the metric-name extractor itself -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ('histogram_quantile(0.99, sum by (le) (rate(a_bucket{route=~"/v1/.*", x="{y}"}[5m])))', {"a_bucket"}),
        (
            "(sum(rate(hits_total[15m])) or vector(0)) / sum(rate(all_total[$__rate_interval])) < 0.1",
            {"hits_total", "all_total"},
        ),
        (
            "max by (instance) (up_a) == 0 and on (instance) sum without (pid) (increase(b[5m] offset 1h)) > 1e3",
            {"up_a", "b"},
        ),
        ('up{job="router"} == bool 0', {"up"}),
        ("sum(rate(x[1m])) by (le, instance)", {"x"}),
    ],
)
def test_metric_names_finds_selectors_only(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names


def test_router_metric_names_come_from_the_code() -> None:
    names = router_metric_names()
    assert {"router_requests_total", "router_request_duration_seconds_bucket", "router_redis_up"} <= names
    assert "router_requests" not in names and "router_batch_size" not in names


# --- every expression selects metrics that really exist -------------------------------------------------------------


def test_every_expression_uses_exported_metrics() -> None:
    known = known_metric_names()
    exprs = all_exprs()
    assert len(exprs) > 30, "expected the alerts and both dashboards"
    unknown = {where: sorted(metric_names(expr) - known) for where, expr in exprs.items() if metric_names(expr) - known}
    assert not unknown, f"expressions select metrics nobody exports: {unknown}"
    assert all(metric_names(expr) for expr in exprs.values()), "an expression without any metric"


def test_overview_dashboard_shows_every_router_metric() -> None:
    used = {n for expr in dashboard_exprs(dashboards()["router-overview.json"]) for n in metric_names(expr)}
    missing = {f.name for f in router_families() if not used & {f.name + s for s in SAMPLE_SUFFIXES[f.type]}}
    assert not missing


def test_training_dashboard_shows_every_pushed_metric_by_run_id() -> None:
    dashboard = dashboards()["router-training.json"]
    exprs = dashboard_exprs(dashboard)
    used = {n for expr in exprs for n in metric_names(expr)}
    assert set(TRAINING_METRICS) <= used
    assert [v["name"] for v in dashboard["templating"]["list"]] == ["run_id"]
    panel_exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert all('run_id=~"$run_id"' in e and f'job="{TRAINING_JOB}"' in e for e in panel_exprs)


def test_dashboards_use_the_provisioned_datasource() -> None:
    [datasource] = yaml.safe_load(DATASOURCES.read_text())["datasources"]
    assert datasource["url"] == "http://prometheus:9090"

    def datasource_uids(node: Any) -> Iterator[str]:
        if isinstance(node, dict):
            if isinstance(node.get("datasource"), dict):
                yield node["datasource"]["uid"]
            for value in node.values():
                yield from datasource_uids(value)
        elif isinstance(node, list):
            for value in node:
                yield from datasource_uids(value)

    boards = dashboards()
    assert set(boards) == {"router-overview.json", "router-training.json"}
    assert len({b["uid"] for b in boards.values()}) == len(boards)
    for board in boards.values():
        assert set(datasource_uids(board)) == {datasource["uid"]}
        ids = [p["id"] for p in board["panels"]]
        assert len(ids) == len(set(ids))


# --- Prometheus config and alerts, checked by promtool --------------------------------------------------------------


def test_promtool_check_config() -> None:
    result = promtool("check", "config", "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_check_rules() -> None:
    result = promtool("check", "rules", "alerts.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_alert_unit_tests_pass() -> None:
    result = promtool("test", "rules", "alerts_test.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_firing_and_a_quiet_unit_test() -> None:
    cases = [
        case
        for test in yaml.safe_load((PROMETHEUS_DIR / "alerts_test.yml").read_text())["tests"]
        for case in test["alert_rule_test"]
    ]
    alerts = {rule["alert"] for rule in alert_rules()}
    assert {c["alertname"] for c in cases if c["exp_alerts"]} == alerts
    assert {c["alertname"] for c in cases if not c["exp_alerts"]} == alerts


def test_required_alerts_exist() -> None:
    alerts = {rule["alert"] for rule in alert_rules()}
    assert {
        "RouterHighErrorRate",
        "RouterHighP99Latency",
        "RouterLowCacheHitRate",
        "RouterRedisDown",
        "RouterModelNotReady",
        "RouterConfidenceCollapse",
    } <= alerts


def test_every_alert_links_to_its_runbook_section() -> None:
    anchors = {
        re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
        for line in RUNBOOK.read_text().splitlines()
        if line.startswith("#")
    }
    for rule in alert_rules():
        assert rule["labels"]["severity"] in {"warning", "critical"}
        path, anchor = rule["annotations"]["runbook"].split("#")
        assert path == "docs/operations.md" and anchor in anchors, rule["alert"]


# --- a real Prometheus scraping a real router and a real Pushgateway -----------------------------------------------


def http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return 0, b""


def start(args: list[str], log: Path, ready_url: str, timeout: float, **popen: Any) -> subprocess.Popen[bytes]:
    """Start a process in its own process group and poll `ready_url` until it answers 200."""
    with log.open("wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, **popen)
    deadline = time.monotonic() + timeout
    while http_get(ready_url)[0] != 200:
        if proc.poll() is not None:
            pytest.fail(
                f"{args[0]} exited ({proc.returncode}) before {ready_url} was ready:\n{log.read_text()[-3000:]}"
            )
        if time.monotonic() > deadline:
            stop_process_group(proc, timeout=15)
            pytest.fail(f"{ready_url} not ready after {timeout:.0f} s:\n{log.read_text()[-3000:]}")
        time.sleep(0.25)
    return proc


def wait_for(check: Any, timeout: float, what: str) -> Any:
    """Poll `check` until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while not (result := check()):
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f} s waiting for {what}"
        time.sleep(0.5)
    return result


@pytest.fixture(scope="module")
def router_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`bentoml serve service:QueryRouter` from the repo root on a free port, without Redis (L2 off)."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    bentoml = str(Path(sys.executable).parent / "bentoml")
    url = f"http://127.0.0.1:{port}"
    log = tmp_path_factory.mktemp("router") / "serve.log"
    proc = start(
        [bentoml, "serve", "service:QueryRouter", "--host", "127.0.0.1", "--port", str(port)],
        log,
        f"{url}/health/ready",
        timeout=120,
        cwd=REPO,
        env=env,
    )
    yield url
    stop_process_group(proc, timeout=15)


@pytest.fixture
def pushgateway_url(tmp_path: Path) -> Iterator[str]:
    if not PUSHGATEWAY.exists():
        pytest.skip(f"{PUSHGATEWAY} is not installed (Debian package `prometheus-pushgateway`)")
    url = f"http://127.0.0.1:{free_port()}"
    proc = start(
        [
            str(PUSHGATEWAY),
            f"--web.listen-address={urllib.parse.urlsplit(url).netloc}",
            f"--persistence.file={tmp_path / 'pushgateway.data'}",
        ],
        tmp_path / "pushgateway.log",
        f"{url}/-/ready",
        timeout=30,
    )
    yield url
    stop_process_group(proc, timeout=15)


@pytest.fixture
def prometheus_url(router_url: str, pushgateway_url: str, tmp_path: Path) -> Iterator[str]:
    """A real Prometheus on loopback running the project's prometheus.yml and alerts.yml, with each job's
    targets swapped for the local processes and a 1 s scrape interval."""
    if not PROMETHEUS.exists():
        pytest.skip(f"{PROMETHEUS} is not installed (Debian package `prometheus`)")
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    config["rule_files"] = [str(PROMETHEUS_DIR / name) for name in config["rule_files"]]
    local = {"router": router_url, "pushgateway": pushgateway_url}
    for job in config["scrape_configs"]:
        job.pop("dns_sd_configs", None)
        job["static_configs"] = [{"targets": [urllib.parse.urlsplit(local[job["job_name"]]).netloc]}]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    url = f"http://127.0.0.1:{free_port()}"
    proc = start(
        [
            str(PROMETHEUS),
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address={urllib.parse.urlsplit(url).netloc}",
        ],
        tmp_path / "prometheus.log",
        f"{url}/-/ready",
        timeout=30,
    )
    yield url
    stop_process_group(proc, timeout=15)


def query(prometheus_url: str, promql: str) -> list[dict[str, Any]]:
    status, body = http_get(f"{prometheus_url}/api/v1/query?{urllib.parse.urlencode({'query': promql})}")
    assert status == 200, f"{promql}: {body.decode()}"
    return list(json.loads(body)["data"]["result"])


def values(prometheus_url: str, promql: str) -> list[float]:
    return [float(r["value"][1]) for r in query(prometheus_url, promql)]


@pytest.mark.integration
def test_prometheus_scrapes_the_router_and_the_pushgateway(
    router_url: str, pushgateway_url: str, prometheus_url: str
) -> None:
    for text in ("hi", "what is the capital of France?", "hi"):
        request = urllib.request.Request(
            f"{router_url}/v1/query-classify",
            data=json.dumps({"text": text}).encode(),
            headers={"content-type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            assert response.status == 200
    training = TrainingMetrics(pushgateway_url, run_id="test-run")
    training.set(loss=0.25, val_f1=0.9)
    assert training.push()

    classified = 'router_requests_total{job="router", route="/v1/query-classify", status="200"}'
    wait_for(lambda: values(prometheus_url, f"{classified} >= 3"), 30, "3 classify requests in Prometheus")
    ready = values(prometheus_url, "router_model_ready")  # one series per worker process (the gauge is `liveall`)
    assert ready == [1.0] * Settings().processes()
    # Both targets up (the pushgateway's first scrape can land a moment after the router's).
    assert wait_for(lambda: values(prometheus_url, "up") == [1.0, 1.0], 15, "both targets up")

    # honor_labels: the pushed job and run_id survive the scrape, as the training dashboard selects them.
    loss = f'router_training_loss{{job="{TRAINING_JOB}", run_id="test-run"}}'
    assert wait_for(lambda: values(prometheus_url, loss), 10, "the pushed loss") == [0.25]

    live = {r["metric"]["__name__"] for r in query(prometheus_url, "count by (__name__) ({__name__=~'.+'})")}
    assert not {n for n in live if n.startswith("bentoml_")}, "BentoML's path-labelled metrics are back"
    assert {n for n in live if n.startswith("router_") and not n.startswith("router_training_")} <= (
        router_metric_names()
    )

    # Every dashboard expression is valid PromQL to the real server, and the training panels find the pushed run.
    for name, dashboard in dashboards().items():
        for expr in dashboard_exprs(dashboard):
            promql = expr.replace("$__rate_interval", "1m").replace("$instance", ".*").replace("$run_id", "test-run")
            result = query(prometheus_url, promql)
            if name == "router-training.json" and "val_f1" in expr:
                assert [float(r["value"][1]) for r in result] == [0.9]

    # The project's alert rules load and evaluate without errors.
    def rules_evaluated() -> list[dict[str, Any]]:
        _, body = http_get(f"{prometheus_url}/api/v1/rules")
        rules = [r for g in json.loads(body)["data"]["groups"] for r in g["rules"]]
        return rules if rules and all(r["health"] != "unknown" for r in rules) else []

    rules = wait_for(rules_evaluated, 15, "the alert rules to be evaluated")
    assert {r["name"]: r["health"] for r in rules} == {rule["alert"]: "ok" for rule in alert_rules()}
