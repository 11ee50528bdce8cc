"""Share a continual-learning adapter on the Hub and continue its sequence somewhere else.

Two people, one sequence:

1. The *uploader* learns the first tasks (default: ``news_a,news_b``, BBC News topics) with InfLoRA on the packaged
   all-MiniLM-L6-v2 and pushes the adapter - its task branches, its memory of the input subspaces used so far, the
   grown classification head - with the accuracy matrix and a model card (``ContinualTrainer.push_to_hub``).
2. The *continuer* starts from a fresh copy of the base model, loads the adapter with
   ``PeftModel.from_pretrained(base, repo_id, is_trainable=True)`` and the result with
   ``ContinualResult.from_pretrained(repo_id)``, checks that the download reproduces the uploader's outputs bit for
   bit, and learns the next tasks (default: ``subjectivity,party``) without disturbing the first ones: the accuracy
   matrix of the whole sequence continues the uploader's.

With ``--hub_model_id you/inflora-news`` (after ``huggingface-cli login``) the adapter really goes to the Hub. Without
it - the offline default - the uploader writes exactly the files ``push_to_hub`` would upload into a local folder
(``<output_dir>/hub_repo``, via ``ContinualTrainer.save_for_hub``) and the continuer loads from there: the
``from_pretrained`` calls are the same for a folder and a repo id.

    python examples/continual_hub_handoff.py                                   # offline, local folder as the Hub
    python examples/continual_hub_handoff.py --hub_model_id you/inflora-news   # with a network and a token
    python examples/continual_hub_handoff.py --fast                            # a smoke run

Every ``ContinualTrainingArguments`` field works too (``--learning_rate``, ``--num_train_epochs``,
``--push_task_revisions`` ...).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from peft import PeftModel, get_peft_model
from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding

import peft_inflora  # noqa: F401  (registers InfLoRA with PEFT: needed before PeftModel.from_pretrained)
from peft_inflora import ContinualResult, ContinualTrainer, ContinualTrainingArguments, InfLoRAConfig


sys.path.insert(0, str(Path(__file__).resolve().parent))
from cli import with_output_dir  # noqa: E402
from continual_text_classification import TRAINING_DEFAULTS, load_tasks, parse  # noqa: E402
from tasks import packaged_minilm  # noqa: E402


@dataclass
class HandoffArguments:
    model: Optional[str] = field(default=None, metadata={
        "help": "Hub model id or local path of the base model (default: the packaged all-MiniLM-L6-v2, offline)."})
    first_tasks: str = field(default="news_a,news_b", metadata={"help": "Tasks the uploader learns."})
    next_tasks: str = field(default="subjectivity,party", metadata={"help": "Tasks the continuer adds."})
    r: int = field(default=8, metadata={"help": "Rank of each task's InfLoRA branch."})
    max_train_per_class: int = field(default=96, metadata={"help": "Training examples per class (cap)."})
    max_test_per_class: int = field(default=48, metadata={"help": "Test examples per class (cap)."})
    max_length: int = field(default=96, metadata={"help": "Tokens per example (truncation)."})
    fast: bool = field(default=False, metadata={"help": "A smoke run: tiny data, one epoch."})


def fresh_base(model_path: str, num_labels: int):
    return AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=num_labels)


def upload(args: HandoffArguments, training: ContinualTrainingArguments, model_path: str, tokenizer, tasks: list):
    """The uploader: learn ``tasks``, push (or save the same files locally); returns (repo id or folder, model)."""
    model = get_peft_model(fresh_base(model_path, len(tasks[0].label_names)),  # grown task by task
                           InfLoRAConfig(r=args.r, target_modules=["query", "value"], modules_to_save=["classifier"]))
    out = Path(training.output_dir) / "uploader"
    trainer = ContinualTrainer(
        model=model, args=with_output_dir(training, out),
        processing_class=tokenizer, data_collator=DataCollatorWithPadding(tokenizer))
    result = trainer.train_continual(tasks)
    print(f"\nUploader learned {[t.name for t in tasks]}:\n{result.summary_table()}")
    if training.hub_model_id:  # TrainingArguments' own --hub_model_id (and --hub_token, --hub_private_repo)
        trainer.push_to_hub(commit_message=f"InfLoRA after {len(tasks)} tasks")
        repo = training.hub_model_id
        print(f"pushed to https://huggingface.co/{repo}")
    else:
        repo = str(trainer.save_for_hub(Path(training.output_dir) / "hub_repo"))
        print(f"no --hub_model_id: wrote the files push_to_hub uploads to {repo}")
    return repo, model


def continue_sequence(args: HandoffArguments, training: ContinualTrainingArguments, model_path: str, tokenizer,
                      repo: str, first: list, new: list):
    """The continuer: a fresh base model, the downloaded adapter and result, then the next tasks."""
    previous = ContinualResult.from_pretrained(repo)
    num_labels = sum(len(t.label_names) for t in first)
    model = PeftModel.from_pretrained(fresh_base(model_path, num_labels), repo, is_trainable=True)
    print(f"\nContinuer downloaded an adapter that learned {model.tasks_done()} tasks "
          f"({', '.join(previous.task_names[: previous.num_learned])})")
    out = Path(training.output_dir) / "continuer"
    trainer = ContinualTrainer(
        model=model, args=with_output_dir(training, out),
        processing_class=tokenizer, data_collator=DataCollatorWithPadding(tokenizer))
    result = trainer.train_continual(first + new, previous_result=previous)
    print(f"\nThe whole sequence, continued after the download:\n{result.summary_table()}")
    return model, result


@torch.no_grad()
def max_output_difference(a, b, tokenizer, text: str) -> float:
    batch = tokenizer([text], return_tensors="pt")
    a.eval(), b.eval()
    return float((a(**batch).logits - b(**batch).logits).abs().max())


def main(argv: Optional[list[str]] = None) -> ContinualResult:
    args, training = parse(HandoffArguments, {**TRAINING_DEFAULTS, "output_dir": "runs/hub_handoff"}, argv)
    model_path = args.model or packaged_minilm()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    first, new = load_tasks(args, tokenizer, args.first_tasks), load_tasks(args, tokenizer, args.next_tasks)

    repo, uploaded = upload(args, training, model_path, tokenizer, first)
    downloaded_check = PeftModel.from_pretrained(fresh_base(model_path, uploaded.config.num_labels), repo)
    diff = max_output_difference(uploaded, downloaded_check, tokenizer, "Shares rallied after the results.")
    print(f"downloaded adapter vs the uploader's model: max |logit difference| = {diff:.3g}")
    if diff != 0.0:
        raise SystemExit("the downloaded adapter does not reproduce the uploader's outputs")
    _, result = continue_sequence(args, training, model_path, tokenizer, repo, first, new)
    print(f"\nA_T = {100 * result.final_accuracy:.2f} %, A_avg = {100 * result.average_incremental_accuracy:.2f} %, "
          f"BWT = {100 * result.backward_transfer:.2f} pp, forgetting = {100 * result.forgetting:.2f} pp")
    return result


if __name__ == "__main__":
    main()
