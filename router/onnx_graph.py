"""The model as an ONNX Runtime session: exported (and int8-quantized) once, then read from disk on later starts.

Exporting and quantizing took about 3.5 s of a 15 s start, and importing what they need (torch, peft, torch.onnx,
onnxruntime.quantization) most of the rest. So the exported graph, the tokenizer and the labels are kept in
`ONNX_CACHE_DIR`, under a key made of the model's content hash and the versions of every library that shaped the
graph: a start that finds its entry imports neither torch nor peft (docs/performance.md has the times). An entry
is written whole or not at all (a folder renamed into place), and one that cannot be read is exported again.

An entry is made by child processes (`python -m router.onnx_graph`), so the serving worker never imports torch:
exported in the worker, torch and the export's buffers stayed in it until a restart (644 MiB against 208 MiB for a
worker that read the entry). One child exports, the next quantizes: in one process the quantization's 175 MiB came
on top of the export's 750, and a first start of two workers peaked above 1.1 GiB.
"""

from __future__ import annotations

import fcntl
import hashlib
import inspect
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

ENTRY_FORMAT = 2  # bump when what an entry holds, or how it is exported, changes (2: eager attention)
# Libraries whose version can change the exported graph, the quantized weights or the tokenizer's output.
GRAPH_LIBRARIES = ("torch", "transformers", "peft", "onnx", "onnxruntime", "tokenizers")
# Texts the cached tokenizer must encode exactly like the model's own before an entry is written.
PROBE_TEXTS = [
    "Classify each of the following as a mammal or a bird: dog, eagle, whale",
    "Summarize this.\n\nThe Amazon is the largest rainforest on Earth, spanning nine countries.",
    "ÀÉÎ Ñ straße 中文 😀 \u202e",
    "",
    "word " * 300,
]


@dataclass
class OnnxModel:
    """What serving needs from an exported model."""

    session: Any  # onnxruntime.InferenceSession
    tokenizer: Any
    input_names: list[str]
    labels: dict[int, str]


def entry_key(identity: str) -> str:
    """Cache key: the model's identity (content hash, backend, max length) and the graph libraries' versions."""
    versions = []
    for name in GRAPH_LIBRARIES:
        try:
            versions.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{name}:absent")
    return hashlib.sha256(f"{ENTRY_FORMAT}:{identity}:{','.join(versions)}".encode()).hexdigest()[:24]


def open_session(path: Path, threads: int) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # idle threads must not steal CPU
    # ORT fuses each residual Add + LayerNormalization into SkipLayerNormalization, whose CPU kernel took 5x the time
    # of the two ops it replaces: without the fusion a forward pass ran 1.15x the queries/s (docs/performance.md).
    return ort.InferenceSession(
        str(path), options, providers=["CPUExecutionProvider"], disabled_optimizers=["SkipLayerNormFusion"]
    )


def load_onnx_model(source: Any, identity: str, int8: bool, threads: int, cache_dir: str) -> OnnxModel:
    """The session for `source` (a `router.model.ModelSource`): from the cache entry when one is usable, else
    exported now (and stored, when `cache_dir` is set and writable)."""
    if not cache_dir:
        return export_uncached(source, int8, threads)
    entry = Path(cache_dir).expanduser() / entry_key(identity)
    if entry.is_dir():
        try:
            return read_entry(entry, threads)
        except Exception as exc:  # a truncated file, a half-deleted folder: export again, replace the entry
            log.warning("ONNX cache entry %s unusable (%s: %s); exporting again", entry, type(exc).__name__, exc)
            shutil.rmtree(entry, ignore_errors=True)
    with export_lock(entry):
        if entry.is_dir():  # another worker of this server exported it while this one waited
            return read_entry(entry, threads)
        return export_into_cache(source, entry, int8, threads)


def export_uncached(source: Any, int8: bool, threads: int) -> OnnxModel:
    with tempfile.TemporaryDirectory(prefix="query-router-onnx-") as tmp:  # the session keeps the graph
        return export(source, Path(tmp), int8, threads)


@contextmanager
def export_lock(entry: Path) -> Iterator[None]:
    """One export at a time per cache folder (a lock on the folder itself): a server's workers start together, and
    without it each exported the same graph, side by side, at twice the CPU and memory of one. No folder: no lock."""
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        folder = os.open(entry.parent, os.O_RDONLY)
    except OSError:
        yield
        return
    try:
        fcntl.flock(folder, fcntl.LOCK_EX)  # released when the descriptor closes
        yield
    finally:
        os.close(folder)


def export_into_cache(source: Any, entry: Path, int8: bool, threads: int) -> OnnxModel:
    """Export into a staging folder in a child process, then rename it into place as `entry` and read it
    (export_lock made the folder if it could)."""
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{entry.name}-{uuid.uuid4().hex[:8]}-", dir=entry.parent))
    except OSError as exc:
        log.warning("ONNX_CACHE_DIR %s not writable (%s); exporting without caching", entry.parent, exc)
        return export_uncached(source, int8, threads)
    try:
        if not export_in_child(source, staging, int8):
            log.warning("tokenizer of %s does not round-trip through tokenizer.json; graph not cached", source.path)
            return export(source, staging, int8, threads)
        try:
            staging.rename(entry)  # atomic: a reader never sees half an entry
            log.info("ONNX graph exported and cached in %s", entry)
        except OSError as exc:  # another worker renamed its entry first, or the disk is full
            log.warning("ONNX graph not cached in %s: %s", entry, exc)
            return read_entry(staging, threads)  # the session holds the graph once read: the folder can go
        return read_entry(entry, threads)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


NOT_ROUND_TRIP = 3  # the child's exit status when the entry is written but its tokenizer differs from the model's


def export_in_child(source: Any, folder: Path, int8: bool) -> bool:
    """The entry's files in `folder`, made by child processes; False when the saved tokenizer does not encode like
    the model's own (the entry must not be read then). Raises ModelLoadError with a child's last line on failure."""
    described = {k: str(v) if isinstance(v, Path) else v for k, v in vars(source).items()}
    if run_child(source, "export", str(folder), json.dumps(described)) == NOT_ROUND_TRIP:
        return False  # the caller exports again in-process: quantizing this graph would be wasted
    if int8:
        run_child(source, "quantize", str(folder))
    return True


def run_child(source: Any, *arguments: str) -> int:
    from router.model import ModelLoadError

    package_root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(
        [sys.executable, "-m", "router.onnx_graph", *arguments], env=env, capture_output=True, text=True
    )
    if done.returncode < 0:  # the kernel's OOM killer, most likely: the export peaks at about 0.75 GiB
        raise ModelLoadError(f"exporting {source.path} to ONNX failed ({arguments[0]}): signal {-done.returncode}")
    if done.returncode not in (0, NOT_ROUND_TRIP):
        lines = done.stderr.strip().splitlines() or [f"exit status {done.returncode}"]
        raise ModelLoadError(f"exporting {source.path} to ONNX failed ({arguments[0]}): {lines[-1]}")
    return done.returncode


def export(source: Any, folder: Path, int8: bool, threads: int) -> OnnxModel:
    """Export in this process, for a graph that is not cached: the session, the model's own tokenizer, the labels."""
    tokenizer = export_graph(source, folder)
    if int8:
        quantize(folder)
    return entry_model(folder, json.loads((folder / "meta.json").read_text()), threads, tokenizer)


def export_graph(source: Any, folder: Path) -> Any:
    """Export to ONNX (dynamic batch and sequence axes) and write the entry's files; returns the model's tokenizer."""
    import torch

    from router.model import load_model

    model, tokenizer = load_model(source)
    # Eager attention exports as plain MatMul/Softmax. PyTorch's SDPA exports with an IsNaN/Where pass over every
    # layer's attention weights, 13 % of a forward pass: eager ran 1.2x the queries/s (docs/performance.md).
    model.set_attn_implementation("eager")
    # Graph inputs follow forward()'s parameter order, and input_names are given positionally: keep that order.
    names = [p for p in inspect.signature(model.forward).parameters if p in tokenizer.model_input_names]
    example = tokenizer(["warm-up query", "a second, longer warm-up query"], padding=True, return_tensors="pt")
    axes = {name: {0: "batch", 1: "sequence"} for name in names} | {"logits": {0: "batch"}}
    torch.onnx.export(
        model, (), str(folder / "model.onnx"), kwargs={n: example[n] for n in names}, input_names=names,
        output_names=["logits"], dynamic_axes=axes, opset_version=17, dynamo=False,
    )  # fmt: skip
    labels = {int(i): str(name) for i, name in model.config.id2label.items()}
    if getattr(tokenizer, "is_fast", False):
        tokenizer.save_pretrained(folder / "tokenizer")
    meta = {
        "format": ENTRY_FORMAT,
        "input_names": names,
        "labels": labels,
        "tokenizer_inputs": tokenizer.model_input_names,
    }
    (folder / "meta.json").write_text(json.dumps(meta, indent=1))
    return tokenizer


def quantize(folder: Path) -> None:
    """The entry's graph with int8 weights (per channel) in place of its fp32 ones."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    int8 = folder / "model.int8.onnx"
    quantize_dynamic(folder / "model.onnx", int8, weight_type=QuantType.QInt8, per_channel=True)
    int8.replace(folder / "model.onnx")


def read_entry(entry: Path, threads: int) -> OnnxModel:
    """Everything from the entry: the graph, the tokenizer as a generic fast tokenizer (no model class, so no torch
    import), the labels."""
    meta = json.loads((entry / "meta.json").read_text())
    if meta["format"] != ENTRY_FORMAT:
        raise ValueError(f"entry format {meta['format']}, expected {ENTRY_FORMAT}")
    model = entry_model(entry, meta, threads, cached_tokenizer(entry, meta["tokenizer_inputs"]))
    log.info("ONNX graph read from cache %s", entry)
    return model


def entry_model(folder: Path, meta: dict[str, Any], threads: int, tokenizer: Any) -> OnnxModel:
    """A session over the folder's graph, with `tokenizer` and the input names and labels of its meta.json."""
    labels = {int(i): str(name) for i, name in meta["labels"].items()}
    return OnnxModel(open_session(folder / "model.onnx", threads), tokenizer, list(meta["input_names"]), labels)


def cached_tokenizer(folder: Path, input_names: list[str]) -> Any:
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(folder / "tokenizer", model_input_names=input_names)


def tokenizer_round_trips(tokenizer: Any, folder: Path) -> bool:
    """Whether the tokenizer saved in `folder` encodes the probe texts exactly like the model's own tokenizer."""
    if not (folder / "tokenizer" / "tokenizer.json").is_file():
        return False
    saved = cached_tokenizer(folder, list(tokenizer.model_input_names))
    options: dict[str, Any] = {"padding": True, "truncation": True, "max_length": 512}
    return bool(saved(PROBE_TEXTS, **options).data == tokenizer(PROBE_TEXTS, **options).data)


def main(argv: list[str]) -> int:
    """The children of `export_in_child`: `export FOLDER SOURCE_JSON` (its status says whether the tokenizer round-
    trips) and `quantize FOLDER`."""
    from router.model import ModelSource

    try:
        if argv[0] == "quantize":
            quantize(Path(argv[1]))
            return 0
        folder, described = Path(argv[1]), json.loads(argv[2])
        tokenizer = export_graph(ModelSource(**{**described, "path": Path(described["path"])}), folder)
        return 0 if tokenizer_round_trips(tokenizer, folder) else NOT_ROUND_TRIP
    except Exception as exc:  # the parent reports the last line of stderr
        print(f"{type(exc).__name__}: {exc}".replace("\n", " "), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
