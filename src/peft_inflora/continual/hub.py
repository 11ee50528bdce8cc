"""The Hugging Face Hub side of a continual run: model cards wherever an adapter is saved, ``push_to_hub`` with
``hub_strategy``, and one branch per task.

``hub_strategy`` (with ``push_to_hub=True``) acts after each finished task, the continual run's unit of saving (see
:meth:`HubMixin._push_after_task`): ``end`` pushes nothing until ``push_to_hub()``; ``every_save`` pushes the state
after each task to the root of ``hub_revision``; ``checkpoint`` also the checkpoint to ``last-checkpoint/``;
``all_checkpoints`` every checkpoint to ``continual/after-task-NN/``. The Trainer's mid-task checkpoints stay local.

With ``push_task_revisions=True`` (a :class:`~.arguments.ContinualArguments` option) every finished task is pushed,
with exactly what ``push_to_hub`` pushes (the adapter with its memory, the processing class, ``continual_result.json``
so far, the plots and a model card), to the branch ``task-<k>-<name>`` of ``hub_model_id``: ``k`` is the task's
1-based position in the whole sequence (the same number as the local checkpoint ``continual/after-task-NN``) and
``<name>`` the task name made into a valid git ref (see :func:`task_revision_name`). Any point of the sequence then
loads with::

    PeftModel.from_pretrained(base, repo_id, revision="task-2-news_b")
    ContinualResult.from_pretrained(repo_id, revision="task-2-news_b")

and :func:`task_revisions` lists the branches of a repository by task number. :class:`HubMixin` holds the trainer
methods (``create_model_card``, ``save_model`` / ``_save``, ``save_for_hub``, ``push_to_hub`` and the per-task
pushes); the card itself is :mod:`.card`.
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any, Optional, Union

from huggingface_hub import ModelCard
from transformers.trainer_utils import HubStrategy

from .card import TRAINING_OPTIONS, CardLocation, build_model_card
from .checkpoint import LOCAL_FILES, PLOT_FILES, TASK_REVISION_RECORD, checkpoint_dir, write_result
from .head_alignment import CLASS_STATISTICS_FILE
from .result import RESULT_FILE, ContinualResult
from .revisions import task_revision_name, task_revision_names, task_revisions


__all__ = ["HUB_FILES", "HubMixin", "HubPushError", "task_revision_name", "task_revision_names", "task_revisions"]

# What push_to_hub uploads from output_dir besides the processing class (continual/ goes as hub_strategy says).
RUN_FILES = ("README.md", RESULT_FILE) + PLOT_FILES  # the model card, the result and its plots
HUB_FILES = ("adapter_config.json", "adapter_model.safetensors", CLASS_STATISTICS_FILE) + RUN_FILES


LAST_CHECKPOINT = "last-checkpoint"  # hub_strategy="checkpoint": where the latest checkpoint goes, as in transformers
_VERSIONS = (("peft-inflora", "peft-inflora"), ("PEFT", "peft"), ("Transformers", "transformers"),
             ("PyTorch", "torch"))
CARD_ARGUMENTS = ("language", "license", "tags", "finetuned_from", "tasks", "dataset_tags", "dataset", "dataset_args")


def _version(distribution: str) -> Optional[str]:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


class HubPushError(RuntimeError):
    """An upload to the Hub failed after the local state was saved; the message says where it is and how to retry."""


class HubMixin:
    """The Hub methods of a continual trainer (mixed into :class:`~.loop.ContinualMixin`, over ``Trainer``).

    Every folder the trainer writes an adapter into gets a model card (:mod:`.card`): ``save_model`` (through
    ``Trainer._save``, so also the Trainer's own mid-task checkpoints), each ``continual/after-task-NN``,
    ``save_for_hub`` and ``push_to_hub``. The metadata arguments of ``create_model_card`` (``language``, ``license``,
    ``tags``, ``finetuned_from``, ``tasks``, ``dataset_tags``, ``dataset``, ``dataset_args``), given to it or to
    ``push_to_hub`` / ``save_for_hub``, are kept in :attr:`model_card_kwargs` and used by every later card.
    """

    model_card_kwargs: dict[str, Any]

    # ------------------------------------------------------------------ cards
    def _card_kwargs(self) -> dict[str, Any]:
        if not hasattr(self, "model_card_kwargs") or self.model_card_kwargs is None:
            self.model_card_kwargs = {}
        return self.model_card_kwargs

    def _remember_card_kwargs(self, kwargs: dict[str, Any]) -> None:
        kwargs = dict(kwargs)
        if kwargs.get("dataset_name") is not None and kwargs.get("dataset") is None:  # TRL's name for it
            kwargs["dataset"] = kwargs.pop("dataset_name")
        kwargs.pop("dataset_name", None)
        unknown = sorted(set(kwargs) - set(CARD_ARGUMENTS))
        if unknown:
            raise TypeError(f"Unknown model card argument(s) {unknown}: create_model_card takes "
                            f"{', '.join(CARD_ARGUMENTS)} (those of transformers' Trainer.create_model_card).")
        self._card_kwargs().update({k: v for k, v in kwargs.items() if v is not None})

    def model_card(self, result: Optional[ContinualResult], model_name: str,
                   location: Optional[CardLocation] = None, previous: Optional[Any] = None) -> Any:
        """The ``huggingface_hub.ModelCard`` of the adapter with ``result`` (see :func:`.card.build_model_card`)."""
        peft_model = self.peft_model
        config = peft_model.peft_config[peft_model.active_adapter]
        base = getattr(config, "base_model_name_or_path", None)
        options = {**self.args.continual_dict(), **{k: getattr(self.args, k, None) for k in TRAINING_OPTIONS}}
        classification = self.args.setting != "generation"  # the head's options, "auto" resolved
        options["head_logits"] = self.args.head_mode() if classification else None
        options["classifier_alignment"] = (self.args.alignment_mode() or "none") if classification else None
        capacity = peft_model.capacity_report() if self.is_inflora else None
        versions = {name: _version(dist) for name, dist in _VERSIONS}
        return build_model_card(
            model_name=model_name, result=result, peft_config=config, is_inflora=self.is_inflora,
            setting=self.args.setting, options=options, base_model=base,
            model_class=type(peft_model.get_base_model()).__name__,
            num_labels=getattr(peft_model.config, "num_labels", None), capacity=capacity, location=location,
            previous=previous, versions={k: v for k, v in versions.items() if v}, **self._card_kwargs())

    def write_model_card(self, folder: Union[str, os.PathLike], result: Optional[ContinualResult] = None,
                         model_name: Optional[str] = None, location: Optional[CardLocation] = None) -> Path:
        """Write the card of ``result`` (default: the run's) as ``folder/README.md``, keeping the metadata PEFT's
        ``save_pretrained`` put there (its tags, pipeline tag); returns the path."""
        path = Path(folder) / "README.md"
        previous = ModelCard.load(path).data if path.is_file() else None
        result = result if result is not None else self.continual_result
        name = model_name or self._card_kwargs().get("model_name") or self._default_model_name(folder)
        self.model_card(result, name, location, previous).save(path)
        return path

    def _default_model_name(self, folder: Union[str, os.PathLike]) -> str:
        if self.args.hub_model_id:
            return self.args.hub_model_id.split("/")[-1]
        return Path(self.args.output_dir).resolve().name or Path(folder).resolve().name

    def create_model_card(self, language: Optional[str] = None, license: Optional[str] = None,
                          tags: Union[None, str, list[str]] = None, model_name: Optional[str] = None,
                          finetuned_from: Optional[str] = None, tasks: Union[None, str, list[str]] = None,
                          dataset_tags: Union[None, str, list[str]] = None,
                          dataset: Union[None, str, list[str]] = None,
                          dataset_args: Union[None, str, list[str]] = None,
                          dataset_name: Optional[str] = None) -> None:
        """README.md in ``output_dir`` for the Hub: metadata (``library_name: peft``, ``base_model``, tags, license,
        language, datasets, model-index), the task sequence with its sizes, the accuracy matrix with A_T, A_avg,
        BWT and forgetting, the InfLoRA settings, the capacity left per layer, and how to load and continue. The
        arguments are those of ``transformers.Trainer.create_model_card`` (and TRL's ``dataset_name``, taken as
        ``dataset``); they are kept for every later card."""
        self._remember_card_kwargs(dict(language=language, license=license, tags=tags, finetuned_from=finetuned_from,
                                        tasks=tasks, dataset_tags=dataset_tags, dataset=dataset,
                                        dataset_args=dataset_args, dataset_name=dataset_name))
        if not self.is_world_process_zero():
            return
        Path(self.args.output_dir).mkdir(parents=True, exist_ok=True)
        self.write_model_card(self.args.output_dir, model_name=model_name)

    def model_card_text(self, result: Optional[ContinualResult], model_name: str,
                        revision: Optional[str] = None) -> str:
        """The card of ``result`` as text; with ``revision``, the card of that per-task branch."""
        return str(self.model_card(result, model_name, CardLocation(revision=revision)))

    # ------------------------------------------------------------------ saving
    def _save(self, output_dir: Optional[str] = None, state_dict: Optional[dict] = None) -> None:
        """``Trainer._save`` (adapter, processing class, training_args.bin), then on the saving process the run's
        result and plots (between tasks) and the model card, which replaces PEFT's template."""
        super()._save(output_dir, state_dict=state_dict)
        if not self.args.should_save:
            return
        folder = Path(output_dir if output_dir is not None else self.args.output_dir)
        between_tasks = getattr(self, "_current", None) is None
        result = self.continual_result
        if between_tasks and result is not None and result.accuracy_matrix:
            write_result(result, folder)
        alignment = getattr(self, "_head_alignment", None)
        if alignment is not None:  # the class statistics of the finished tasks, next to the adapter
            alignment.save(folder)
        extra = [] if between_tasks else [
            f"A Trainer checkpoint in the middle of task {self._current[0]} ({self._current[1].name}): the task is "
            "not finished, and a task cannot be resumed from here; the finished tasks are in "
            "`continual/after-task-NN`.", ""]
        self.write_model_card(folder, location=CardLocation(extra_lines=extra))

    def save_for_hub(self, folder: str, model_name: Optional[str] = None, **card_kwargs: Any) -> Path:
        """Write exactly what :meth:`push_to_hub` uploads (adapter with memory, processing class, result, plots,
        model card) into a local ``folder``, which then works as a repository for ``PeftModel.from_pretrained(base,
        folder)`` and ``ContinualResult.from_pretrained(folder)``: the offline stand-in for the Hub."""
        self._remember_card_kwargs(card_kwargs)
        folder = Path(folder)
        self.save_model(str(folder), _internal_call=True)
        if self.is_world_process_zero() and model_name is not None:
            self.write_model_card(folder, model_name=model_name)
        return folder

    def _hub_patterns(self, folder: Union[str, os.PathLike]) -> list[str]:
        """The files of a saved ``folder`` that go to a repository: adapter, result, plots, card, and every file of
        the processing class (whatever its ``save_pretrained`` writes)."""
        patterns = list(HUB_FILES)
        if self.processing_class is not None:
            with tempfile.TemporaryDirectory(prefix="inflora-processor-") as probe:
                self.processing_class.save_pretrained(probe)
                patterns += sorted(p.relative_to(probe).as_posix() for p in Path(probe).rglob("*") if p.is_file())
        return [p for p in dict.fromkeys(patterns) if (Path(folder) / p).exists() or p in HUB_FILES]

    def push_to_hub(self, commit_message: Optional[str] = "End of training", blocking: bool = True,
                    token: Optional[str] = None, revision: Optional[str] = None, private: Optional[bool] = None,
                    **kwargs: Any) -> Any:
        """Push the adapter (with its memory), the processing class, the continual result, the plots and the model
        card to ``args.hub_model_id`` (``revision``, default ``args.hub_revision``). ``kwargs`` go to
        :meth:`create_model_card` (``license=``, ``language=``, ``tags=``, ...). The per-task checkpoints under
        ``continual/`` go to the Hub as ``hub_strategy`` says, after each task (see :meth:`_push_after_task`)."""
        from huggingface_hub import HfApi

        accepts_private = "private" in inspect.signature(self.init_hf_repo).parameters  # transformers >= 5.23
        if self.hub_model_id is None and private not in (None, self.args.hub_private_repo) and not accepts_private:
            raise TypeError(
                f"push_to_hub(private=...) needs transformers>=5.23 (installed: {_version('transformers')}), whose "
                "Trainer.init_hf_repo takes it: set hub_private_repo in the training arguments instead, or upgrade "
                "transformers. Nothing was pushed.")
        self.callback_handler.on_push_begin(self.args, self.state, self.control)
        model_name = kwargs.pop("model_name", None)
        self._remember_card_kwargs(kwargs)
        token = token if token is not None else self.args.hub_token
        if self.hub_model_id is None:
            self.init_hf_repo(token=token, **({"private": private} if accepts_private else {}))
        self.save_model(_internal_call=True)
        if not self.is_world_process_zero():
            return None
        if model_name is not None:
            self.write_model_card(self.args.output_dir, model_name=model_name)
        return HfApi(token=token).upload_folder(
            repo_id=self.hub_model_id, folder_path=self.args.output_dir, commit_message=commit_message,
            revision=revision if revision is not None else self.args.hub_revision,
            allow_patterns=self._hub_patterns(self.args.output_dir), run_as_future=not blocking,
        )

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        """The Trainer's push of its own mid-task checkpoints: none in a continual run (they hold a task in progress,
        which can neither be resumed nor loaded as a finished adapter); the finished tasks are pushed by
        :meth:`_push_after_task` as ``hub_strategy`` says."""

    def _push_after_task(self, task_number: int, task_name: str) -> None:
        """After the checkpoint ``continual/after-task-NN`` is saved, with ``push_to_hub=True``, by ``hub_strategy``:

        * ``end``: nothing (call ``push_to_hub()`` at the end, as with a ``Trainer``);
        * ``every_save``: the state after this task (adapter, processing class, result so far, plots, card) to the
          root of ``hub_revision`` (``main``), which so follows the latest finished task;
        * ``checkpoint``: as ``every_save``, plus the whole checkpoint (with ``progress.json`` and
          ``training_args.json``, a resume point) to ``last-checkpoint/``, replaced after every task;
        * ``all_checkpoints``: as ``every_save``, plus each checkpoint to ``continual/after-task-NN/``, the local
          layout: ``snapshot_download(repo_id, local_dir=output_dir)`` gives an ``output_dir`` to resume in.

        Main process only; each push waits for its upload. A failed upload raises :class:`HubPushError` (the
        checkpoint is saved)."""
        if not self.args.push_to_hub or not self.is_world_process_zero():
            return
        strategy = HubStrategy(self.args.hub_strategy)
        if strategy == HubStrategy.END:
            return
        from huggingface_hub import HfApi

        self.callback_handler.on_push_begin(self.args, self.state, self.control)
        checkpoint = checkpoint_dir(self.args.output_dir, task_number)
        result = ContinualResult.from_json(str(checkpoint / RESULT_FILE))
        api = HfApi(token=self.args.hub_token)
        message = f"After task {task_number}: {task_name}"
        name = self._default_model_name(self.args.output_dir)
        try:
            with tempfile.TemporaryDirectory(prefix="inflora-hub-") as staging:
                stage = Path(staging) / "root"
                shutil.copytree(checkpoint, stage, ignore=shutil.ignore_patterns(*LOCAL_FILES))
                self.write_model_card(stage, result, name)
                api.upload_folder(repo_id=self.hub_model_id, folder_path=str(stage), commit_message=message,
                                  revision=self.args.hub_revision)
                if strategy in (HubStrategy.CHECKPOINT, HubStrategy.ALL_CHECKPOINTS):
                    subfolder = LAST_CHECKPOINT if strategy == HubStrategy.CHECKPOINT else \
                        checkpoint.relative_to(self.args.output_dir).as_posix()
                    stage = Path(staging) / "checkpoint"
                    shutil.copytree(checkpoint, stage, ignore=shutil.ignore_patterns(TASK_REVISION_RECORD))
                    self.write_model_card(stage, result, f"{name} (checkpoint after task {task_number})",
                                          CardLocation(subfolder=subfolder))
                    api.upload_folder(repo_id=self.hub_model_id, folder_path=str(stage), path_in_repo=subfolder,
                                      commit_message=message + ", checkpoint", revision=self.args.hub_revision)
        except Exception as exc:
            raise HubPushError(
                f"Pushing the state after task {task_number} ('{task_name}') to {self.hub_model_id} (hub_strategy="
                f"{strategy.value}) failed ({type(exc).__name__}: {exc}). Nothing is lost: the checkpoint is in "
                f"{checkpoint}. Fix the cause and call trainer.push_to_hub(), or go on with "
                "train_continual(tasks, resume_from_checkpoint=True)."
            ) from exc

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
                stage = Path(staging) / "branch"  # the checkpoint's adapter, processing class, result and plots
                shutil.copytree(checkpoint, stage, ignore=shutil.ignore_patterns(*LOCAL_FILES))
                name = f"{self.hub_model_id.split('/')[-1]} (after task {task_number}: {task_name})"
                self.write_model_card(stage, result, name, CardLocation(revision=branch))
                api = HfApi(token=self.args.hub_token)
                source = self.args.task_revision_base or self.args.hub_revision
                api.create_branch(self.hub_model_id, branch=branch, revision=source, exist_ok=True)
                commit = api.upload_folder(repo_id=self.hub_model_id, folder_path=str(stage), revision=branch,
                                           commit_message=f"After task {task_number}: {task_name}")
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
