"""Input format, normalisation, cache keys and the confidence rule: pure functions."""

from __future__ import annotations

import re
import sys

import pytest

from router.routing import Prediction, route
from router.text import cache_key, format_query, normalize


def test_format_query_puts_context_after_a_blank_line() -> None:
    assert format_query("Summarize this.", "A long passage.") == "Summarize this.\n\nA long passage."
    assert format_query("  Why is the sky blue? ", "") == "Why is the sky blue?"
    assert format_query("Why?", None) == "Why?"


def test_normalize_collapses_whitespace_and_unicode_forms() -> None:
    assert normalize("  Hello \n\n  world\t! ") == "Hello world !"
    assert normalize("e\u0301") == normalize("\u00e9") == "\u00e9"  # NFD and NFC spell one key


def test_normalize_treats_every_unicode_whitespace_as_a_separator() -> None:
    """str.split() separates on the same characters as re's `\\s` (used before), so cache keys did not change."""
    characters = [chr(c) for c in range(sys.maxunicode + 1)]
    spaces = [c for c in characters if c.isspace()]
    assert [c for c in characters if re.fullmatch(r"\s", c)] == spaces and len(spaces) == 29
    for s in spaces:
        assert normalize(f"{s}a{s}{s}b{s}") == "a b"


def test_cache_key_depends_on_model_and_text_and_hides_the_text() -> None:
    a = cache_key("model-a", "hello")
    assert a == cache_key("model-a", "hello")
    assert a != cache_key("model-b", "hello")
    assert a != cache_key("model-a", "hello!")
    assert a.startswith("model-a:") and "hello" not in a
    assert len(a.split(":")[1]) == 64  # sha256 hex, whatever the text (even "a:b\r\nFLUSHALL")
    assert cache_key("m", "x:y\r\nFLUSHALL").count(":") == 1


@pytest.mark.parametrize(
    ("label", "confidence", "threshold", "expected"),
    [
        ("0", 0.95, 0.7, "0"),
        ("0", 0.70, 0.7, "0"),  # at the threshold stays fast
        ("0", 0.69, 0.7, "1"),  # unsure fast answer goes slow
        ("1", 0.51, 0.7, "1"),  # slow answers are never changed
        ("0", 0.99, 1.0, "1"),  # threshold 1 sends everything slow
        ("0", 0.50, 0.0, "0"),  # threshold 0 disables routing
    ],
)
def test_route(label: str, confidence: float, threshold: float, expected: str) -> None:
    assert route(Prediction(label, confidence), threshold, fast_label="0", slow_label="1") == expected


def test_the_schema_pattern_for_text_is_exactly_what_check_text_accepts() -> None:
    """The OpenAPI pattern and the server's check agree on every code point (schemathesis relies on it)."""
    import re
    import sys

    from router.api import NOT_ONLY_WHITESPACE, check_text

    pattern = re.compile(NOT_ONLY_WHITESPACE)
    for code in range(sys.maxunicode + 1):
        char = chr(code)
        if 0xD800 <= code <= 0xDFFF:
            continue  # lone surrogates are refused on their own ground
        try:
            check_text(char, 10)
            accepted = True
        except ValueError:
            accepted = False
        assert accepted == bool(pattern.search(char)), hex(code)
