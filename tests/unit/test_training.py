"""Short real training runs: the shipped LoRA form on the packaged MiniLM, and a full fine-tune of a DistilBERT."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open

from router.config import Settings
from router.inference import Classifier
from router.model import BACKBONE_ID, ModelSource, holds_model
from training import crossval, data, threshold, train

SAMPLE = Path(__file__).resolve().parents[1] / "fixtures" / "dolly_sample.jsonl"


def run(tmp_path: Path, *extra: str) -> dict:
    args = ["--output-dir", str(tmp_path / "model"), "--data", str(SAMPLE), "--batch-size", "8", "--max-length", "64"]
    return train.train(train.parse_args([*args, *extra]))


def validation_accuracy_as_served(folder: Path, max_length: int) -> float:
    """Accuracy on the run's validation split, with the model loaded and called the way the service does it."""
    splits = data.split(data.to_examples(data.load_jsonl(SAMPLE))[0], seed=42)
    classifier = Classifier.load(
        ModelSource(path=folder, origin="path", name="test"), Settings(max_length=max_length, model_backend="torch")
    )
    predictions = classifier.predict([e.text for e in splits.validation])
    expected = [data.ID2LABEL[e.label] for e in splits.validation if e.label is not None]
    return float(np.mean([p.label == label for p, label in zip(predictions, expected, strict=True)]))


def test_default_lora_run_writes_the_embedded_adapter_folder(tmp_path: Path) -> None:
    report = run(tmp_path, "--max-epochs", "2", "--log-interval", "1")
    folder = tmp_path / "model"

    assert sorted(p.name for p in folder.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "config.json",
        "routing.json",
        "training_report.json",
    ]
    config = json.loads((folder / "config.json").read_text())
    assert config["id2label"] == {"0": "0", "1": "1"} and config["label2id"] == {"0": 0, "1": 1}
    adapter = json.loads((folder / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == BACKBONE_ID
    assert {"classifier", "pooler"} <= set(adapter["modules_to_save"])
    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as weights:
        keys = list(weights.keys())
        assert {str(weights.get_tensor(k).dtype) for k in keys} == {"torch.float16"}
    assert any("classifier" in k for k in keys) and any("pooler" in k for k in keys)
    assert any("lora_A" in k for k in keys) and not any("embeddings" in k for k in keys)
    assert (folder / "adapter_model.safetensors").stat().st_size < 2_000_000

    saved = json.loads((folder / "training_report.json").read_text())
    assert saved == json.loads(json.dumps(report))
    assert report["method"] == "lora" and report["data"]["sha256"] == data.data_hash(data.load_jsonl(SAMPLE))
    assert report["data"]["split_sizes"] == {"train": 32, "validation": 4, "test": 5, "train_used": 32}
    assert report["metrics"]["global_steps"] == 8 and len(report["metrics"]["epochs"]) == 2
    assert report["hyperparameters"]["learning_rate"] == 5e-4
    assert report["data"]["train_token_lengths"]["max"] > 64  # the summaries are longer than the cut
    # What the service loads (adapter merged into the packaged backbone) scores what training measured.
    served = validation_accuracy_as_served(folder, max_length=64)
    assert served == pytest.approx(report["metrics"]["best_validation"]["accuracy"])
    # The routing threshold it ships with was chosen on the validation split, as served.
    routing = json.loads((folder / "routing.json").read_text())
    assert routing == report["routing"] and 0.5 <= routing["confidence_threshold"] <= 1.0
    assert routing["unsure_fast_share"] == threshold.UNSURE_FAST_SHARE
    assert routing["chosen_on"]["split"] == "validation" and routing["chosen_on"]["records"] == 4


def test_num_layers_keeps_the_first_layers_and_the_service_loads_the_same_truncated_model(tmp_path: Path) -> None:
    report = run(tmp_path, "--num-layers", "2", "--max-epochs", "1")
    folder = tmp_path / "model"
    assert json.loads((folder / "config.json").read_text())["num_hidden_layers"] == 2
    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as weights:
        keys = list(weights.keys())
    layers = {k.split("layer.")[1].split(".")[0] for k in keys if "layer." in k}
    assert layers == {"0", "1"}
    assert report["hyperparameters"]["num_layers"] == 2
    served = validation_accuracy_as_served(folder, max_length=64)
    assert served == pytest.approx(report["metrics"]["best_validation"]["accuracy"])


def test_full_fine_tune_of_a_distilbert_saves_a_plain_model_folder(tmp_path: Path, fast_model: Path) -> None:
    report = run(tmp_path, "--base-model", str(fast_model), "--method", "full", "--max-epochs", "1")
    folder = tmp_path / "model"
    assert holds_model(folder) and (folder / "model.safetensors").is_file()
    assert (folder / "tokenizer.json").is_file() and not (folder / "adapter_config.json").exists()
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "distilbert" and config["id2label"] == {"0": "0", "1": "1"}
    assert report["metrics"]["global_steps"] == 4
    served = validation_accuracy_as_served(folder, max_length=64)
    assert served == pytest.approx(report["metrics"]["best_validation"]["accuracy"])


def test_early_stopping_ends_the_run_when_validation_loss_stops_improving(tmp_path: Path, fast_model: Path) -> None:
    """A learning rate too small to move the loss: patience 1 stops after the second epoch, not the tenth."""
    report = run(
        tmp_path, "--base-model", str(fast_model), "--method", "full", "--max-epochs", "10", "--patience", "1",
        "--learning-rate", "1e-12",
    )  # fmt: skip
    assert report["metrics"]["epochs_run"] == 2
    assert report["metrics"]["best_epoch"] == 1


def test_same_data_and_seed_give_the_same_model(tmp_path: Path, fast_model: Path) -> None:
    """Reproducibility: the split, the head's init and the shuffling all follow --seed."""
    args = ("--base-model", str(fast_model), "--method", "full", "--max-epochs", "1")
    first = run(tmp_path / "a", *args)
    second = run(tmp_path / "b", *args)
    assert (tmp_path / "a" / "model" / "model.safetensors").read_bytes() == (
        tmp_path / "b" / "model" / "model.safetensors"
    ).read_bytes()
    assert first["metrics"]["best_validation"] == second["metrics"]["best_validation"]
    assert first["data"] == second["data"]


def test_crossval_predicts_every_record_once_with_a_model_that_never_saw_it(tmp_path: Path, fast_model: Path) -> None:
    args = ["--output-dir", str(tmp_path), "--data", str(SAMPLE), "--batch-size", "8", "--max-length", "64"]
    args += ["--base-model", str(fast_model), "--method", "full", "--max-epochs", "1", "--folds", "3"]
    report = crossval.crossval(crossval.parse_args(args))
    assert report == json.loads((tmp_path / "crossval_report.json").read_text())
    splits = data.split(data.to_examples(data.load_jsonl(SAMPLE))[0], seed=42)
    pool = splits.train + splits.validation  # the test split is never predicted
    assert report["data"]["crossvalidated"] == len(pool) == 36 and report["data"]["test_split_left_out"] == 5
    assert sum(report["model"]["per_label"][k]["support"] for k in "01") == len(pool)
    assert len(report["fold_accuracy"]) == 3
    # The disagreement list is exactly the out-of-fold errors, and the fold accuracies add up to the overall one.
    errors = len(report["disagreements"])
    assert report["model"]["accuracy"] == pytest.approx(1 - errors / len(pool))
    fold_sizes = [len(indices) for indices, _ in data.folds(pool, 3, 42)]
    assert sum(a * n for a, n in zip(report["fold_accuracy"], fold_sizes, strict=True)) == pytest.approx(
        len(pool) - errors
    )
    # Each fold's model routes its own test part at the threshold chosen on its own validation part.
    shipped = report["per_model_threshold"]
    assert len(shipped["fold_thresholds"]) == 3 and all(0.5 <= t <= 1.0 for t in shipped["fold_thresholds"])
    assert 0.0 <= shipped["slow_to_fast_rate"] <= 1.0 and 0.0 <= shipped["fast_share"] <= 1.0
    predictions = json.loads((tmp_path / "crossval_predictions.json").read_text())
    assert len(predictions["p_slow"]) == len(pool) and len(predictions["folds"]) == 3
    test_texts = {e.text[:300] for e in splits.test}
    assert not any(row["text"] in test_texts for row in report["disagreements"])
    for row in report["disagreements"]:
        assert (row["p_slow"] >= 0.5) != (row["label"] == data.SLOW)


def test_distillation_pulls_the_student_towards_the_teachers_answers(
    tmp_path: Path, fast_model: Path, slow_model: Path
) -> None:
    """The student starts answering "1" for every text (0.881), the teacher answers "0" for every text (0.998).
    With the labels switched off (alpha 0) all the student learns is the teacher: it ends up answering "0"."""
    args = ["--base-model", str(slow_model), "--method", "full", "--learning-rate", "0.1"]
    args += ["--max-epochs", "4", "--patience", "10", "--distill-from", str(fast_model), "--distill-alpha", "0"]
    report = run(tmp_path, *args)
    classifier = Classifier.load(
        ModelSource(path=tmp_path / "model", origin="path", name="student"), Settings(model_backend="torch")
    )
    texts = [e.text for e in data.to_examples(data.load_jsonl(SAMPLE))[0]]
    assert {p.label for p in classifier.predict(texts)} == {"0"}
    assert report["hyperparameters"]["distill_from"] == {"model": str(fast_model), "run_id": None}
    assert report["hyperparameters"]["distill_alpha"] == 0


def test_distillation_loss_is_the_label_loss_at_alpha_1_and_zero_when_the_student_matches() -> None:
    import torch

    from training.distill import distillation_loss

    teacher = torch.tensor([[2.0, -1.0], [0.5, 0.3]])
    label_loss = torch.tensor(0.7)
    assert distillation_loss(teacher + 5.0, teacher, label_loss, 2.0, 1.0).item() == pytest.approx(0.7)
    # Shifting every logit of a text by the same amount leaves its answer, so the teacher term is zero.
    assert distillation_loss(teacher + 5.0, teacher, label_loss, 2.0, 0.0).item() == pytest.approx(0.0, abs=1e-6)
    assert distillation_loss(-teacher, teacher, label_loss, 2.0, 0.0).item() > 0.1


def test_crossval_refuses_a_teacher(tmp_path: Path, fast_model: Path) -> None:
    with pytest.raises(SystemExit):
        crossval.parse_args(["--output-dir", str(tmp_path), "--distill-from", str(fast_model)])


def test_crossval_distills_a_student_from_a_teacher_trained_on_each_folds_own_records(
    tmp_path: Path, fast_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runs: list[tuple[int | None, bool, int]] = []  # (layers, taught by a saved teacher, training records)
    real_fit = train.fit

    def recording_fit(args, tokenizer, train_examples, *rest):  # type: ignore[no-untyped-def]
        taught = args.distill_from is not None and holds_model(args.distill_from)
        runs.append((args.num_layers, taught, len(train_examples)))
        return real_fit(args, tokenizer, train_examples, *rest)

    monkeypatch.setattr(train, "fit", recording_fit)
    args = ["--output-dir", str(tmp_path), "--data", str(SAMPLE), "--batch-size", "8", "--max-length", "64"]
    args += ["--base-model", str(fast_model), "--method", "full", "--max-epochs", "1", "--folds", "3"]
    report = crossval.crossval(crossval.parse_args([*args, "--distill-layers", "1"]))
    # Per fold: a teacher with the recipe's own layers, then a 1-layer student taught by it, on the same records.
    assert [(layers, taught) for layers, taught, _ in runs] == [(None, False), (1, True)] * 3
    assert all(runs[i][2] == runs[i + 1][2] for i in range(0, 6, 2))
    assert report["hyperparameters"]["distill_layers"] == 1
    assert report["hyperparameters"]["distill_from"] is None  # each fold's teacher is its own, not a fixed one
    assert report["data"]["crossvalidated"] == 36 and len(report["fold_accuracy"]) == 3
    assert sum(report["model"]["per_label"][k]["support"] for k in "01") == 36
