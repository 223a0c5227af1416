"""docker-compose.yml agrees with the service, the repo and the monitoring configs (no Docker needed)."""

from __future__ import annotations

import json
import shlex
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import yaml

from router.config import Settings

REPO = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((REPO / "docker-compose.yml").read_text())
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
PROMETHEUS_CONFIG = yaml.safe_load((REPO / "monitoring/prometheus/prometheus.yml").read_text())


def published(service: str) -> dict[int, int]:
    """Container port → host port, from `ports: ["HOST:CONTAINER"]`."""
    pairs = (str(p).split(":") for p in SERVICES[service].get("ports", []))
    return {int(container): int(host) for host, container in pairs}


def bind_mounts(service: str) -> dict[PurePosixPath, Path]:
    """Container path → repo path, for the `./host:/container[:mode]` volumes of a service."""
    mounts = {}
    for volume in SERVICES[service].get("volumes", []):
        source, target, *_ = volume.split(":")
        if source.startswith("."):
            mounts[PurePosixPath(target)] = (REPO / source).resolve()
    return mounts


def repo_path(service: str, container_path: str) -> Path:
    """The repo file a container path of `service` comes from, through its bind mounts."""
    path = PurePosixPath(container_path)
    for target, source in bind_mounts(service).items():
        if path == target or target in path.parents:
            return source / path.relative_to(target)
    raise AssertionError(f"{container_path} is not bind-mounted into {service}")


def command(service: str) -> list[str]:
    cmd = SERVICES[service]["command"]
    return shlex.split(cmd) if isinstance(cmd, str) else [str(c) for c in cmd]


def test_services_and_images() -> None:
    images = {name: s["image"] for name, s in SERVICES.items()}
    assert set(images) == {"router", "redis", "prometheus", "pushgateway", "grafana"}
    assert images["router"] == "query-router:latest"
    assert images["redis"] == "redis:7-alpine"
    assert images["prometheus"].startswith("prom/prometheus")
    assert images["pushgateway"].startswith("prom/pushgateway")
    assert images["grafana"].startswith("grafana/grafana")


def test_published_ports() -> None:
    assert published("router") == {3000: 3000}
    assert published("grafana") == {3000: 3001}
    assert published("pushgateway") == {9091: 9091}
    assert published("prometheus") == {9090: 9090}
    assert published("redis") == {}, "Redis is internal to the stack"


def test_router_environment() -> None:
    env = SERVICES["router"]["environment"]
    assert env == {"REDIS_URL": "redis://redis:6379/0", "HF_MODEL_ID": "${HF_MODEL_ID:-}", "LOG_FORMAT": "json"}
    assert {name.lower() for name in env} <= set(Settings.model_fields), "every variable is a router setting"
    redis = urlsplit(env["REDIS_URL"])
    assert redis.hostname in SERVICES and redis.port == 6379


def test_router_healthcheck_probes_readiness() -> None:
    check = SERVICES["router"]["healthcheck"]
    probe = " ".join(check["test"])
    assert "http://localhost:3000/health/ready" in probe
    assert check["start_period"], "model loading (a Hub download) must not count as failures"


def test_redis_is_a_bounded_cache_without_persistence() -> None:
    args = command("redis")
    assert args[0] == "redis-server"
    options = dict(zip(args[1::2], args[2::2], strict=True))
    assert options == {
        "--maxmemory": "256mb",
        "--maxmemory-policy": "allkeys-lru",
        "--save": "",
        "--appendonly": "no",
    }


def test_bind_mounted_host_paths_exist_and_named_volumes_are_declared() -> None:
    for name, service in SERVICES.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (REPO / source).exists(), f"{name}: {source} is not in the repo"
            else:
                assert source in COMPOSE.get("volumes", {}), f"{name}: named volume {source} is not declared"


def test_prometheus_loads_the_repo_config() -> None:
    [config_flag] = [a for a in command("prometheus") if a.startswith("--config.file=")]
    config = repo_path("prometheus", config_flag.split("=", 1)[1])
    assert config == (REPO / "monitoring/prometheus/prometheus.yml").resolve()
    for rule_file in PROMETHEUS_CONFIG["rule_files"]:
        assert (config.parent / rule_file).exists()


def test_prometheus_scrape_targets_are_compose_services() -> None:
    targets = []
    for job in PROMETHEUS_CONFIG["scrape_configs"]:
        for static in job.get("static_configs", []):
            targets += [(job["job_name"], *t.rsplit(":", 1)) for t in static["targets"]]
        for dns in job.get("dns_sd_configs", []):
            targets += [(job["job_name"], n, dns["port"]) for n in dns["names"]]
    assert {job for job, _, _ in targets} == {"router", "pushgateway"}
    for job, host, port in targets:
        assert host in SERVICES, f"{job}: {host} is not a compose service"
        assert int(port) in published(host), f"{job}: {host} does not listen on {port}"


def test_pushgateway_job_keeps_pushed_labels() -> None:
    [job] = [j for j in PROMETHEUS_CONFIG["scrape_configs"] if j["job_name"] == "pushgateway"]
    assert job["honor_labels"] is True


def test_grafana_provisioning_matches_mounts() -> None:
    provisioning = repo_path("grafana", "/etc/grafana/provisioning")
    [datasource] = yaml.safe_load((provisioning / "datasources/prometheus.yml").read_text())["datasources"]
    url = urlsplit(datasource["url"])
    assert url.hostname in SERVICES and url.port in published(url.hostname)

    [provider] = yaml.safe_load((provisioning / "dashboards/dashboards.yml").read_text())["providers"]
    dashboards = repo_path("grafana", provider["options"]["path"])
    assert dashboards == (REPO / "monitoring/grafana/dashboards").resolve()
    assert sorted(p.name for p in dashboards.glob("*.json")) == ["router-overview.json", "router-training.json"]

    env = SERVICES["grafana"]["environment"]
    home = repo_path("grafana", env["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"])
    assert json.loads(home.read_text())["uid"] == "query-router-overview"
    assert env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
