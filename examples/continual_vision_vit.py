"""Class-incremental image classification with InfLoRA on a Vision Transformer (``ViTForImageClassification``).

The continual sequence splits handwritten digits into tasks of new classes (by default ``4,5 | 6,7 | 8,9``). After
each task the model must tell apart *all* classes seen so far with one shared head, without being told which task
an image comes from (class-incremental). Every task gets a fresh InfLoRA branch on the attention key and value
projections (``k_proj`` / ``v_proj`` in transformers 5), designed orthogonally to what earlier tasks used; the head
is a ``modules_to_save`` layer that the ``ContinualTrainer`` grows by the new classes, keeping old rows frozen.

Offline default: no pretrained ViT ships with any package, so the script first pretrains a tiny ViT (4 layers,
width 64, 16x16 inputs with 4x4 patches, ~0.2M parameters) from scratch on the *other* digit classes (``0-3`` by
default), saves it under ``<output_dir>/pretrained_vit`` and then loads it exactly like a Hub checkpoint
(``from_pretrained(..., num_labels=..., ignore_mismatched_sizes=True)``, a fresh head). The images are the 1,797 8x8
digits of scikit-learn's ``load_digits`` (shipped in the scikit-learn wheel), split 80/20 per class with
``--seed``. With a network, ``--model google/vit-base-patch16-224-in21k`` (or any ViT id or local folder) skips the
pretraining and feeds the digits through that model's image processor (upsampled RGB).

Run (from the repository root; ``pip install -e ".[examples]"`` or ``PYTHONPATH=src``)::

    python examples/continual_vision_vit.py --output_dir runs/vit
    python examples/continual_vision_vit.py --output_dir runs/vit --baseline_lora     # also plain LoRA
    python examples/continual_vision_vit.py --output_dir /tmp/vit-fast --fast         # smoke test
    python examples/continual_vision_vit.py --model google/vit-base-patch16-224-in21k --output_dir runs/vit-b16

Run times and results measured on a 2-core CPU are in the README. Outputs in ``--output_dir``:
``continual_result.json``, ``accuracy_matrix.png``, ``accuracy_curve.png``, the final
adapter (``adapter_config.json`` + ``adapter_model.safetensors`` with the InfLoRA memory and the grown head), the
pretrained tiny ViT (``pretrained_vit/``) and the per-task checkpoints under ``continual/``.
"""

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import datasets
import numpy as np
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from transformers import AutoImageProcessor, Trainer, TrainingArguments, ViTConfig, ViTForImageClassification

import peft_inflora  # noqa: F401  (registers the InfLoRA method with PEFT)
from peft_inflora import ContinualTask, ContinualTrainer, ContinualTrainingArguments, InfLoRAConfig


sys.path.insert(0, str(Path(__file__).resolve().parent))
from cli import parse_arguments, print_results, with_output_dir  # noqa: E402


@dataclass
class ExampleArguments:
    model: Optional[str] = field(
        default=None,
        metadata={"help": "A ViT Hub id or local folder (e.g. google/vit-base-patch16-224-in21k). Default: pretrain "
                          "a tiny ViT here on the --pretrain_classes (offline)."},
    )
    fast: bool = field(default=False, metadata={"help": "A smoke test: a few steps and little data."})
    pretrain_classes: str = field(default="0,1,2,3", metadata={"help": "Digits to pretrain the tiny ViT on."})
    tasks: str = field(default="4,5|6,7|8,9", metadata={"help": "The continual tasks: digits, tasks split by '|'."})
    pretrain_epochs: float = field(default=40.0, metadata={"help": "Epochs of the tiny ViT's pretraining."})
    pretrain_lr: float = field(default=2e-3, metadata={"help": "Learning rate of the pretraining."})
    batch_size: int = field(default=32, metadata={"help": "Batch size of the pretraining."})
    r: int = field(default=16, metadata={"help": "Rank of each task's branch."})
    target_modules: str = field(default="k_proj,v_proj",
                                metadata={"help": "Comma-separated module names (older transformers: key,value)."})
    energy_threshold: float = field(default=0.99, metadata={"help": "InfLoRA's lambda."})
    every_batch: bool = field(default=False, metadata={
        "help": "Read every batch in the statistics passes (statistics_max_tokens=None, the paper) instead of the "
                "default sample (statistics_max_tokens='auto')."})
    baseline_lora: bool = field(default=False, metadata={"help": "Also run plain LoRA on the same sequence."})
    threads: int = field(default=0, metadata={"help": "torch CPU threads (0: torch's default)."})


# The example's defaults for ContinualTrainingArguments fields (command-line flags win; --seed also seeds the split
# and the pretraining; --setting task_incremental / --loss_classes seen change the continual setting).
TRAINING_DEFAULTS = dict(output_dir="runs/continual_vit", num_train_epochs=30.0, per_device_train_batch_size=32,
                         per_device_eval_batch_size=128, learning_rate=5e-3, lr_scheduler_type="constant",
                         weight_decay=0.0, save_strategy="no", report_to="none", logging_strategy="no",
                         remove_unused_columns=False, seed=0, disable_tqdm=True)


IMAGE_SIZE = 16  # the tiny ViT's input: the 8x8 digits upsampled


# ----------------------------------------------------------------------------------------------- data
def digits_split(seed: int, test_size: float = 0.2) -> tuple[dict, dict]:
    """scikit-learn's digits, split per class: ``{"image": [64 floats in 0..1], "digit": int}`` lists."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images, targets = digits.data.astype(np.float32) / 16.0, digits.target
    rng = np.random.default_rng(seed)
    train, test = {"image": [], "digit": []}, {"image": [], "digit": []}
    for digit in range(10):
        index = rng.permutation(np.flatnonzero(targets == digit))
        n_test = int(round(test_size * len(index)))
        for part, rows in ((test, index[:n_test]), (train, index[n_test:])):
            part["image"] += images[rows].tolist()
            part["digit"] += [digit] * len(rows)
    return train, test


def subset(split: dict, digits: list[int], limit: Optional[int] = None) -> datasets.Dataset:
    """The images of ``digits``, with local labels ``0..len(digits)-1`` in the order given."""
    rows = [i for i, d in enumerate(split["digit"]) if d in digits]
    if limit is not None:
        rows = rows[::max(1, len(rows) // limit)][:limit]
    return datasets.Dataset.from_dict({"image": [split["image"][i] for i in rows],
                                       "labels": [digits.index(split["digit"][i]) for i in rows]})


class DigitsCollator:
    """Batches ``{"image", "labels"}`` rows into ``pixel_values`` (+ ``labels``): upsampled 1-channel tensors for the
    tiny ViT, or the model's own image processor (RGB, its size and normalisation) for a Hub ViT."""

    def __init__(self, image_processor=None):
        self.image_processor = image_processor

    def __call__(self, features: list[dict]) -> dict:
        images = torch.tensor([f["image"] for f in features], dtype=torch.float32).view(-1, 1, 8, 8)
        labels = torch.tensor([int(f.get("labels", f.get("label"))) for f in features])
        if self.image_processor is None:
            pixels = F.interpolate(images, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
            pixels = (pixels - 0.5) / 0.5
        else:
            from PIL import Image

            pil = [Image.fromarray((img[0].numpy() * 255).astype(np.uint8)).convert("RGB") for img in images]
            pixels = self.image_processor(images=pil, return_tensors="pt")["pixel_values"]
        return {"pixel_values": pixels, "labels": labels}


# ----------------------------------------------------------------------------------------------- models
def pretrain_tiny_vit(args: ExampleArguments, train: dict, test: dict, output_dir: str, seed: int) -> str:
    """Pretrain a tiny ViT from scratch on ``--pretrain_classes``; returns the saved folder."""
    classes = [int(c) for c in args.pretrain_classes.split(",")]
    folder = os.path.join(output_dir, "pretrained_vit")
    torch.manual_seed(seed)
    config = ViTConfig(image_size=IMAGE_SIZE, patch_size=4, num_channels=1, hidden_size=64, num_hidden_layers=4,
                       num_attention_heads=4, intermediate_size=128, hidden_dropout_prob=0.1,
                       attention_probs_dropout_prob=0.0, num_labels=len(classes),
                       id2label={i: str(c) for i, c in enumerate(classes)},
                       label2id={str(c): i for i, c in enumerate(classes)})
    model = ViTForImageClassification(config)
    limit = 64 if args.fast else None
    train_ds, test_ds = subset(train, classes, limit), subset(test, classes, limit)
    trainer = Trainer(
        model=model, data_collator=DigitsCollator(), train_dataset=train_ds,
        args=TrainingArguments(output_dir=folder, num_train_epochs=args.pretrain_epochs,
                               max_steps=4 if args.fast else -1, per_device_train_batch_size=args.batch_size,
                               per_device_eval_batch_size=128, learning_rate=args.pretrain_lr, weight_decay=0.05,
                               warmup_steps=0.1, lr_scheduler_type="cosine", save_strategy="no", report_to="none",
                               logging_strategy="no", remove_unused_columns=False, seed=seed, disable_tqdm=True),
    )
    t0 = time.perf_counter()
    trainer.train()
    out = trainer.predict(test_ds)
    accuracy = float((out.predictions.argmax(-1) == out.label_ids).mean())
    print(f"pretrained a tiny ViT ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters) on digits "
          f"{classes}: test accuracy {100 * accuracy:.1f} % ({time.perf_counter() - t0:.0f} s)")
    model.save_pretrained(folder)
    return folder


def load_backbone(source: str, num_labels: int) -> ViTForImageClassification:
    """A ViT with a fresh ``num_labels`` head (the trainer grows it task by task)."""
    id2label = {i: f"LABEL_{i}" for i in range(num_labels)}
    return ViTForImageClassification.from_pretrained(source, num_labels=num_labels, ignore_mismatched_sizes=True,
                                                     id2label=id2label, label2id={v: k for k, v in id2label.items()})


def run_sequence(method: str, args: ExampleArguments, training: ContinualTrainingArguments, source: str,
                 tasks: list[ContinualTask], collator, output_dir: str):
    torch.manual_seed(training.seed)
    model = load_backbone(source, num_labels=len(tasks[0].label_names))
    targets = [m.strip() for m in args.target_modules.split(",") if m.strip()]
    if method == "inflora":
        config = InfLoRAConfig(r=args.r, target_modules=targets, modules_to_save=["classifier"],
                               energy_threshold=args.energy_threshold, total_tasks=len(tasks),
                               statistics_max_tokens=None if args.every_batch else "auto")
    else:
        config = LoraConfig(r=args.r, lora_alpha=args.r, target_modules=targets, modules_to_save=["classifier"])
    model = get_peft_model(model, config)
    trainer = ContinualTrainer(model=model, args=with_output_dir(training, output_dir), data_collator=collator)
    result = trainer.train_continual(tasks)
    trainer.save_model(output_dir)  # the final adapter: InfLoRA memory + grown head
    return result, trainer


def main(argv: Optional[list[str]] = None) -> None:
    args, training = parse_arguments(ExampleArguments, TRAINING_DEFAULTS, argv)
    datasets.disable_progress_bars()
    if args.fast:
        training.max_steps = 3 if training.max_steps <= 0 else training.max_steps
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    Path(training.output_dir).mkdir(parents=True, exist_ok=True)
    train, test = digits_split(training.seed)
    task_digits = [[int(d) for d in part.split(",")] for part in args.tasks.split("|")]

    if args.model is None:
        source, collator = pretrain_tiny_vit(args, train, test, training.output_dir, training.seed), DigitsCollator()
    else:  # a pretrained ViT from the Hub (or a local folder): its processor makes RGB images of its size
        source, collator = args.model, DigitsCollator(AutoImageProcessor.from_pretrained(args.model))

    limit = 32 if args.fast else None
    tasks = [ContinualTask("digits_" + "".join(map(str, digits)), subset(train, digits, limit),
                           subset(test, digits, limit), label_names=[str(d) for d in digits])
             for digits in task_digits]
    for task in tasks:
        print(f"task {task.name}: classes {task.label_names}, {task.train_dataset.num_rows} train / "
              f"{task.eval_dataset.num_rows} test images")

    result, trainer = run_sequence("inflora", args, training, source, tasks, collator, training.output_dir)
    for capacity in trainer.peft_model.capacity_report()[:2]:
        print(f"memory of {capacity.layers[0]}: {capacity.memory_dimension} of {capacity.d_in} dims "
              f"({capacity.free_dimension} free)")
    baseline = None if not args.baseline_lora else (lambda: run_sequence(
        "lora", args, training, source, tasks, collator, os.path.join(training.output_dir, "baseline_lora"))[0])
    print_results(result, baseline, training.output_dir, start)


if __name__ == "__main__":
    main()
