"""Per-task Hub revisions: ContinualTrainingArguments(push_task_revisions=True) against a Hub API mocked by a folder.

``FakeHub`` stands in for the Hugging Face Hub at the level of the functions that the real code calls:
``HfApi.create_repo / create_branch / upload_folder / list_repo_refs`` (huggingface_hub's class, patched on the class
so transformers' ``init_hf_repo`` and our code reach it) and the download functions where PEFT and peft-inflora look
them up (``peft.config.hf_hub_download`` for ``PeftConfig.from_pretrained``, ``peft.utils.save_and_load.file_exists``
and ``hf_hub_download`` for ``load_peft_weights``, ``huggingface_hub.hf_hub_download`` for
``ContinualResult.from_pretrained``). It keeps one folder per (repository, revision), refuses uploads to a branch that
was not created and filters uploads with huggingface_hub's own ``filter_repo_objects``. ``HF_HUB_OFFLINE`` is turned
off for the module so that PEFT takes its online code path (``file_exists`` then ``hf_hub_download``).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import huggingface_hub
import peft.config
import peft.utils.other
import peft.utils.save_and_load
import pytest
import torch
from continual_fixtures import bert, inflora_bert, tasks, training_args
from huggingface_hub.errors import EntryNotFoundError
from huggingface_hub.hf_api import CommitInfo, GitRefInfo, GitRefs, RepoUrl
from huggingface_hub.utils import filter_repo_objects
from peft import PeftModel
from transformers import Trainer, TrainingArguments

from peft_inflora import ContinualCallback, ContinualResult, ContinualTask, ContinualTrainer
from peft_inflora.continual.hub import HubPushError, task_revision_name, task_revision_names, task_revisions


HUB_FILES = ["README.md", "accuracy_curve.png", "accuracy_matrix.png", "adapter_config.json",
             "adapter_model.safetensors", "class_statistics.safetensors", "continual_result.json"]
NAMES = ["news_a", "News B", "party!"]
BRANCHES = ["task-1-news_a", "task-2-news-b", "task-3-party"]


class FakeHub:
    """A Hub in a folder: ``root/<repo_id>/<revision>/<files>``. ``calls`` records every call; an upload to a
    (repo, revision) in ``fail_uploads`` raises ``ConnectionError`` once."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.calls: list[tuple] = []
        self.fail_uploads: set[tuple[str, str]] = set()

    def folder(self, repo_id: str, revision: str | None = None) -> Path:
        return self.root / repo_id / (revision or "main")

    def files(self, repo_id: str, revision: str | None = None) -> list[str]:
        folder = self.folder(repo_id, revision)
        return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())

    def branches(self, repo_id: str) -> list[str]:
        return sorted(p.name for p in (self.root / repo_id).iterdir())

    def calls_for(self, repo_id: str, kind: str) -> list[tuple]:
        return [c for c in self.calls if c[0] == kind and c[1] == repo_id]

    # -- HfApi methods (installed on the class: `api` is the HfApi instance)
    def create_repo(self, api, repo_id, *, exist_ok=False, **kwargs):
        main = self.folder(repo_id)
        if main.exists() and not exist_ok:
            raise FileExistsError(f"409: {repo_id} exists")
        main.mkdir(parents=True, exist_ok=True)
        self.calls.append(("create_repo", repo_id, kwargs.get("private")))
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def create_branch(self, api, repo_id, *, branch, revision=None, exist_ok=False, **kwargs):
        source, target = self.folder(repo_id, revision), self.folder(repo_id, branch)
        if not source.is_dir():
            raise ValueError(f"404: revision {revision!r} of {repo_id} not found")
        self.calls.append(("create_branch", repo_id, branch, revision))
        if target.exists():
            if not exist_ok:
                raise FileExistsError(f"409: branch {branch} of {repo_id} exists")
            return
        shutil.copytree(source, target)

    def upload_folder(self, api, *, repo_id, folder_path, revision=None, allow_patterns=None, ignore_patterns=None,
                      commit_message=None, run_as_future=False, path_in_repo=None, **kwargs):
        assert not run_as_future
        target = self.folder(repo_id, revision)
        if not target.is_dir():  # the Hub does not create branches on upload
            raise ValueError(f"404: revision {revision!r} of {repo_id} not found")
        if (repo_id, revision or "main") in self.fail_uploads:
            self.fail_uploads.discard((repo_id, revision or "main"))
            raise ConnectionError("the connection dropped")
        source = Path(folder_path)
        paths = sorted(p.relative_to(source).as_posix() for p in source.rglob("*") if p.is_file())
        selected = list(filter_repo_objects(paths, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns))
        prefix = f"{path_in_repo.strip('/')}/" if path_in_repo else ""
        for path in selected:
            (target / prefix / path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(source / path, target / prefix / path)
        self.calls.append(("upload", repo_id, revision or "main", [prefix + p for p in selected]))
        oid = hashlib.sha1(repr(len(self.calls)).encode()).hexdigest()
        return CommitInfo(commit_url=f"https://huggingface.co/{repo_id}/commit/{oid}", commit_message=commit_message,
                          commit_description="", oid=oid)

    def list_repo_refs(self, api, repo_id, **kwargs):
        branches = [GitRefInfo(name=name, ref=f"refs/heads/{name}", target_commit="0" * 40)
                    for name in self.branches(repo_id)]
        return GitRefs(branches=branches, converts=[], tags=[])

    # -- download functions
    def hf_hub_download(self, repo_id, filename, *, subfolder=None, revision=None, **kwargs):
        self.calls.append(("download", repo_id, revision, filename))
        folder = self.folder(repo_id, revision)
        if not folder.is_dir():
            raise ValueError(f"404: revision {revision!r} of {repo_id} not found")
        path = folder / subfolder / filename if subfolder else folder / filename
        if not path.is_file():
            raise EntryNotFoundError(f"404: {filename} not in {repo_id}@{revision}")
        return str(path)

    def file_exists(self, repo_id, filename, *, revision=None, **kwargs):
        return (self.folder(repo_id, revision) / filename).is_file()

    def install(self, mp: pytest.MonkeyPatch) -> None:
        for name in ("create_repo", "create_branch", "upload_folder", "list_repo_refs"):
            method = getattr(self, name)
            mp.setattr(huggingface_hub.HfApi, name, lambda api, *a, _m=method, **k: _m(api, *a, **k))
        for module in (peft.config, peft.utils.save_and_load, huggingface_hub):
            mp.setattr(module, "hf_hub_download", self.hf_hub_download)
        for module in (peft.utils.save_and_load, peft.utils.other):
            mp.setattr(module, "file_exists", self.file_exists)
        mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # PEFT's online path: file_exists + download


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    fake = FakeHub(tmp_path_factory.mktemp("hub"))
    with pytest.MonkeyPatch.context() as mp:
        fake.install(mp)
        yield fake


def named_tasks(classes=(2, 3, 2), names=NAMES) -> list[ContinualTask]:
    seq = tasks(classes)
    for task, name in zip(seq, names):
        task.name = name
    return seq


def probe(seq: list[ContinualTask]) -> dict[str, torch.Tensor]:
    """Four test inputs of every task, as one batch."""
    rows = [t.eval_dataset[i] for t in seq for i in range(4)]
    return {key: torch.tensor([r[key] for r in rows]) for key in ("input_ids", "attention_mask")}


def logits(model, inputs) -> torch.Tensor:
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = model(**inputs).logits
    model.train(was_training)
    return out


class RecordAfterTask(ContinualCallback):
    """The logits on the probe batch and the accuracy rows right after every task."""

    def __init__(self, inputs):
        self.inputs, self.logits, self.rows = inputs, {}, {}

    def on_task_end(self, args, state, control, task, task_index, result, model=None, **kwargs):
        self.logits[task_index + 1] = logits(model, self.inputs)
        self.rows[task_index + 1] = [list(row) for row in result.accuracy_matrix]


def hub_args(out, repo_id, **overrides) -> TrainingArguments:
    """Only the per-task branches and the final main push: hub_strategy="end" (test_hub_strategy covers the others)."""
    overrides.setdefault("hub_strategy", "end")
    return training_args(out, num_train_epochs=1, push_to_hub=True, hub_model_id=repo_id, **overrides)


# ---------------------------------------------------------------------------------------------- naming
@pytest.mark.parametrize("number, name, branch", [
    (1, "news_a", "task-1-news_a"),
    (2, "News B", "task-2-news-b"),
    (3, "party!", "task-3-party"),
    (4, "v1..2", "task-4-v1.2"),  # git refuses ".."
    (5, "Sub / Task .lock", "task-5-sub-task-lock"),  # and a trailing ".lock"
    (12, " -.x.- ", "task-12-x"),
])
def test_task_names_become_valid_branch_names(number, name, branch):
    assert task_revision_name(number, name) == branch


@pytest.mark.parametrize("names, match", [
    (["ok", "!!!"], "'!!!' gives no usable branch name"),
    (["ok", "日本語"], "gives no usable branch name"),
    (["News B", "news-b"], "'News B' and 'news-b' give the same branch name part 'news-b'"),
])
def test_names_without_a_branch_name_or_with_the_same_one_are_refused(names, match):
    with pytest.raises(ValueError, match=match):
        task_revision_names(names)


def test_task_revisions_maps_task_numbers_to_branches_and_refuses_ambiguity(hub):
    for branch in ("main", "task-1-a", "task-2-b", "task-10-c", "task-x-y", "task-0-z", "feature", "task-3"):
        hub.folder("me/listing", branch).mkdir(parents=True)
    assert task_revisions("me/listing") == {1: "task-1-a", 2: "task-2-b", 10: "task-10-c"}
    assert list(task_revisions("me/listing")) == [1, 2, 10]
    hub.folder("me/listing", "task-2-other").mkdir()
    with pytest.raises(ValueError, match=r"\{2: \['task-2-b', 'task-2-other'\]\}"):
        task_revisions("me/listing")


# ---------------------------------------------------------------------------------------------- a pushed sequence
@pytest.fixture(scope="module")
def pushed_run(hub, tmp_path_factory):
    seq = named_tasks()
    recorder = RecordAfterTask(probe(seq))
    trainer = ContinualTrainer(model=inflora_bert(), callbacks=[recorder],
                               args=hub_args(tmp_path_factory.mktemp("run"), "me/seq", push_task_revisions=True))
    result = trainer.train_continual(seq)
    return trainer, result, recorder, seq


def test_one_branch_per_task_created_from_main_and_main_pushed_last(hub, pushed_run):
    assert hub.calls_for("me/seq", "create_repo") == [("create_repo", "me/seq", None)]
    assert hub.calls_for("me/seq", "create_branch") == [("create_branch", "me/seq", b, None) for b in BRANCHES]
    uploads = hub.calls_for("me/seq", "upload")
    assert [u[2] for u in uploads] == BRANCHES + ["main"]
    assert all(sorted(u[3]) == HUB_FILES for u in uploads)  # exactly what push_to_hub uploads, every time
    assert hub.branches("me/seq") == sorted(BRANCHES + ["main"])
    assert task_revisions("me/seq") == dict(enumerate(BRANCHES, start=1))
    _, _, recorder, _ = pushed_run
    assert not any(torch.equal(recorder.logits[k], recorder.logits[k + 1]) for k in (1, 2))  # the tasks differ


@pytest.mark.parametrize("k", [1, 2, 3])
def test_each_branch_loads_the_adapter_and_result_right_after_its_task(hub, pushed_run, k):
    trainer, _, recorder, _ = pushed_run
    branch = BRANCHES[k - 1]
    assert hub.files("me/seq", branch) == HUB_FILES
    model = PeftModel.from_pretrained(bert(num_labels=[2, 5, 7][k - 1]), "me/seq", revision=branch)  # head grown
    assert model.tasks_done() == k
    assert torch.equal(logits(model, recorder.inputs), recorder.logits[k])  # bit for bit
    for file in ("adapter_config.json", "adapter_model.safetensors"):  # config and weights read from the branch
        assert ("download", "me/seq", branch, file) in hub.calls
    result = ContinualResult.from_pretrained("me/seq", revision=branch)
    assert result.num_learned == k and result.accuracy_matrix == recorder.rows[k]
    assert result.task_names == [t.name for t in pushed_run[3]]
    card = (hub.folder("me/seq", branch) / "README.md").read_text()
    assert f'revision="{branch}"' in card and f"after task {k} ({NAMES[k - 1]})" in card
    assert f"Tasks learned ({k}): " + ", ".join(NAMES[:k]) in card


def test_main_holds_the_final_adapter_and_result(hub, pushed_run):
    trainer, result, recorder, _ = pushed_run
    assert hub.files("me/seq") == HUB_FILES
    model = PeftModel.from_pretrained(bert(num_labels=7), "me/seq")
    assert model.tasks_done() == 3
    assert torch.equal(logits(model, recorder.inputs), recorder.logits[3])
    assert torch.equal(logits(trainer.peft_model, recorder.inputs), recorder.logits[3])
    assert ContinualResult.from_pretrained("me/seq").accuracy_matrix == result.accuracy_matrix
    card = (hub.folder("me/seq") / "README.md").read_text()
    assert "revision=" not in card and "Tasks learned (3)" in card


def test_continuing_from_a_mid_sequence_branch_ends_like_the_uninterrupted_run(hub, pushed_run, tmp_path):
    _, result, recorder, seq = pushed_run
    model = PeftModel.from_pretrained(bert(num_labels=2), "me/seq", revision="task-1-news_a", is_trainable=True)
    previous = ContinualResult.from_pretrained("me/seq", revision="task-1-news_a")
    trainer = ContinualTrainer(model=model, args=hub_args(tmp_path, "you/continued", push_task_revisions=True))
    continued = trainer.train_continual(named_tasks(), previous_result=previous)
    assert continued.accuracy_matrix == result.accuracy_matrix  # same seeds and data order: the same run
    assert torch.equal(logits(model, recorder.inputs), recorder.logits[3])
    # the task numbers go on from the mid-point: no branch for the task that came with the download
    assert [c[2] for c in hub.calls_for("you/continued", "create_branch")] == BRANCHES[1:]
    assert ContinualResult.from_pretrained("you/continued", revision=BRANCHES[1]).accuracy_matrix == recorder.rows[2]


# ---------------------------------------------------------------------------------------------- failures
def test_a_failed_upload_raises_after_the_checkpoint_and_resume_pushes_it_first(hub, tmp_path):
    seq = named_tasks((2, 2), ["t0", "t1"])
    args = hub_args(tmp_path, "me/flaky", push_task_revisions=True)
    hub.fail_uploads.add(("me/flaky", "task-2-t1"))
    trainer = ContinualTrainer(model=inflora_bert(), args=args)
    with pytest.raises(HubPushError, match=r"task 2 \('t1'\) to branch 'task-2-t1'.*resume_from_checkpoint=True"):
        trainer.train_continual(seq)
    checkpoint = tmp_path / "continual" / "after-task-02"
    assert (checkpoint / "adapter_model.safetensors").is_file() and not (checkpoint / "hub_revision.json").exists()
    assert json.loads((tmp_path / "continual" / "after-task-01" / "hub_revision.json").read_text())["revision"] \
        == "task-1-t0"
    assert "adapter_model.safetensors" not in hub.files("me/flaky", "task-2-t1")
    assert [u[2] for u in hub.calls_for("me/flaky", "upload")] == ["task-1-t0"]  # main not pushed yet

    restarted = ContinualTrainer(model=inflora_bert(), args=args)
    result = restarted.train_continual(seq, resume_from_checkpoint=True)
    assert result.num_learned == 2
    assert [u[2] for u in hub.calls_for("me/flaky", "upload")] == ["task-1-t0", "task-2-t1", "main"]
    inputs = probe(seq)
    local = PeftModel.from_pretrained(bert(num_labels=4), str(checkpoint))
    pushed = PeftModel.from_pretrained(bert(num_labels=4), "me/flaky", revision="task-2-t1")
    assert pushed.tasks_done() == 2 and torch.equal(logits(pushed, inputs), logits(local, inputs))
    assert ContinualResult.from_pretrained("me/flaky", revision="task-2-t1").num_learned == 2


def test_only_the_main_process_uploads(hub, tmp_path, monkeypatch):
    monkeypatch.setattr(ContinualTrainer, "is_world_process_zero", lambda self: False)
    monkeypatch.setattr(TrainingArguments, "should_save", property(lambda self: False))  # as on rank 1
    trainer = ContinualTrainer(model=inflora_bert(), args=hub_args(tmp_path, "me/rank1", push_task_revisions=True))
    result = trainer.train_continual(named_tasks((2,), ["t0"]))
    assert result.num_learned == 1 and trainer.peft_model.tasks_done() == 1
    assert [c for c in hub.calls if c[1] == "me/rank1"] == []


def test_push_to_hub_on_a_transformers_whose_init_hf_repo_takes_no_private(hub, tmp_path, monkeypatch):
    """transformers < 5.23 (``Trainer.init_hf_repo(token)``): ``push_to_hub(private=...)`` other than the arguments'
    ``hub_private_repo`` is refused before anything is created or uploaded; without it the repository is created
    as the arguments say and the push goes through."""
    real = Trainer.init_hf_repo

    def init_hf_repo(self, token=None):  # transformers 5.17's signature
        real(self, token=token)

    monkeypatch.setattr(ContinualTrainer, "init_hf_repo", init_hf_repo)
    trainer = ContinualTrainer(model=inflora_bert(), args=training_args(tmp_path, hub_model_id="me/old-transformers",
                                                                        hub_private_repo=True))
    with pytest.raises(TypeError, match=r"push_to_hub\(private=...\) needs transformers>=5.23 .* set "
                                        "hub_private_repo in the training arguments"):
        trainer.push_to_hub(private=False)
    assert hub.calls_for("me/old-transformers", "create_repo") == []
    assert hub.calls_for("me/old-transformers", "upload") == []
    trainer.push_to_hub(private=True)  # the arguments' value: nothing to pass
    assert hub.calls_for("me/old-transformers", "create_repo") == [("create_repo", "me/old-transformers", True)]
    assert "adapter_model.safetensors" in hub.files("me/old-transformers")


# ---------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("overrides, value, match", [
    ({}, True, r"set push_to_hub=True, hub_model_id='<user or org>/<repo>' \(--push_to_hub --hub_model_id\)"),
    ({"hub_model_id": "me/x"}, True, r"set push_to_hub=True \(--push_to_hub\)"),
    ({"push_to_hub": True}, True, r"set hub_model_id="),
    ({"push_to_hub": True, "hub_model_id": "me/x", "push_task_revisions": False, "task_revision_base": "dev"}, None,
     "task_revision_base .* needs push_task_revisions=True"),
    ({"push_to_hub": True, "hub_model_id": "me/x"}, "tag", "must be True or False"),
])
def test_enabling_revisions_without_a_hub_repository_fails_in_the_arguments(hub, tmp_path, overrides, value, match):
    before = len(hub.calls)
    overrides = dict(overrides)
    if value is not None:
        overrides["push_task_revisions"] = value
    with pytest.raises(ValueError, match=match):
        training_args(tmp_path, **overrides)  # refused before any trainer exists, so before any repository
    assert hub.calls[before:] == []


@pytest.mark.parametrize("names, match", [
    (["t0", "???"], "'\\?\\?\\?' gives no usable branch name"),
    (["News B", "news-b"], "give the same branch name part 'news-b'"),
])
def test_task_names_without_a_distinct_branch_fail_before_training(hub, tmp_path, names, match):
    trainer = ContinualTrainer(model=inflora_bert(), args=hub_args(tmp_path, "me/badnames", push_task_revisions=True))
    with pytest.raises(ValueError, match=match):
        trainer.train_continual(named_tasks((2, 2), names))
    assert trainer.peft_model.tasks_done() == 0 and not trainer.peft_model.task_in_progress()
    assert hub.calls_for("me/badnames", "create_branch") == [] and hub.calls_for("me/badnames", "upload") == []
    assert not (tmp_path / "continual").exists()


def test_after_a_failed_push_the_next_train_task_pushes_the_missing_branch_first(hub, tmp_path):
    seq = named_tasks((2, 2), ["t0", "t1"])
    hub.fail_uploads.add(("me/onebyone", "task-1-t0"))
    trainer = ContinualTrainer(model=inflora_bert(), args=hub_args(tmp_path, "me/onebyone", push_task_revisions=True))
    with pytest.raises(HubPushError, match=r"task 1 \('t0'\) to branch 'task-1-t0'"):
        trainer.train_task(seq[0])
    assert trainer.peft_model.tasks_done() == 1 and hub.calls_for("me/onebyone", "upload") == []
    trainer.train_task(seq[1])  # a lone train_task also moves main to the latest task
    assert [u[2] for u in hub.calls_for("me/onebyone", "upload")] == ["task-1-t0", "task-2-t1", "main"]
    assert ContinualResult.from_pretrained("me/onebyone", revision="task-1-t0").num_learned == 1


def test_task_branches_are_created_from_task_revision_base(hub, tmp_path):
    args = hub_args(tmp_path, "me/based", push_task_revisions=True, task_revision_base="dev", max_steps=1)
    trainer = ContinualTrainer(model=inflora_bert(), args=args)
    hub.folder("me/based", "dev").mkdir(parents=True)
    trainer.train_continual(named_tasks((2,), ["t0"]))
    assert hub.calls_for("me/based", "create_branch") == [("create_branch", "me/based", "task-1-t0", "dev")]
