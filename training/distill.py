"""Knowledge distillation: train a smaller student on a trained teacher's answers as well as on the labels.

A 4-layer model trained on the labels alone was as accurate as six layers cross-validated, but its confidences sat
lower, so its threshold and its routing moved from model to model (docs/model-card.md § Fewer layers). Trained to
match the 6-layer teacher's softened answers too (Hinton et al., 2015: loss = alpha * cross-entropy on the labels
+ (1 - alpha) * T² * KL(teacher || student) at temperature T), the student learns where the teacher is sure and
where not, and routes like it at the speed of four layers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import Trainer

from router.model import ModelSource, load_model

TEACHER_LOGITS = "teacher_logits"  # the training dataset's column of the teacher's answers


@torch.inference_mode()
def logits(model: Any, tokenizer: Any, texts: list[str], max_length: int, batch_size: int = 64) -> torch.Tensor:
    """A model's logits for `texts`, in the texts' order (`Trainer.predict` sorts its input by length when grouping
    is on), in eval mode; `training.crossval` reads its folds' predictions through this too."""
    model.eval()
    batches = []
    for start in range(0, len(texts), batch_size):
        encoded = tokenizer(
            texts[start : start + batch_size], truncation=True, max_length=max_length, padding=True, return_tensors="pt"
        ).to(model.device)
        batches.append(model(**encoded).logits.float())
    return torch.cat(batches) if batches else torch.empty(0, 2)


def teacher_logits(folder: Path, texts: list[str], max_length: int) -> list[list[float]]:
    """The teacher's logits for `texts`, with the model loaded as the service loads it (adapter merged, fp32)."""
    model, tokenizer = load_model(ModelSource(path=folder, origin="path", name=str(folder)))
    return logits(model, tokenizer, texts, max_length).tolist()


def distillation_loss(
    student: torch.Tensor, teacher: torch.Tensor, label_loss: torch.Tensor, temperature: float, alpha: float
) -> torch.Tensor:
    """alpha * the label loss + (1 - alpha) * T² * KL(teacher || student), both softened by T (T² keeps the
    gradient's scale independent of T)."""
    soft = F.kl_div(
        F.log_softmax(student / temperature, dim=-1), F.softmax(teacher / temperature, dim=-1), reduction="batchmean"
    )
    return alpha * label_loss + (1 - alpha) * soft * temperature**2


class DistillationTrainer(Trainer):
    """A `Trainer` whose training batches carry the teacher's logits; evaluation (no such column) is the plain
    label loss, so early stopping and the best epoch are judged as for any other run."""

    def __init__(self, *args: Any, temperature: float, alpha: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.temperature = temperature
        self.alpha = alpha

    def compute_loss(  # type: ignore[override]
        self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        teacher = inputs.pop(TEACHER_LOGITS, None)
        outputs = model(**inputs)
        loss = outputs.loss
        if teacher is not None:
            teacher = teacher.to(outputs.logits.dtype)
            loss = distillation_loss(outputs.logits, teacher, loss, self.temperature, self.alpha)
        return (loss, outputs) if return_outputs else loss
