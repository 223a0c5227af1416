"""`python -m training.push_to_hub` against the local Hub stand-in, and the service's download of what it pushed.

Both run as subprocesses: huggingface_hub reads HF_ENDPOINT when it is imported, so only a fresh interpreter sees
the stand-in the way a real deployment sees the Hub.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from bench.server import REPO, ROUTER_ENV
from tests.hub_standin import running_hub

TOKEN = "hf_test_token"
# What training leaves in a model folder (tests/conftest.py's tiny model) plus its reports and model card.
MODEL_FILES = {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"}
PUBLISHED_FILES = MODEL_FILES | {"training_report.json", "routing.json", "confusion_matrix.png", "README.md"}


@pytest.fixture
def model_dir(fast_model: Path, tmp_path: Path) -> Path:
    """The session's tiny model, reports, a model card, and files that must stay local."""
    folder = shutil.copytree(fast_model, tmp_path / "model")
    (folder / "training_report.json").write_text('{"eval_accuracy": 0.9}\n')
    (folder / "routing.json").write_text('{"confidence_threshold": 0.97}\n')  # the threshold travels with the model
    (folder / "confusion_matrix.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    (folder / "README.md").write_text("---\nlicense: apache-2.0\nlibrary_name: transformers\n---\n# Query router\n")
    (folder / "training_args.bin").write_bytes(b"pickled trainer state")
    (folder / "optimizer.pt").write_bytes(b"optimizer state")
    return folder


def hub_env(endpoint: str, home: Path, **extra: str) -> dict[str, str]:
    """The caller's environment without its Hub and router settings, pointed at the stand-in."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_") and k not in ROUTER_ENV}
    env.update(
        HF_ENDPOINT=endpoint,
        HF_TOKEN=TOKEN,
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_OFFLINE="0",
        HF_HOME=str(home),  # no token file, cache or config of the developer's is read or written
        **extra,
    )
    return env


def run_module(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=120, check=False
    )


def push(model_dir: Path, repo_id: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return run_module(["-m", "training.push_to_hub", "--model-dir", str(model_dir), "--repo-id", repo_id], env)


def test_push_uploads_the_model_and_the_service_downloads_it(model_dir: Path, tmp_path: Path) -> None:
    with running_hub() as (hub, endpoint):
        pushed = push(model_dir, "acme/query-router", hub_env(endpoint, tmp_path / "hf-push"))
        assert pushed.returncode == 0, pushed.stderr

        stored = hub.repos["acme/query-router"]
        assert set(stored) == PUBLISHED_FILES  # trainer state and optimizer stay local
        for name in PUBLISHED_FILES:
            assert stored[name] == (model_dir / name).read_bytes(), name
        commit = hub.commits["acme/query-router"]
        assert f"{endpoint}/acme/query-router/commit/{commit}" in pushed.stderr  # the log names the commit
        assert hub.requests == [
            "POST /api/repos/create",
            "POST /api/validate-yaml",
            "POST /api/models/acme/query-router/preupload/main",
            "POST /api/models/acme/query-router/commit/main",
        ]
        assert set(hub.authorizations) == {f"Bearer {TOKEN}"}  # the token from HF_TOKEN, on every write

        # The service's own resolution (HF_MODEL_ID) in a fresh process, as a deployment would start.
        resolve = (
            "import json; from router.config import Settings; from router.model import resolve_model; "
            "s = resolve_model(Settings()); "
            "print(json.dumps({'origin': s.origin, 'path': str(s.path), 'revision': s.revision}))"
        )
        env = hub_env(endpoint, tmp_path / "hf-serve", HF_MODEL_ID="acme/query-router")
        resolved = run_module(["-c", resolve], env)
        assert resolved.returncode == 0, resolved.stderr
        source = json.loads(resolved.stdout.strip().splitlines()[-1])

    assert source["origin"] == "hub" and source["revision"] == commit
    downloaded = Path(source["path"])
    assert downloaded.is_relative_to(tmp_path / "hf-serve")
    fetched = MODEL_FILES | {"training_report.json", "routing.json"}  # json, weights, vocab; no card or png
    assert {p.name for p in downloaded.iterdir()} == fetched
    for name in fetched:
        assert (downloaded / name).read_bytes() == (model_dir / name).read_bytes(), name


def test_push_to_an_existing_repo_commits_the_changed_files(model_dir: Path, tmp_path: Path) -> None:
    with running_hub() as (hub, endpoint):
        hub.set_files("acme/query-router", {"config.json": b"{}", "old_notes.txt": b"kept"})
        before = hub.commits["acme/query-router"]

        pushed = push(model_dir, "acme/query-router", hub_env(endpoint, tmp_path / "hf"))

        assert pushed.returncode == 0, pushed.stderr
        stored = hub.repos["acme/query-router"]
        assert stored["config.json"] == (model_dir / "config.json").read_bytes()
        assert stored["old_notes.txt"] == b"kept"  # upload_folder adds and replaces; it deletes nothing
        assert hub.commits["acme/query-router"] != before


def test_folder_without_a_model_is_refused_before_any_request(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with running_hub() as (hub, endpoint):
        pushed = push(tmp_path / "empty", "acme/query-router", hub_env(endpoint, tmp_path / "hf"))
        assert pushed.returncode != 0
        assert "holds no model" in pushed.stderr
        assert hub.requests == []


def test_standin_refuses_a_commit_to_a_missing_repo() -> None:
    """The stand-in must fail where the Hub fails, or the tests above could pass against a lenient fake."""
    with running_hub() as (hub, endpoint):
        response = httpx.post(f"{endpoint}/api/models/acme/nothing/commit/main", content=b"")
    assert response.status_code == 404
    assert "acme/nothing" not in hub.repos
