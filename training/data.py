"""databricks-dolly-15k records → labelled router examples → a stratified, seeded train/validation/test split.

A record's category decides its label; categories outside the two classes are kept apart for an out-of-scope
report instead of being forced into either path. The model input is `router.text.format_query`, the same function
the service's users follow, so training and serving see one format.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from sklearn.model_selection import StratifiedKFold, train_test_split

from router.text import format_query

HUB_DATASET = "databricks/databricks-dolly-15k"
FAST, SLOW = 0, 1
CATEGORY_LABELS: dict[str, int] = {
    "classification": FAST,
    "summarization": FAST,
    "creative_writing": SLOW,
    "open_qa": SLOW,
    "general_qa": SLOW,
}
ID2LABEL: dict[int, str] = {FAST: "0", SLOW: "1"}
LABEL2ID: dict[str, int] = {name: i for i, name in ID2LABEL.items()}


@dataclass(frozen=True)
class Example:
    """One model input; `label` is None for a category outside the two classes."""

    text: str
    label: int | None
    category: str


@dataclass(frozen=True)
class Splits:
    train: list[Example]
    validation: list[Example]
    test: list[Example]

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "validation": len(self.validation), "test": len(self.test)}


def load_jsonl(path: str | Path) -> list[dict[str, str]]:
    """Dolly records from a JSONL file (one object a line with instruction, context, category)."""
    with open(path, encoding="utf-8") as handle:
        return [_record(json.loads(line)) for line in handle if line.strip()]


def load_hub(name: str = HUB_DATASET, revision: str | None = None) -> list[dict[str, str]]:
    """Dolly records from the Hugging Face Hub (needs internet; honours HF_ENDPOINT and the datasets cache)."""
    from datasets import load_dataset

    dataset = load_dataset(name, split="train", revision=revision)
    return [_record(row) for row in dataset]


def load_records(data: str | Path | None) -> list[dict[str, str]]:
    """A local JSONL file when given, else the Hub dataset."""
    return load_jsonl(data) if data else load_hub()


def _record(row: dict[str, str]) -> dict[str, str]:
    return {"instruction": row["instruction"], "context": row.get("context") or "", "category": row["category"]}


def to_examples(records: list[dict[str, str]]) -> tuple[list[Example], list[Example]]:
    """(in-scope examples with labels, out-of-scope examples without) in record order."""
    in_scope: list[Example] = []
    out_of_scope: list[Example] = []
    for record in records:
        label = CATEGORY_LABELS.get(record["category"])
        example = Example(format_query(record["instruction"], record["context"]), label, record["category"])
        (in_scope if label is not None else out_of_scope).append(example)
    return in_scope, out_of_scope


def split(examples: list[Example], seed: int, validation: float = 0.1, test: float = 0.1) -> Splits:
    """Stratified by label and seeded, so the same data and seed always give the same three parts."""
    labels = [example.label for example in examples]
    rest, test_part = train_test_split(examples, test_size=test, random_state=seed, stratify=labels)
    rest_labels = [example.label for example in rest]
    train_part, validation_part = train_test_split(
        rest, test_size=validation / (1 - test), random_state=seed, stratify=rest_labels
    )
    return Splits(train=train_part, validation=validation_part, test=test_part)


def folds(examples: list[Example], k: int, seed: int) -> Iterator[tuple[list[int], Splits]]:
    """Stratified k-fold: each fold is the test part once, and a validation part the same size is held out of the rest.

    Yields the test part's indices into `examples` with the three parts, so out-of-fold predictions can be put back
    in record order.
    """
    labels = [example.label for example in examples]
    for rest, test_part in StratifiedKFold(k, shuffle=True, random_state=seed).split(examples, labels):
        train_part, validation_part = train_test_split(
            list(rest), test_size=1 / (k - 1), random_state=seed, stratify=[labels[i] for i in rest]
        )
        yield (
            test_part.tolist(),
            Splits(
                train=[examples[i] for i in train_part],
                validation=[examples[i] for i in validation_part],
                test=[examples[i] for i in test_part],
            ),
        )


def data_hash(records: list[dict[str, str]]) -> str:
    """SHA-256 of the records in canonical JSON, so a report names exactly the data it was made from."""
    digest = hashlib.sha256()
    for record in records:
        digest.update(json.dumps(record, sort_keys=True, ensure_ascii=False).encode("utf-8"))
        digest.update(b"\n")
    return digest.hexdigest()
