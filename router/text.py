"""Text handling shared by training and serving, so the model sees the same input in both."""

from __future__ import annotations

import hashlib
import unicodedata


def format_query(instruction: str, context: str | None = None) -> str:
    """Model input for a dolly record: the instruction, then the context (if any) after a blank line.

    Users of the service send this same shape as `text`: the request first, the passage it refers to after it.
    """
    instruction = instruction.strip()
    context = (context or "").strip()
    return f"{instruction}\n\n{context}" if context else instruction


def normalize(text: str) -> str:
    """Canonical form of a query: Unicode NFC, whitespace runs collapsed to one space, trimmed.

    BERT-family tokenizers split on whitespace, so this changes nothing the model sees; it is what both the model
    and the cache key are computed from, so two texts with one key always get one answer.
    """
    return " ".join(unicodedata.normalize("NFC", text).split())  # split(): runs of str.isspace(), like re's \s


def cache_key(model_identity: str, normalized_text: str) -> str:
    """Key of a prediction: the model's identity and a SHA-256 of the text, so no client text reaches a Redis key."""
    digest = hashlib.sha256(normalized_text.encode("utf-8", "surrogatepass")).hexdigest()
    return f"{model_identity}:{digest}"
