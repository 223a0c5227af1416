"""The ONNX graph cache: a restart reads the exported graph instead of exporting again, and never trusts a bad entry."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from router.config import Settings
from router.inference import Classifier
from router.model import ModelLoadError, ModelSource, resolve_model

REPO = Path(__file__).resolve().parents[2]
QUERIES = [
    "Write a short poem about autumn leaves falling.",
    "Classify each of the following as a mammal or a bird: dog, eagle, whale, sparrow",
    "Summarize the following paragraph.\n\nThe Amazon is the largest rainforest on Earth. It spans nine "
    "countries and is home to millions of species of insects, plants, birds and other forms of life.",
]
# A fresh interpreter, as at a restart: load the default model, report the answers and what it had to import.
RESTART = """
import json, sys
from router.config import Settings
from router.inference import Classifier
from router.model import resolve_model
settings = Settings()
classifier = Classifier.load(resolve_model(settings), settings)
answers = [[p.label, p.confidence] for p in classifier.predict(json.loads(sys.argv[1]))]
print(json.dumps({"answers": answers, "imported": sorted({"torch", "peft"} & set(sys.modules))}))
"""


def answers(source: ModelSource, cache: Path | str, backend: str = "onnx-int8") -> list[tuple[str, float]]:
    settings = Settings(onnx_cache_dir=str(cache), model_backend=backend)  # type: ignore[arg-type]
    return [(p.label, p.confidence) for p in Classifier.load(source, settings).predict(QUERIES)]


def start(cache: Path) -> dict[str, Any]:
    """RESTART in a fresh interpreter with `cache` as ONNX_CACHE_DIR, on the default model."""
    env = {**os.environ, "ONNX_CACHE_DIR": str(cache), "PYTHONPATH": str(REPO)}
    for name in ("MODEL_PATH", "HF_MODEL_ID", "MODEL_BACKEND"):
        env.pop(name, None)
    out = subprocess.run(
        [sys.executable, "-c", RESTART, json.dumps(QUERIES)], env=env, capture_output=True, text=True, check=True
    )
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def test_neither_a_first_start_nor_a_restart_imports_torch(tmp_path: Path) -> None:
    """The first start exports in a child process (torch stays out of the serving process, and so does its memory);
    a restart reads the entry."""
    first = start(tmp_path)
    entries = list(tmp_path.iterdir())
    assert len(entries) == 1 and {p.name for p in entries[0].iterdir()} == {"model.onnx", "meta.json", "tokenizer"}
    restarted = start(tmp_path)
    assert first["imported"] == restarted["imported"] == []  # neither torch nor peft
    assert list(tmp_path.iterdir()) == entries  # read, not written again
    exported = answers(resolve_model(Settings()), "")  # no cache: exported in this process, the same answers
    assert [(label, pytest.approx(c, abs=1e-6)) for label, c in exported] == [tuple(a) for a in first["answers"]]
    assert first["answers"] == restarted["answers"]
    assert [label for label, _ in exported] == ["1", "0", "0"]


def test_an_unreadable_entry_is_exported_again(
    fast_model: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    source = ModelSource(path=fast_model, origin="path", name="tiny")
    first = answers(source, tmp_path)
    (entry,) = tmp_path.iterdir()
    size = (entry / "model.onnx").stat().st_size
    (entry / "model.onnx").write_bytes(b"not a graph")  # a truncated write, a disk error
    with caplog.at_level(logging.WARNING, logger="router.onnx_graph"):
        assert answers(source, tmp_path) == first
    assert "unusable" in caplog.text
    assert (entry / "model.onnx").stat().st_size == size
    answers(source, tmp_path, backend="onnx")  # fp32 and int8 graphs answer differently: separate entries
    assert len(list(tmp_path.iterdir())) == 2


def test_workers_starting_together_export_once(
    fast_model: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A server's workers load side by side: one exports, the other waits for its entry and reads it."""
    source = ModelSource(path=fast_model, origin="path", name="tiny")
    with caplog.at_level(logging.INFO, logger="router.onnx_graph"), ThreadPoolExecutor(2) as pool:
        both = list(pool.map(lambda _: answers(source, tmp_path), range(2)))
    assert both[0] == both[1]
    assert caplog.text.count("ONNX graph exported and cached") == 1
    assert caplog.text.count("ONNX graph read from cache") == 2  # the exporter reads what its child wrote, too
    assert "not cached" not in caplog.text
    assert len(list(tmp_path.iterdir())) == 1  # one entry, no staging folder left behind


def test_an_unwritable_cache_dir_costs_only_the_export(
    fast_model: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    source = ModelSource(path=fast_model, origin="path", name="tiny")
    with caplog.at_level(logging.WARNING, logger="router.onnx_graph"):
        cached = answers(source, blocker / "cache")
    assert "not writable" in caplog.text
    assert cached == answers(source, "")  # and an empty ONNX_CACHE_DIR exports every time, writing nothing
    assert [label for label, _ in cached] == ["0", "0", "0"]


def test_a_model_the_export_child_cannot_load_fails_with_its_reason(fast_model: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((fast_model / "config.json").read_text())
    (broken / "model.safetensors").write_bytes(b"this is not a safetensors file")
    with pytest.raises(ModelLoadError, match=r"to ONNX failed \(export\): ModelLoadError: .* could not be loaded"):
        answers(ModelSource(path=broken, origin="path", name="broken"), tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []  # no entry, no staging folder
