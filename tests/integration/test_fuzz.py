"""Property-based attacks on the running service: whatever a client sends, the answer is a valid classification or a
4xx in the documented error shape — never a 5xx — and rejected requests leave nothing in the cache."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import Server, serve

pytestmark = pytest.mark.integration

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=50),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, fast_model: Path) -> Iterator[Server]:
    with serve({"MODEL_PATH": str(fast_model)}, tmp_path_factory.mktemp("fuzz")) as running:
        yield running


def check(response: httpx.Response) -> None:
    assert response.status_code < 500, response.text
    body = response.json()
    if response.status_code == 200:
        assert body["label"] in ("0", "1") and 0.0 <= body["confidence"] <= 1.0
    else:
        assert set(body) == {"error"} and body["error"]["code"] == response.status_code
        assert body["error"]["message"]


def post(server: Server, content: bytes, content_type: str = "application/json") -> httpx.Response:
    return httpx.post(
        f"{server.url}/v1/query-classify", content=content, headers={"content-type": content_type}, timeout=30
    )


@FUZZ
@given(text=st.text(alphabet=st.characters(codec=None, categories=None), max_size=3000))
def test_any_unicode_text(server: Server, text: str) -> None:
    """Control characters, NUL, emoji, RTL marks, lone surrogates (escaped in JSON), very long strings."""
    check(post(server, json.dumps({"text": text}, ensure_ascii=True).encode()))


@FUZZ
@given(body=JSON)
def test_any_json_body(server: Server, body: object) -> None:
    entries = server.deep()["cache"]["l1_entries"]  # type: ignore[index]
    response = post(server, json.dumps(body).encode())
    check(response)
    if response.status_code != 200:
        assert server.deep()["cache"]["l1_entries"] == entries  # type: ignore[index]


@FUZZ
@given(raw=st.binary(max_size=2000), content_type=st.sampled_from(["application/json", "text/plain", ""]))
def test_any_bytes(server: Server, raw: bytes, content_type: str) -> None:
    check(post(server, raw, content_type))


@FUZZ
@given(extra=st.dictionaries(st.text(min_size=1, max_size=10).filter(lambda k: k not in ("text", "request_id")), JSON))
def test_extra_fields_are_ignored(server: Server, extra: dict[str, object]) -> None:
    response = post(server, json.dumps({"text": "What is a cloud?", **extra}).encode())
    assert response.status_code == 200


@pytest.mark.parametrize("depth", [100, 1000, 20000])
def test_deeply_nested_json(server: Server, depth: int) -> None:
    check(post(server, b'{"text": ' + b"[" * depth + b"]" * depth + b"}"))


def test_huge_body_is_rejected_before_it_is_read(server: Server) -> None:
    response = post(server, b'{"text": "' + b"a" * 5_000_000 + b'"}')
    assert response.status_code == 413
