"""Realistic query texts: real dolly instructions (+ context), varied so that cold-cache runs really miss the cache."""

from __future__ import annotations

import random
from pathlib import Path

from router.config import Settings
from router.text import format_query
from training.data import load_jsonl

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "dolly.jsonl"
FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "dolly_sample.jsonl"
OPENERS = ("", "", "Quick question: ", "Please help: ", "Hi! ", "I need this for work. ", "Could you tell me: ")


def base_texts(path: Path | None = None) -> list[str]:
    """Every record of the shared dolly excerpt (or the test fixture in a clone without ../shared), formatted."""
    source = path or (SHARED_DATA if SHARED_DATA.exists() else FIXTURE)
    return [format_query(r["instruction"], r.get("context")) for r in load_jsonl(source)]


class QueryGenerator:
    """`next()` gives a new text: a random real query, a random opener and a random tag (unique with high odds)."""

    def __init__(self, seed: int = 0, path: Path | None = None) -> None:
        self.random = random.Random(seed)
        # Two dolly records are longer than MAX_TEXT_CHARS: they would be 422s, not load.
        limit = Settings().max_text_chars - 64  # room for the opener and the tag
        self.texts = [t for t in base_texts(path) if len(t) <= limit]

    def unique(self) -> str:
        text = self.random.choice(self.texts)
        return f"{self.random.choice(OPENERS)}{text} (ref {self.random.getrandbits(40):010x})"

    def hot_set(self, size: int) -> list[str]:
        """A fixed small set of queries, for cache scenarios."""
        return [self.random.choice(self.texts) for _ in range(size)]
