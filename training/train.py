"""Fine-tune a sequence classifier for the router: `python -m training.train --output-dir models/router`.

The default run turns the packaged all-MiniLM-L6-v2 backbone into a LoRA adapter plus the trained classifier head
and pooler (peft `modules_to_save`), stored in float16, which `router.model` merges into the backbone at load time.
The shipped embedded model is that run's 4-layer student: `--num-layers 4 --distill-from <the default run's folder>`
(training/distill.py, docs/model-card.md § Regenerate). `--method full` fine-tunes every weight and saves an
ordinary Hugging Face model folder (with tokenizer) instead; that works for any `AutoModelForSequenceClassification`
base, e.g. distilbert-base-uncased.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import Dataset
from safetensors.torch import load_file, save_file
from sklearn.metrics import accuracy_score, f1_score
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    EarlyStoppingCallback,
    EvalPrediction,
    Trainer,
    TrainingArguments,
    set_seed,
)

from router.config import Settings
from router.model import BACKBONE_ID, backbone_path
from training import data, distill, threshold
from training.pushgateway import PushgatewayCallback, TrainingMetrics

log = logging.getLogger(__name__)

# LoRA targets per architecture; others fall back to peft's own defaults for that model type.
LORA_TARGETS = {"bert": ["query", "key", "value", "dense"]}
ADAPTER_FILE = "adapter_model.safetensors"


def build_parser(description: str | None = __doc__) -> argparse.ArgumentParser:
    """The training options; `training.crossval` adds its own to the same set."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", required=True, type=Path, help="Folder the trained model is written to.")
    parser.add_argument("--data", help="Local dolly JSONL file; default: the Hub dataset " + data.HUB_DATASET)
    parser.add_argument(
        "--base-model", default=BACKBONE_ID, help="Hub id or local folder (default: packaged MiniLM, offline)."
    )
    parser.add_argument("--method", choices=["lora", "full"], default="lora", help="LoRA adapter or full fine-tune.")
    parser.add_argument("--max-epochs", type=int, default=10)
    parser.add_argument("--patience", type=int, default=3, help="Epochs without a better validation loss to stop.")
    parser.add_argument("--learning-rate", type=float, help="Default: 5e-4 for lora, 5e-5 for full.")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--warmup-ratio", type=float, default=0.1)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--max-length", type=int, default=128, help="Token limit of a training text.")
    parser.add_argument(
        "--num-layers", type=int, help="Keep only the base's first N transformer layers (a faster model); default: all."
    )
    parser.add_argument(
        "--distill-from",
        type=Path,
        help="A trained model folder (the teacher) whose answers the model also learns (training/distill.py).",
    )
    parser.add_argument("--distill-temperature", type=float, default=2.0, help="Softens both models' answers.")
    parser.add_argument(
        "--distill-alpha", type=float, default=0.5, help="Weight of the label loss; the rest is the teacher's."
    )
    parser.add_argument("--seed", type=int, default=42, help="Seeds the split, the head's init and the shuffling.")
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--lora-alpha", type=int, default=32)
    parser.add_argument("--lora-dropout", type=float, default=0.1)
    parser.add_argument(
        "--adapter-dtype", choices=["float16", "float32"], default="float16", help="Storage dtype of adapter weights."
    )
    parser.add_argument(
        "--unsure-fast-share", type=float, default=threshold.UNSURE_FAST_SHARE, help=threshold.UNSURE_HELP
    )
    parser.add_argument("--max-train-examples", type=int, help="Use only the first N training examples (smoke runs).")
    parser.add_argument("--pushgateway-url", help="Push step and epoch metrics here (e.g. http://localhost:9091).")
    parser.add_argument("--log-interval", type=int, default=10, help="Steps between logged/pushed step metrics.")
    parser.add_argument("--run-id", help="Pushgateway grouping key and report id (default: a new random id).")
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0 = torch's default.")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def build_model(args: argparse.Namespace) -> Any:
    """The base model with a fresh 2-label head; wrapped in a LoRA adapter for `--method lora`."""
    # num_hidden_layers=N loads the first N layers and drops the rest; the saved config records N, so the service
    # loads the same truncated architecture.
    layers = {"num_hidden_layers": args.num_layers} if args.num_layers else {}
    model = AutoModelForSequenceClassification.from_pretrained(
        backbone_path(args.base_model), num_labels=2, id2label=data.ID2LABEL, label2id=data.LABEL2ID, **layers
    )
    if args.method == "full":
        return model
    from peft import LoraConfig, TaskType, get_peft_model

    config = LoraConfig(
        task_type=TaskType.SEQ_CLS,
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=LORA_TARGETS.get(model.config.model_type),
        # The head is new and the pooler feeds it: both are trained in full and saved beside the adapter.
        modules_to_save=["classifier", "pooler"] if hasattr(model.base_model, "pooler") else ["classifier"],
    )
    return get_peft_model(model, config)


def compute_metrics(prediction: EvalPrediction) -> dict[str, float]:
    logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
    predicted = np.argmax(logits, axis=-1)
    labels = prediction.label_ids
    return {
        "accuracy": float(accuracy_score(labels, predicted)),
        "f1": float(f1_score(labels, predicted, average="macro")),
    }


def token_lengths(tokenizer: Any, examples: list[data.Example]) -> dict[str, float]:
    """Percentiles of untruncated token counts: what `--max-length` cuts off."""
    lengths = np.array([len(ids) for ids in tokenizer([e.text for e in examples], truncation=False)["input_ids"]])
    stats = {f"p{p}": float(np.percentile(lengths, p)) for p in (50, 90, 95, 99)}
    return stats | {"max": float(lengths.max())}


def save(model: Any, tokenizer: Any, args: argparse.Namespace, output_dir: Path) -> None:
    """Write the model folder the service loads: an adapter folder (lora) or a full model folder with tokenizer."""
    output_dir.mkdir(parents=True, exist_ok=True)
    if args.method == "full":
        model.save_pretrained(output_dir)
        tokenizer.save_pretrained(output_dir)
        return
    # Record the base's public id, not the local folder of its packaged weights, so any install can resolve it.
    model.peft_config["default"].base_model_name_or_path = args.base_model
    model.save_pretrained(output_dir, save_embedding_layers=False)  # embeddings are frozen: nothing to look up
    (output_dir / "README.md").unlink(missing_ok=True)  # peft's template card; docs/model-card.md is the real one
    model.base_model.model.config.save_pretrained(output_dir)  # id2label/label2id and the architecture
    if args.adapter_dtype == "float16":
        # Half the bytes in git; the service loads them into the float32 backbone, so inference stays float32.
        weights = load_file(output_dir / ADAPTER_FILE)
        save_file({k: v.to(torch.float16) for k, v in weights.items()}, output_dir / ADAPTER_FILE)


def folder_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def learning_rate(args: argparse.Namespace) -> float:
    return args.learning_rate or (5e-4 if args.method == "lora" else 5e-5)


def hyperparameters(args: argparse.Namespace) -> dict[str, Any]:
    """The options that shape the model, for a report (where the output goes and what it is called do not)."""
    recorded = {k: v for k, v in vars(args).items() if k not in {"output_dir", "pushgateway_url", "run_id"}}
    teacher = args.distill_from
    return recorded | {
        "learning_rate": learning_rate(args),
        "data": str(args.data) if args.data else None,
        "distill_from": teacher_identity(teacher) if teacher else None,
    }


def teacher_identity(folder: Path) -> dict[str, Any]:
    """Which model taught this one: its folder and, when it has a training report, its run id."""
    report = folder / "training_report.json"
    run_id = json.loads(report.read_text()).get("run_id") if report.is_file() else None
    return {"model": str(folder), "run_id": run_id}


def encode(tokenizer: Any, examples: list[data.Example], max_length: int) -> Dataset:
    """Tokenized examples, unpadded: the collator pads each batch to its longest text."""
    dataset = Dataset.from_dict({"text": [e.text for e in examples], "label": [e.label for e in examples]})
    return dataset.map(
        lambda batch: tokenizer(batch["text"], truncation=True, max_length=max_length),
        batched=True,
        remove_columns=["text"],
    )


def fit(
    args: argparse.Namespace,
    tokenizer: Any,
    train_examples: list[data.Example],
    validation_examples: list[data.Example],
    checkpoints: str,
    callbacks: list[Any],
) -> Trainer:
    """A fresh model trained on `train_examples`, holding the epoch with the lowest validation loss."""
    if args.threads:
        torch.set_num_threads(args.threads)
    # Before the seed: loading the teacher draws random numbers (weight init before its weights are read), and the
    # student's head must start from the same draw as in a run without a teacher.
    texts = [e.text for e in train_examples]
    answers = distill.teacher_logits(args.distill_from, texts, args.max_length) if args.distill_from else []
    set_seed(args.seed)
    training_args = TrainingArguments(
        output_dir=checkpoints,
        num_train_epochs=args.max_epochs,
        learning_rate=learning_rate(args),
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=64,
        warmup_steps=args.warmup_ratio,  # a float below 1 is a ratio of all training steps
        lr_scheduler_type="linear",
        weight_decay=args.weight_decay,
        max_grad_norm=1.0,
        eval_strategy="epoch",
        save_strategy="epoch",
        save_total_limit=args.patience + 1,
        load_best_model_at_end=True,
        metric_for_best_model="eval_loss",
        greater_is_better=False,
        logging_steps=args.log_interval,
        train_sampling_strategy="group_by_length",
        seed=args.seed,
        use_cpu=not torch.cuda.is_available(),
        report_to="none",
        remove_unused_columns=not args.distill_from,  # keep the teacher's column: forward() does not take it
    )
    common: dict[str, Any] = {
        "args": training_args,
        "eval_dataset": encode(tokenizer, validation_examples, args.max_length),
        "data_collator": DataCollatorWithPadding(tokenizer),
        "compute_metrics": compute_metrics,
        "callbacks": [EarlyStoppingCallback(early_stopping_patience=args.patience), *callbacks],
    }
    train_dataset = encode(tokenizer, train_examples, args.max_length)
    if args.distill_from:
        trainer: Trainer = distill.DistillationTrainer(
            model=build_model(args),
            train_dataset=train_dataset.add_column(distill.TEACHER_LOGITS, answers),
            temperature=args.distill_temperature,
            alpha=args.distill_alpha,
            **common,
        )
    else:
        trainer = Trainer(model=build_model(args), train_dataset=train_dataset, **common)
    trainer.train()
    return trainer


def train(args: argparse.Namespace) -> dict[str, Any]:
    """Train, keep the epoch with the lowest validation loss, save it with its training_report.json."""
    started = time.perf_counter()
    run_id = args.run_id or uuid.uuid4().hex[:12]

    records = data.load_records(args.data)
    in_scope, out_of_scope = data.to_examples(records)
    splits = data.split(in_scope, seed=args.seed)
    train_examples = splits.train[: args.max_train_examples] if args.max_train_examples else splits.train

    tokenizer = AutoTokenizer.from_pretrained(backbone_path(args.base_model))
    callbacks = [PushgatewayCallback(TrainingMetrics(args.pushgateway_url, run_id))] if args.pushgateway_url else []
    with tempfile.TemporaryDirectory(prefix="router-train-") as checkpoints:
        trainer = fit(args, tokenizer, train_examples, splits.validation, checkpoints, callbacks)
        validation = trainer.evaluate()
        best_checkpoint = trainer.state.best_model_checkpoint
        history = trainer.state.log_history
    save(trainer.model, tokenizer, args, args.output_dir)
    # Chosen on the saved folder as the service loads it (adapter merge, fp16 weights), not the in-memory model.
    routing = threshold.choose_for_model(
        args.output_dir, splits.validation, args.unsure_fast_share, Settings(max_length=args.max_length)
    )
    wall_time = time.perf_counter() - started

    report = {
        "run_id": run_id,
        "base_model": args.base_model,
        "method": args.method,
        "data": {
            "source": str(args.data) if args.data else f"hub:{data.HUB_DATASET}",
            "sha256": data.data_hash(records),
            "records": len(records),
            "in_scope": len(in_scope),
            "out_of_scope": len(out_of_scope),
            "split_seed": args.seed,
            "split_sizes": splits.sizes() | {"train_used": len(train_examples)},
            "train_token_lengths": token_lengths(tokenizer, train_examples),
        },
        "hyperparameters": hyperparameters(args),
        "metrics": {
            "best_validation": {k: validation[f"eval_{k}"] for k in ("loss", "accuracy", "f1")},
            "epochs_run": trainer.state.epoch,
            "best_epoch": _checkpoint_epoch(history, best_checkpoint),
            "global_steps": trainer.state.global_step,
            "train_loss": _train_loss(history),
            "epochs": [
                {"epoch": entry["epoch"]} | {k: entry[f"eval_{k}"] for k in ("loss", "accuracy", "f1")}
                for entry in history
                if "eval_loss" in entry
            ][:-1],  # the last entry is the re-evaluation of the best checkpoint
        },
        "routing": routing,
        "wall_time_seconds": round(wall_time, 1),
        "torch_threads": torch.get_num_threads(),
        "model_bytes": folder_size(args.output_dir),
    }
    (args.output_dir / "training_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def _train_loss(history: list[dict[str, Any]]) -> float | None:
    """Mean training loss over the whole run (the Trainer logs it once, when training ends)."""
    return next((entry["train_loss"] for entry in reversed(history) if "train_loss" in entry), None)


def _checkpoint_epoch(history: list[dict[str, Any]], checkpoint: str | None) -> float | None:
    """Epoch of the checkpoint `load_best_model_at_end` restored (checkpoint folders are named by step)."""
    if not checkpoint:
        return None
    step = int(checkpoint.rsplit("-", 1)[-1])
    return next((entry["epoch"] for entry in history if entry.get("step") == step and "eval_loss" in entry), None)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    report = train(parse_args(argv))
    metrics = report["metrics"]["best_validation"]
    log.info(
        "saved %s (%d bytes) in %.0f s: validation accuracy %.4f, F1 %.4f",
        report["run_id"],
        report["model_bytes"],
        report["wall_time_seconds"],
        metrics["accuracy"],
        metrics["f1"],
    )


if __name__ == "__main__":
    main()
