"""Publish a trained model folder to the Hugging Face Hub, so a deployment can set HF_MODEL_ID to it.

`python -m training.push_to_hub --model-dir models/router --repo-id ORG/query-router`
The token comes from HF_TOKEN or `hf auth login`; HF_ENDPOINT points at another hub (a mirror, a local stand-in).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from huggingface_hub import HfApi

from router.model import holds_model

log = logging.getLogger(__name__)

# What the service downloads (router.model.download_from_hub) plus the reports; no checkpoints or caches.
ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.md", "*.png"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", required=True, type=Path, help="Folder written by training.train.")
    parser.add_argument("--repo-id", required=True, help="Hub model repo, e.g. my-org/query-router.")
    parser.add_argument("--revision", help="Branch to push to (created when missing); default: main.")
    parser.add_argument("--private", action="store_true", help="Create the repo as private.")
    parser.add_argument("--commit-message", default="Upload query router model")
    return parser.parse_args(argv)


def push(
    model_dir: Path,
    repo_id: str,
    revision: str | None = None,
    private: bool = False,
    commit_message: str = "Upload query router model",
    api: HfApi | None = None,
) -> str:
    """Create the repo if needed, upload the folder as one commit and return the commit's URL."""
    if not holds_model(model_dir):
        raise SystemExit(f"{model_dir} holds no model (no config.json)")
    api = api or HfApi()
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    if revision:
        api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)
    commit = api.upload_folder(
        repo_id=repo_id,
        folder_path=model_dir,
        repo_type="model",
        revision=revision,
        commit_message=commit_message,
        allow_patterns=ALLOW_PATTERNS,
    )
    return str(commit.commit_url)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    url = push(args.model_dir, args.repo_id, args.revision, args.private, args.commit_message)
    log.info("pushed %s to %s", args.model_dir, url)


if __name__ == "__main__":
    main()
