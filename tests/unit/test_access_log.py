"""router.logs.AccessLog: the shape of its lines in both formats, and one write per turn of the event loop."""

from __future__ import annotations

import asyncio
import io
import json
import re
from typing import Any

from router.logs import AccessLog

CONSOLE_LINE = re.compile(
    r'^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO router\.access: (\S+) "(\w+) (\S+)" (\d{3}) (\d+\.\d{3})ms$'
)


class CountingStream(io.BytesIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, data: Any) -> int:
        self.writes += 1
        return super().write(data)


def http_scope(raw_path: bytes = b"/v1/query-classify", query: bytes = b"", client: Any = ("10.0.0.7", 51234)) -> Any:
    path = raw_path.decode().replace("%0A", "\n")  # what uvicorn makes of it
    return {
        "type": "http",
        "method": "POST",
        "path": path,
        "raw_path": raw_path,
        "query_string": query,
        "client": client,
    }


def test_the_lines_of_one_turn_are_written_together_once_it_ends() -> None:
    stream = CountingStream()
    log = AccessLog(json_lines=False, stream=stream)

    async def two_requests_in_one_turn() -> None:
        log.request(http_scope(), 200, 0.4567)
        log.request(http_scope(client=None), 503, 12.0)
        assert stream.getvalue() == b""
        await asyncio.sleep(0)

    asyncio.run(two_requests_in_one_turn())
    lines = [CONSOLE_LINE.match(line) for line in stream.getvalue().decode().splitlines()]
    assert stream.writes == 1
    assert [m.groups() if m else None for m in lines] == [
        ("10.0.0.7:51234", "POST", "/v1/query-classify", "200", "0.457"),
        ("-", "POST", "/v1/query-classify", "503", "12.000"),
    ]


def test_a_json_line_has_each_field_and_the_path_as_sent() -> None:
    stream = io.BytesIO()
    log = AccessLog(json_lines=True, stream=stream)

    async def one_request() -> None:
        log.request(http_scope(b"/v1/x%0Ay", query=b"a=1&b=\xc3\xa9&c=\xff"), 404, 1.23456)
        await asyncio.sleep(0)

    asyncio.run(one_request())
    [line] = stream.getvalue().decode().splitlines()  # the %-encoded newline did not split it
    record = json.loads(line)
    assert set(record) == {"time", "level", "logger", "message", "client", "method", "path", "status", "latency_ms"}
    assert record["level"] == "INFO" and record["logger"] == "router.access"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", record["time"])  # as JsonFormatter writes it
    assert (record["client"], record["method"], record["status"], record["latency_ms"]) == (
        "10.0.0.7:51234",
        "POST",
        404,
        1.235,
    )
    assert record["path"] == "/v1/x%0Ay?a=1&b=\u00e9&c=\\xff"  # UTF-8 read as such, any other byte as \\xNN
    assert record["message"] == f'10.0.0.7:51234 "POST {record["path"]}" 404 1.235ms'


def test_a_closed_stream_loses_the_lines_not_the_request() -> None:
    stream = io.BytesIO()
    stream.close()
    log = AccessLog(json_lines=False, stream=stream)

    async def one_request() -> None:
        log.request(http_scope(), 200, 1.0)
        log.flush()  # what the loop calls at the end of the turn; it must not raise into the loop

    asyncio.run(one_request())
    assert log.pending == []
