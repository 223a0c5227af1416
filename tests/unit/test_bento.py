"""`bentoml build` for real (offline, private BENTOML_HOME), then what the Bento and its Dockerfile hold.

There is no container engine in CI, so the Dockerfile that `bentoml containerize` would build is checked as text,
and the Bento itself is served the way its container's entrypoint serves it (`bentoml serve $BENTO_PATH`).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from bench.server import BIN, REPO, ROUTER_ENV, Server, serve
from router.config import Settings
from tests.hub_standin import running_hub

VERSION = "test"
CPU_TORCH_INDEX = "https://download.pytorch.org/whl/cpu"


def pins(requirements: list[str]) -> dict[str, str]:
    """{normalised name: specifier} of requirement lines, e.g. huggingface_hub==2.4.0 → huggingface-hub: ==2.4.0."""
    parsed = [Requirement(line) for line in requirements]
    return {canonicalize_name(r.name): str(r.specifier) for r in parsed}


def pyproject_dependencies() -> list[str]:
    with (REPO / "pyproject.toml").open("rb") as f:
        return list(tomllib.load(f)["project"]["dependencies"])


def bentofile() -> dict[str, Any]:
    return dict(yaml.safe_load((REPO / "bentofile.yaml").read_text()))


def bentofile_envs() -> dict[str, str]:
    return {e["name"]: str(e["value"]) for e in bentofile()["envs"]}


def repo_files(folder: str) -> set[str]:
    """Files under a repo folder, relative to the repo, without bytecode caches (BentoML never ships those)."""
    files = (p.relative_to(REPO) for p in (REPO / folder).rglob("*") if p.is_file())
    return {str(p) for p in files if "__pycache__" not in p.parts}


@pytest.fixture(scope="module")
def bento_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("bentoml_home")


@pytest.fixture(scope="module")
def bento(bento_home: Path) -> Path:
    """Build once for the module; returns the Bento folder ($BENTOML_HOME/bentos/query_router/<version>)."""
    env = {k: v for k, v in os.environ.items() if k not in ROUTER_ENV}
    env.update(
        BENTOML_HOME=str(bento_home),
        BENTOML_DO_NOT_TRACK="true",
        HF_HUB_OFFLINE="1",
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",  # the venv's uv, which `bentoml build` looks for
    )
    built = subprocess.run(
        [str(BIN / "bentoml"), "build", "--version", VERSION, "--output", "tag"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert built.returncode == 0, built.stdout + built.stderr
    assert f"query_router:{VERSION}" in built.stdout
    folder = bento_home / "bentos" / "query_router" / VERSION
    assert (folder / "bento.yaml").is_file()
    return folder


# --- bentofile.yaml itself ---


def test_bentofile_packages_are_exactly_the_pyproject_dependencies() -> None:
    packages = bentofile()["python"]["packages"]
    assert len(packages) == len(pyproject_dependencies())
    assert pins(packages) == pins(pyproject_dependencies())


def test_bentofile_envs_are_router_settings_and_hold_no_secrets() -> None:
    envs = bentofile_envs()
    tooling = {"HF_HOME", "HF_HUB_DISABLE_TELEMETRY", "UV_INDEX_STRATEGY"}
    for name in set(envs) - tooling:
        assert name.lower() in Settings.model_fields, f"{name} is not a router setting (a typo is silently ignored)"
    assert not [name for name in envs if re.search(r"TOKEN|SECRET|PASSWORD|KEY", name)]
    assert not [value for value in envs.values() if value.startswith("hf_") or "@" in value]


def test_bentofile_env_defaults_are_valid_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ROUTER_ENV:
        monkeypatch.delenv(name, raising=False)
    for name, value in bentofile_envs().items():
        monkeypatch.setenv(name, value)
    settings = Settings()
    assert settings.log_format == "json"
    assert settings.cache_l1_size == 10000
    assert settings.confidence_threshold is None  # the served model's own threshold (routing.json) applies
    assert settings.hf_model_id is None  # the image serves the embedded default unless the deployment says otherwise


# --- the built Bento ---


def test_bento_yaml_names_the_service_and_its_env_defaults(bento: Path) -> None:
    info = yaml.safe_load((bento / "bento.yaml").read_text())
    assert info["service"] == "service:QueryRouter"
    assert info["name"] == "query_router" and info["entry_service"] == "query_router"
    assert {e["name"]: e["value"] for e in info["envs"]} == bentofile_envs()
    assert info["models"] == []  # weights come from the package, router/default_model or the Hub, not the store


def test_bento_source_is_the_service_and_the_router_library(bento: Path) -> None:
    src = bento / "src"
    shipped = {str(p.relative_to(src)) for p in src.rglob("*") if p.is_file()}
    # Everything the service imports or loads, and nothing else: no tests, training, bench, docs or caches.
    assert shipped == {"service.py", "bentofile.yaml"} | repo_files("router")
    for name in repo_files("router/default_model"):
        assert (src / name).read_bytes() == (REPO / name).read_bytes(), name


def test_bento_source_imports_on_its_own(bento: Path) -> None:
    """The service module imports from the Bento alone (cwd first on sys.path), as it will in the image."""
    code = "import router, service; print(router.__file__); print(service.__file__)"
    env = {k: v for k, v in os.environ.items() if k not in (*ROUTER_ENV, "PYTHONPATH")}
    done = subprocess.run(
        [str(BIN / "python"), "-c", code],
        cwd=bento / "src",
        env={**env, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    for path in done.stdout.split():
        assert Path(path).is_relative_to(bento / "src"), path


def test_bento_requirements_are_the_pins_with_the_cpu_torch_index(bento: Path) -> None:
    lines = [line.strip() for line in (bento / "env/python/requirements.txt").read_text().splitlines()]
    options = [line for line in lines if line.startswith("-")]
    requirements = [line for line in lines if line and not line.startswith(("-", "#"))]
    assert options == [f"--extra-index-url {CPU_TORCH_INDEX}"]
    assert pins(requirements) == pins(pyproject_dependencies())  # BentoML re-adds its own (same) pin; no others


# --- the Dockerfile `bentoml containerize` would build, checked statically ---


@pytest.fixture(scope="module")
def dockerfile(bento: Path) -> str:
    return (bento / "env/docker/Dockerfile").read_text()


def test_dockerfile_builds_on_python_311_debian_without_cuda(dockerfile: str) -> None:
    froms = re.findall(r"^FROM\s+(\S+)", dockerfile, flags=re.MULTILINE)
    assert froms == ["python:3.11-slim"]  # the official image is Debian-based
    assert "nvidia" not in dockerfile.lower() and "cuda" not in dockerfile.lower()
    assert "apt-get install" in dockerfile  # BentoML's debian setup


def test_dockerfile_installs_the_bento_requirements(dockerfile: str) -> None:
    assert "COPY --chown=bentoml:bentoml ./env/python ./env/python/" in dockerfile
    assert re.search(r"uv .*pip install -r \$BENTO_PATH/env/python/requirements\.txt", dockerfile)
    # The index strategy is in the environment before the install runs, so it applies to it.
    assert dockerfile.index("ENV UV_INDEX_STRATEGY=") < dockerfile.index("pip install -r")


def test_dockerfile_sets_the_env_defaults(dockerfile: str) -> None:
    args = dict(re.findall(r"^ARG (\w+)=(.*)$", dockerfile, flags=re.MULTILINE))
    envs = dict(re.findall(r"^ENV (\w+)=(.*)$", dockerfile, flags=re.MULTILINE))
    for name, value in bentofile_envs().items():
        assert args[name] == value, name  # overridable at build time (--build-arg)
        assert envs[name] == f"${name}", name
    assert envs["HF_HOME"].startswith("$")
    assert args["HF_HOME"].startswith("/home/bentoml/")  # the runtime user's home (useradd -m), writable


def test_dockerfile_serves_the_bento_on_port_3000_as_the_bentoml_user(bento: Path, dockerfile: str) -> None:
    assert re.search(r"^EXPOSE 3000$", dockerfile, flags=re.MULTILINE)
    assert re.search(r"^USER bentoml$", dockerfile, flags=re.MULTILINE)
    assert 'ENTRYPOINT [ "/home/bentoml/bento/env/docker/entrypoint.sh" ]' in dockerfile
    entrypoint = (bento / "env/docker/entrypoint.sh").read_text()
    assert 'bentoml serve "$@" "$BENTO_PATH"' in entrypoint  # the default command with no arguments
    assert "COPY --chown=bentoml:bentoml . ./" in dockerfile  # the Bento (src/) into $BENTO_PATH


# --- the Bento served as its container would serve it ---


@pytest.fixture
def served_bento(bento: Path, bento_home: Path, tmp_path: Path, fast_model: Path) -> Iterator[tuple[Server, Path]]:
    """`bentoml serve <bento>` from an unrelated folder, with the image's env defaults and HF_MODEL_ID on the
    stand-in Hub; yields (server, HF_HOME)."""
    hf_home = tmp_path / "hf_home"  # /home/bentoml/... in the image; the same variable, a writable folder here
    with running_hub() as (hub, endpoint):
        hub.add_folder("acme/router-tiny", fast_model)
        env = {
            **bentofile_envs(),
            "BENTOML_HOME": str(bento_home),
            "BENTOML_DO_NOT_TRACK": "true",
            "HF_HOME": str(hf_home),
            "HF_ENDPOINT": endpoint,
            "HF_MODEL_ID": "acme/router-tiny",
            "HF_HUB_OFFLINE": "0",
        }
        with serve(env, tmp_path, target=str(bento), cwd=tmp_path) as server:
            yield server, hf_home


@pytest.mark.integration
def test_served_bento_pulls_its_model_from_the_hub_at_start(served_bento: tuple[Server, Path], bento: Path) -> None:
    server, hf_home = served_bento
    model: dict[str, Any] = server.deep()["model"]  # type: ignore[assignment]
    assert model["source"] == "hub" and model["name"] == "acme/router-tiny"
    assert Path(model["path"]).is_relative_to(hf_home)  # the download went where HF_HOME says
    answer = server.classify("Summarize: rivers flow to the sea.").json()
    assert answer["label"] == "0" and answer["confidence"] == pytest.approx(0.9975, abs=1e-3)  # the tiny model's
    json_lines = [line for line in server.log().splitlines() if line.startswith("{")]
    assert any(json.loads(line).get("message", "").startswith("model ready") for line in json_lines)  # LOG_FORMAT
    for _ in range(50):  # the access line is written at the end of the event loop's turn that sent the answer
        access = [json.loads(line) for line in server.log().splitlines() if '"logger": "router.access"' in line]
        if len(access) == 2:
            break
        time.sleep(0.1)
    assert [(a["method"], a["path"], a["status"]) for a in access] == [
        ("GET", "/health/deep", 200),  # the probes' /health/live and /health/ready have none
        ("POST", "/v1/query-classify", 200),
    ]
    assert "Service loaded from Bento directory" in server.log()
