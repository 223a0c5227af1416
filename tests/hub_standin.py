"""A local stand-in for the Hugging Face Hub HTTP API, enough for `snapshot_download` and `upload_folder`.

The Hub cannot be reached from CI; this serves repos from folders on loopback so the real `huggingface_hub` code
paths (HF_ENDPOINT) run unchanged. Repos are `{repo_id: {filename: bytes}}` at one fixed commit each.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any


class HubStandIn:
    def __init__(self) -> None:
        self.repos: dict[str, dict[str, bytes]] = {}
        self.commits: dict[str, str] = {}
        self.requests: list[str] = []
        self.authorizations: list[str | None] = []  # the Authorization header of each write (POST)
        self.downloads_open = threading.Event()  # file downloads wait while it is clear (a slow Hub)
        self.downloads_open.set()

    def add_folder(self, repo_id: str, folder: Path) -> str:
        files = {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
        return self.set_files(repo_id, files)

    def set_files(self, repo_id: str, files: dict[str, bytes]) -> str:
        self.repos[repo_id] = files
        digest = hashlib.sha1(repo_id.encode())
        for name, data in sorted(files.items()):
            digest.update(name.encode() + data)
        self.commits[repo_id] = digest.hexdigest()
        return self.commits[repo_id]


def _handler(hub: HubStandIn) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:  # keep test output clean
            pass

        def _send(
            self, code: int, body: bytes = b"", headers: dict[str, str] | None = None, head: bool = False
        ) -> None:
            self.send_response(code)
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def _json(self, code: int, data: Any) -> None:
            self._send(code, json.dumps(data).encode(), {"Content-Type": "application/json"})

        def _not_found(self, head: bool = False) -> None:
            self._send(404, b'{"error": "Repository not found"}', {"X-Error-Code": "RepoNotFound"}, head)

        def _resolve(self, head: bool) -> None:
            hub.requests.append(f"{self.command} {self.path}")
            match = re.match(r"^/(?:api/models/)?([^/]+/[^/]+)/resolve/([^/]+)/(.+?)(?:\?.*)?$", self.path)
            if not match or match.group(1) not in hub.repos:
                return self._not_found(head)
            repo, _, name = match.groups()
            data = hub.repos[repo].get(name)
            if data is None:
                return self._send(404, b"", {"X-Error-Code": "EntryNotFound"}, head)
            if not head:
                hub.downloads_open.wait(60)
            headers = {
                "X-Repo-Commit": hub.commits[repo],
                "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
                "Content-Type": "application/octet-stream",
            }
            self._send(200, data, headers, head)

        def do_HEAD(self) -> None:
            self._resolve(head=True)

        def do_GET(self) -> None:
            if tree := re.match(r"^/api/models/([^/]+/[^/]+)/tree/", self.path):
                hub.requests.append(f"GET {self.path}")
                if tree.group(1) not in hub.repos:
                    return self._not_found()
                entries = [
                    {"type": "file", "path": n, "size": len(d), "oid": hashlib.sha1(d).hexdigest()}
                    for n, d in sorted(hub.repos[tree.group(1)].items())
                ]
                return self._json(200, entries)
            match = re.match(r"^/api/models/([^/]+/[^/]+)(?:/revision/([^/?]+))?", self.path)
            if match and "/resolve/" not in self.path:
                hub.requests.append(f"GET {self.path}")
                repo = match.group(1)
                if repo not in hub.repos:
                    return self._not_found()
                siblings = [{"rfilename": n, "size": len(d)} for n, d in sorted(hub.repos[repo].items())]
                return self._json(200, {"id": repo, "modelId": repo, "sha": hub.commits[repo], "siblings": siblings})
            self._resolve(head=False)

        def do_POST(self) -> None:
            hub.requests.append(f"POST {self.path}")
            hub.authorizations.append(self.headers.get("Authorization"))
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            # URLs the client parses back (RepoUrl, CommitInfo) must name this server, not another host.
            base = f"http://{self.headers['Host']}"
            if self.path == "/api/repos/create":
                repo = json.loads(body)
                repo_id = f"{repo.get('organization') or 'user'}/{repo['name']}"
                if repo_id in hub.repos:  # as the Hub: 409 with the URL; create_repo(exist_ok=True) accepts it
                    return self._json(409, {"error": "You already created this model repo", "url": f"{base}/{repo_id}"})
                hub.set_files(repo_id, {})
                return self._json(200, {"url": f"{base}/{repo_id}", "name": repo_id})
            if self.path == "/api/validate-yaml":  # a README.md model card is checked before the upload
                return self._json(200, {"errors": [], "warnings": []})
            if match := re.match(r"^/api/models/([^/]+/[^/]+)/preupload/([^/?]+)", self.path):
                # Every file "regular": its bytes come inline (base64) in the commit, no LFS or Xet transfer.
                files = json.loads(body)["files"]
                modes = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]
                return self._json(200, {"files": modes})
            if match := re.match(r"^/api/models/([^/]+/[^/]+)/commit/([^/?]+)", self.path):
                repo_id = match.group(1)
                if repo_id not in hub.repos:
                    return self._not_found()
                files = dict(hub.repos[repo_id])
                for line in body.decode().splitlines():
                    item = json.loads(line)
                    if item["key"] == "file":
                        files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                commit = hub.set_files(repo_id, files)
                return self._json(200, {"commitUrl": f"{base}/{repo_id}/commit/{commit}", "commitOid": commit})
            return self._not_found()

    return Handler


def served_from_hub(endpoint: str, repo_id: str, cache: Path) -> dict[str, str]:
    """A service's environment for the model `repo_id` on the stand-in at `endpoint`: online, with its own Hub cache."""
    return {"HF_MODEL_ID": repo_id, "HF_ENDPOINT": endpoint, "HF_HUB_OFFLINE": "0", "HF_HUB_CACHE": str(cache)}


@contextmanager
def running_hub() -> Iterator[tuple[HubStandIn, str]]:
    """Start the stand-in on a free loopback port; yields (hub, endpoint URL for HF_ENDPOINT)."""
    hub = HubStandIn()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(hub))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield hub, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
