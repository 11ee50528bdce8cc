"""The Hugging Face Hub side of a continual run: model cards, pushes, and one branch per task.

With ``push_task_revisions=True`` (a :class:`~.arguments.ContinualArguments` option) every finished task is pushed,
with exactly what ``push_to_hub`` pushes (the adapter with its memory, ``continual_result.json`` so far, the plots and
a model card), to the branch ``task-<k>-<name>`` of ``hub_model_id``: ``k`` is the task's 1-based position in the
whole sequence (the same number as the local checkpoint ``continual/after-task-NN``) and ``<name>`` the task name made
into a valid git ref (see :func:`task_revision_name`). Any point of the sequence then loads with::

    PeftModel.from_pretrained(base, repo_id, revision="task-2-news_b")
    ContinualResult.from_pretrained(repo_id, revision="task-2-news_b")

and :func:`task_revisions` lists the branches of a repository by task number. :class:`HubMixin` holds the trainer
methods (``push_to_hub``, ``create_model_card``, ``save_for_hub`` and the per-task pushes).
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

from .checkpoint import PLOT_FILES, TASK_REVISION_RECORD, checkpoint_dir, write_result
from .result import RESULT_FILE, ContinualResult


__all__ = ["HUB_FILES", "HubMixin", "HubPushError", "task_revision_name", "task_revision_names", "task_revisions"]

# What push_to_hub uploads from output_dir (the per-task checkpoints under continual/ stay local).
RUN_FILES = ("README.md", RESULT_FILE) + PLOT_FILES  # the model card, the result and its plots
HUB_FILES = ("adapter_config.json", "adapter_model.safetensors") + RUN_FILES


class HubPushError(RuntimeError):
    """An upload to the Hub failed after the local state was saved; the message says where it is and how to retry."""


TASK_REVISION_PREFIX = "task-"
# the branch names task_revision_name makes: task-<k>-<name part>, k >= 1 without leading zeros
_TASK_REVISION = re.compile(r"^task-([1-9][0-9]*)-([a-z0-9._-]+)$")
_OUTSIDE_REF_CHARACTERS = re.compile(r"[^a-z0-9._-]+")


def _ref_part(task_name: str) -> str:
    """``task_name`` as a git-ref-safe name part: lowercase, runs of characters outside ``[a-z0-9._-]`` replaced
    by one ``-``, runs of ``-`` and of ``.`` collapsed (git refuses ``..``), ``-`` and ``.`` stripped at both ends,
    a trailing ``.lock`` (refused by git) turned into ``-lock``. May be empty."""
    part = _OUTSIDE_REF_CHARACTERS.sub("-", str(task_name).lower())
    part = re.sub(r"\.{2,}", ".", part).strip("-.")
    if part.endswith(".lock"):
        part = part[: -len(".lock")] + "-lock"
    return re.sub(r"-{2,}", "-", part).strip("-.")


def task_revision_name(task_number: int, task_name: str) -> str:
    """The branch that holds the state after task ``task_number`` (1-based) of a sequence: ``task-<k>-<name>``.

    The name is lowercased; every run of characters outside ``a-z``, ``0-9``, ``.``, ``_``, ``-`` becomes one ``-``;
    ``-`` and ``.`` are stripped at both ends. ``task_revision_name(2, "News B")`` is ``"task-2-news-b"``.

    Raises:
        ValueError: ``task_number`` is not an int >= 1, or nothing is left of the name (e.g. ``"!!!"``, or a name
            written only in non-Latin letters).
    """
    if not isinstance(task_number, int) or isinstance(task_number, bool) or task_number < 1:
        raise ValueError(f"task_number is the task's 1-based position in the sequence, got {task_number!r}.")
    part = _ref_part(task_name)
    if not part:
        raise ValueError(
            f"Task name {task_name!r} gives no usable branch name: per-task Hub revisions are named "
            "task-<k>-<name>, with the name lowercased and only the characters a-z, 0-9, '.', '_' and '-' kept. "
            "Rename the task (ContinualTask(name=...)) so that its name contains some of them."
        )
    return f"{TASK_REVISION_PREFIX}{task_number}-{part}"


def task_revision_names(task_names: Sequence[str]) -> list[str]:
    """The branch names of a whole sequence, numbered from 1 (see :func:`task_revision_name`).

    Raises:
        ValueError: a name gives no usable branch name, or two names give the same name part (e.g. ``"News B"`` and
            ``"news-b"``): the branches would differ only by their number, so the names must be told apart.
    """
    branches = [task_revision_name(k, name) for k, name in enumerate(task_names, start=1)]
    seen: dict[str, str] = {}
    for name, branch in zip(task_names, branches):
        part = branch.split("-", 2)[2]
        if part in seen:
            raise ValueError(
                f"Task names {seen[part]!r} and {name!r} give the same branch name part {part!r} (branches are "
                "named task-<k>-<name>, lowercased, characters outside a-z, 0-9, '.', '_', '-' replaced by '-'): "
                "rename one of the tasks so that their branches can be told apart by name."
            )
        seen[part] = name
    return branches


def task_revisions(repo_id: str, *, token: Optional[str] = None, repo_type: Optional[str] = None) -> dict[int, str]:
    """The per-task revisions of a Hub repository: ``{k: branch}`` for every branch named ``task-<k>-<name>``,
    ordered by ``k`` (the 1-based task number). Other branches (``main``, ...) and tags are left out.

    ``PeftModel.from_pretrained(base, repo_id, revision=task_revisions(repo_id)[2])`` loads the adapter after the
    second task.

    Raises:
        ValueError: two branches carry the same task number (e.g. ``task-2-news_b`` and ``task-2-sentiment``, left by
            two sequences that share their first task): pass the branch you mean to ``revision=`` yourself.
    """
    from huggingface_hub import HfApi

    refs = HfApi(token=token).list_repo_refs(repo_id, repo_type=repo_type)
    found: dict[int, list[str]] = {}
    for branch in refs.branches:
        match = _TASK_REVISION.match(branch.name)
        if match:
            found.setdefault(int(match.group(1)), []).append(branch.name)
    clashes = {k: sorted(names) for k, names in found.items() if len(names) > 1}
    if clashes:
        raise ValueError(
            f"{repo_id} has several branches for the same task number: {clashes}. They come from different "
            "sequences pushed to the same repository; pass the branch you mean to revision= directly."
        )
    return {k: found[k][0] for k in sorted(found)}


class HubMixin:
    """The Hub methods of a continual trainer (mixed into :class:`~.loop.ContinualMixin`, over ``Trainer``)."""

    def create_model_card(self, model_name: Optional[str] = None, **kwargs: Any) -> None:
        """README.md for the Hub: the tasks learned, the continual metrics and the accuracy matrix, and how to load
        the adapter and continue the sequence."""
        if not self.is_world_process_zero():
            return
        text = self.model_card_text(self.continual_result, model_name or Path(self.args.output_dir).name)
        Path(self.args.output_dir).mkdir(parents=True, exist_ok=True)
        (Path(self.args.output_dir) / "README.md").write_text(text, encoding="utf-8")

    def model_card_text(self, result: Optional[ContinualResult], model_name: str,
                        revision: Optional[str] = None) -> str:
        """The model card for ``result``; with ``revision``, the card of that per-task branch."""
        base = getattr(self.peft_model.peft_config[self.peft_model.active_adapter], "base_model_name_or_path", None)
        lines = ["---", "library_name: peft", "tags:", "- inflora", "- continual-learning", "- peft"]
        if base:
            lines.append(f"base_model: {base}")
        lines += ["---", "", f"# {model_name}", "",
                  "An [InfLoRA](https://arxiv.org/abs/2404.00228) adapter trained with "
                  "[peft-inflora](https://pypi.org/project/peft-inflora/) on a sequence of tasks "
                  f"(setting: {self.args.setting}).", ""]
        if result is not None and result.accuracy_matrix:
            done = len(result.accuracy_matrix)
            if revision is not None:
                lines += [f"This revision (`{revision}`) holds the adapter after task {done} "
                          f"({result.task_names[done - 1]}); the repository's other `task-<k>-<name>` branches hold "
                          "the other points of the sequence.", ""]
            lines += [f"Tasks learned ({done}): " + ", ".join(result.task_names[:done]), "",
                      result.summary_table(), ""]
        load_from = f'REPO_ID, revision="{revision}"' if revision is not None else "REPO_ID"
        num_labels = getattr(self.peft_model.config, "num_labels", None)
        with_labels = self.args.setting != "generation" and num_labels
        lines += ["## Usage", "", "```python",
                  "import peft_inflora  # registers the InfLoRA method with PEFT: required before loading",
                  "from peft import PeftModel",
                  "from peft_inflora import ContinualResult", "",
                  f"base = ...  # {base or 'the base model'}"
                  + (f", with num_labels={num_labels}" if with_labels else ""),
                  f"model = PeftModel.from_pretrained(base, {load_from}, is_trainable=True)",
                  "model.begin_task(next_task_batches)  # continue the sequence in any loop, or with the trainer:",
                  f"# trainer.train_task(next_task, previous_tasks=[...], "
                  f"previous_result=ContinualResult.from_pretrained({load_from}))", "```", ""]
        return "\n".join(lines)

    def push_to_hub(self, commit_message: Optional[str] = "End of training", blocking: bool = True,
                    token: Optional[str] = None, revision: Optional[str] = None, private: Optional[bool] = None,
                    **kwargs: Any) -> Any:
        """Push the adapter (with its memory), the continual result, the plots and a model card to
        ``args.hub_model_id``; the per-task checkpoints under ``continual/`` stay local."""
        from huggingface_hub import HfApi

        token = token if token is not None else self.args.hub_token
        if self.hub_model_id is None:
            self.init_hf_repo(token=token, private=private)
        self.save_model(_internal_call=True)
        if not self.is_world_process_zero():
            return None
        self._write_run_result()
        self.create_model_card(**kwargs)
        return HfApi(token=token).upload_folder(
            repo_id=self.hub_model_id, folder_path=self.args.output_dir, commit_message=commit_message,
            revision=revision if revision is not None else self.args.hub_revision,
            allow_patterns=list(HUB_FILES), run_as_future=not blocking,
        )

    def save_for_hub(self, folder: str, model_name: Optional[str] = None) -> Path:
        """Write exactly what :meth:`push_to_hub` uploads (adapter with memory, result, plots, model card) into a
        local ``folder``, which then works as a repository for ``PeftModel.from_pretrained(base, folder)`` and
        ``ContinualResult.from_pretrained(folder)``: the offline stand-in for the Hub."""
        folder = Path(folder)
        self.save_model(str(folder))
        if self.is_world_process_zero():
            self._write_run_result()
            self.create_model_card(model_name=model_name or folder.name)
            for pattern in RUN_FILES:  # save_model wrote the adapter files
                for file in Path(self.args.output_dir).glob(pattern):
                    if file.is_file() and file.parent.resolve() != folder.resolve():
                        shutil.copy2(file, folder / file.name)
        return folder

    def _write_run_result(self) -> None:
        if self.args.should_save and self.continual_result is not None and self.continual_result.accuracy_matrix:
            write_result(self.continual_result, self.args.output_dir)

    # ------------------------------------------------------------------ per-task Hub revisions
    def _push_task_revision(self, task_number: int, task_name: str, branch: str) -> None:
        """Push the checkpoint after task ``task_number`` (``continual/after-task-NN``: adapter with memory, result
        so far) with its plots and model card to ``branch``, created from ``args.task_revision_base`` (default
        ``args.hub_revision``, else ``main``) if missing; exactly the files :meth:`push_to_hub` uploads. Main
        process only. Records the push in the checkpoint."""
        if not self.is_world_process_zero():
            return
        from huggingface_hub import HfApi

        checkpoint = checkpoint_dir(self.args.output_dir, task_number)
        try:
            with tempfile.TemporaryDirectory(prefix="inflora-hub-") as staging:
                result = ContinualResult.from_json(str(checkpoint / RESULT_FILE))
                for pattern in HUB_FILES:  # the adapter files and the result
                    for file in checkpoint.glob(pattern):
                        shutil.copy2(file, Path(staging) / file.name)
                write_result(result, staging)  # plots
                name = f"{self.hub_model_id.split('/')[-1]} (after task {task_number}: {task_name})"
                (Path(staging) / "README.md").write_text(self.model_card_text(result, name, revision=branch),
                                                         encoding="utf-8")
                api = HfApi(token=self.args.hub_token)
                source = self.args.task_revision_base or self.args.hub_revision
                api.create_branch(self.hub_model_id, branch=branch, revision=source, exist_ok=True)
                commit = api.upload_folder(repo_id=self.hub_model_id, folder_path=staging, revision=branch,
                                           commit_message=f"After task {task_number}: {task_name}",
                                           allow_patterns=list(HUB_FILES))
        except Exception as exc:
            raise HubPushError(
                f"Pushing the state after task {task_number} ('{task_name}') to branch '{branch}' of "
                f"{self.hub_model_id} failed ({type(exc).__name__}: {exc}). Nothing is lost: the adapter and the "
                f"result after this task are saved in {checkpoint}. Fix the cause (network, a token with write "
                "access, ...) and call train_continual(tasks, resume_from_checkpoint=True) (or train_task(next_task)) "
                "with the same output_dir: it pushes the finished tasks whose branch is missing, then continues."
            ) from exc
        record = {"repo_id": self.hub_model_id, "revision": branch, "commit": getattr(commit, "oid", None)}
        (checkpoint / TASK_REVISION_RECORD).write_text(json.dumps(record), encoding="utf-8")

    def _push_missing_task_revisions(self, names: list[str]) -> None:
        """On resume: push every local checkpoint of the tasks ``names`` that is not yet on its branch of this
        repository (an upload failed, or the run before had ``push_task_revisions`` off)."""
        if not self.is_world_process_zero():
            return
        for number, (name, branch) in enumerate(zip(names, task_revision_names(names)), start=1):
            checkpoint = checkpoint_dir(self.args.output_dir, number)
            if not (checkpoint / RESULT_FILE).is_file():
                continue  # learned before this run's output_dir (a downloaded adapter): not ours to push
            record_file = checkpoint / TASK_REVISION_RECORD
            record = json.loads(record_file.read_text(encoding="utf-8")) if record_file.is_file() else {}
            if record.get("repo_id") != self.hub_model_id or record.get("revision") != branch:
                self._push_task_revision(number, name, branch)

    def _push_sequence_end(self) -> None:
        """After the last task: :meth:`push_to_hub` to ``args.hub_revision`` (``main``), on every process (it saves
        the model on all of them and uploads from the main one)."""
        done = self.continual_result.num_learned
        try:
            self.push_to_hub(commit_message=f"After task {done}: {self.continual_result.task_names[done - 1]}")
        except Exception as exc:
            raise HubPushError(
                f"Every task is trained and on its task-<k>-<name> branch, but pushing the final state to "
                f"{self.args.hub_revision or 'main'} of {self.hub_model_id} failed ({type(exc).__name__}: {exc}). "
                f"The final adapter and result are in {self.args.output_dir}: call trainer.push_to_hub() again once "
                "the cause is fixed."
            ) from exc
