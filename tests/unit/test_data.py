"""Dolly records → labelled examples → split: the mapping, the input format and the split's determinism."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from router.text import format_query
from training import data

SAMPLE = Path(__file__).resolve().parents[1] / "fixtures" / "dolly_sample.jsonl"


def test_load_jsonl_reads_every_record_with_its_fields() -> None:
    records = data.load_jsonl(SAMPLE)
    assert len(records) == 59
    assert Counter(r["category"] for r in records) == {
        "open_qa": 10,
        "classification": 9,
        "general_qa": 8,
        "summarization": 8,
        "creative_writing": 6,
        "closed_qa": 6,
        "brainstorming": 6,
        "information_extraction": 6,
    }
    assert records[1] == {
        "instruction": "Which is a species of fish? Tope or Rope",
        "context": "",
        "category": "classification",
    }


def test_categories_map_to_fast_and_slow_labels_and_the_rest_is_out_of_scope() -> None:
    in_scope, out_of_scope = data.to_examples(data.load_jsonl(SAMPLE))
    by_category = {(e.category, e.label) for e in in_scope}
    assert by_category == {
        ("classification", 0),
        ("summarization", 0),
        ("creative_writing", 1),
        ("open_qa", 1),
        ("general_qa", 1),
    }
    assert Counter(e.label for e in in_scope) == {0: 17, 1: 24}
    assert {e.category for e in out_of_scope} == {"closed_qa", "brainstorming", "information_extraction"}
    assert all(e.label is None for e in out_of_scope) and len(out_of_scope) == 18


def test_example_text_is_the_services_input_format() -> None:
    records = data.load_jsonl(SAMPLE)
    summary = next(r for r in records if r["category"] == "summarization")
    in_scope, _ = data.to_examples([summary])
    assert in_scope[0].text == format_query(summary["instruction"], summary["context"])
    assert in_scope[0].text.startswith(summary["instruction"].strip() + "\n\n")


def test_split_is_deterministic_disjoint_complete_and_stratified() -> None:
    in_scope, _ = data.to_examples(data.load_jsonl(SAMPLE))
    first, again, other = data.split(in_scope, seed=7), data.split(in_scope, seed=7), data.split(in_scope, seed=8)
    assert first == again
    assert first.test != other.test
    parts = [first.train, first.validation, first.test]
    texts = [e.text for part in parts for e in part]
    assert sorted(texts) == sorted(e.text for e in in_scope)  # every example once, none twice
    assert first.sizes() == {"train": 32, "validation": 4, "test": 5}
    for part in parts:  # each part keeps both labels, near the 17:24 ratio
        assert {e.label for e in part} == {0, 1}


def test_data_hash_names_the_exact_records() -> None:
    records = data.load_jsonl(SAMPLE)
    assert data.data_hash(records) == data.data_hash(json.loads(json.dumps(records)))
    changed = [dict(records[0], instruction=records[0]["instruction"] + "?"), *records[1:]]
    assert data.data_hash(changed) != data.data_hash(records)
    assert len(data.data_hash(records)) == 64


def test_folds_test_every_example_once_and_keep_each_folds_parts_disjoint() -> None:
    in_scope, _ = data.to_examples(data.load_jsonl(SAMPLE))
    folds = list(data.folds(in_scope, k=4, seed=7))
    assert len(folds) == 4
    tested = sorted(i for indices, _ in folds for i in indices)
    assert tested == list(range(len(in_scope)))  # each example is in exactly one test part
    for indices, splits in folds:
        assert splits.test == [in_scope[i] for i in indices]
        parts = [splits.train, splits.validation, splits.test]
        assert sorted(e.text for part in parts for e in part) == sorted(e.text for e in in_scope)
        assert abs(len(splits.validation) - len(splits.test)) <= 1  # validation is the size of one fold
        assert {e.label for e in splits.test} == {0, 1}
    assert [i for i, _ in folds] == [i for i, _ in data.folds(in_scope, k=4, seed=7)]
