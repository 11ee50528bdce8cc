"""ContinualTrainer: the task loop, class-/task-incremental heads, metrics and files, callbacks, resume, Hub."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from continual_fixtures import bert, inflora_bert, tasks, training_args
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

from peft_inflora import ContinualCallback, ContinualResult, ContinualTask, ContinualTrainer
from peft_inflora.continual.heads import ensure_head_size, find_head


HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    model = inflora_bert()
    trainer = ContinualTrainer(model=model, args=training_args(out))
    result = trainer.train_continual(tasks())
    return trainer, result, out


def test_a_run_gives_the_accuracy_matrix_metrics_times_and_files(finished_run):
    trainer, result, out = finished_run
    assert result.task_names == ["t0", "t1", "t2"]
    assert [len(row) for row in result.accuracy_matrix] == [1, 2, 3]
    assert all(0.0 <= a <= 1.0 for row in result.accuracy_matrix for a in row)
    a = result.accuracy_matrix
    assert result.final_accuracy == pytest.approx(sum(a[2]) / 3)
    assert result.backward_transfer == pytest.approx(((a[2][0] - a[0][0]) + (a[2][1] - a[1][1])) / 2)
    assert len(result.train_seconds) == 3 and all(s > 0 for s in result.train_seconds)
    assert len(result.statistics_seconds) == 3 and all(s > 0 for s in result.statistics_seconds)
    assert trainer.peft_model.tasks_done() == 3 and not trainer.peft_model.task_in_progress()
    saved = ContinualResult.from_json(out / "continual_result.json")
    assert saved.accuracy_matrix == result.accuracy_matrix
    for png in ("accuracy_matrix.png", "accuracy_curve.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for k in (1, 2, 3):
        progress = json.loads((out / "continual" / f"after-task-{k:02d}" / "progress.json").read_text())
        assert progress["tasks_done"] == k


def test_the_head_is_grown_to_all_classes_of_the_sequence(finished_run):
    trainer, _, _ = finished_run
    _, head = find_head(trainer.peft_model)
    assert head.out_features == 2 + 3 + 2
    assert trainer.peft_model.config.num_labels == 7


def test_the_first_task_is_learned(finished_run):
    _, result, _ = finished_run
    assert result.accuracy_matrix[0][0] >= 0.9  # marker tokens make task 0 easy


@pytest.mark.parametrize("head_logits", ["linear", "cosine"])
def test_old_head_rows_stay_bit_identical_while_later_tasks_train_even_with_weight_decay(tmp_path, head_logits):
    # training alone (no alignment after the task, which may re-fit old rows: the authors' alignment does)
    class Snapshot(ContinualCallback):
        rows = {}

        def on_task_end(self, args, state, control, task, task_index, result, model=None, **kwargs):
            head = model.base_model.model.classifier.modules_to_save["default"]
            Snapshot.rows[task_index] = (head.weight.detach().clone(), head.bias.detach().clone())

    trainer = ContinualTrainer(model=inflora_bert(), callbacks=[Snapshot()],
                               args=training_args(tmp_path, weight_decay=0.5, head_logits=head_logits,
                                                  classifier_alignment="none"))
    trainer.train_continual(tasks((2, 3)))
    w0, b0 = Snapshot.rows[0]
    w1, b1 = Snapshot.rows[1]
    assert torch.equal(w1[:2], w0[:2]) and torch.equal(b1[:2], b0[:2])  # task 0's classes
    assert not torch.equal(w1[2:5], w0[2:5])  # task 1's classes trained


def test_task_incremental_evaluation_is_at_least_class_incremental(finished_run):
    trainer, result, _ = finished_run
    assert trainer.evaluate_tasks() == result.accuracy_matrix[2]
    trainer.args.setting = "task_incremental"
    try:
        til = trainer.evaluate_tasks()
    finally:
        trainer.args.setting = "class_incremental"
    assert all(t >= c - 1e-9 for t, c in zip(til, result.accuracy_matrix[2]))
    assert til != result.accuracy_matrix[2]  # choosing among fewer classes changes some answer


def test_task_events_reach_callbacks_in_order(tmp_path):
    events = []

    class Recorder(ContinualCallback):
        def on_task_begin(self, args, state, control, task, task_index, model=None, **kwargs):
            events.append(("begin", task_index, model.task_in_progress()))

        def on_task_end(self, args, state, control, task, task_index, result, **kwargs):
            events.append(("end", task_index, result.num_learned))

    trainer = ContinualTrainer(model=inflora_bert(), args=training_args(tmp_path, num_train_epochs=1),
                               callbacks=[Recorder()])
    trainer.train_continual(tasks((2, 2)))
    assert events == [("begin", 0, True), ("end", 0, 1), ("begin", 1, True), ("end", 1, 2)]


def test_other_peft_methods_run_as_a_sequential_baseline(tmp_path):
    model = get_peft_model(bert(), LoraConfig(r=4, target_modules=["query", "value"], modules_to_save=["classifier"]))
    trainer = ContinualTrainer(model=model, args=training_args(tmp_path, num_train_epochs=1))
    assert not trainer.is_inflora
    result = trainer.train_continual(tasks((2, 2)))
    assert result.num_learned == 2


@pytest.mark.parametrize(
    "bad, match",
    [
        ([], "empty"),
        ("duplicate", "unique"),
        ("no_eval", "no eval_dataset"),
        ("label_out_of_range", r"labels must be in 0\.\.0 \(the task's own classes\), got 0\.\.1"),
    ],
)
def test_bad_task_lists_fail_before_training(tmp_path, bad, match):
    trainer = ContinualTrainer(model=inflora_bert(), args=training_args(tmp_path, num_train_epochs=1))
    seq = tasks((2, 2))
    if bad == "duplicate":
        seq[1].name = seq[0].name
    elif bad == "no_eval":
        seq = [ContinualTask("t0", seq[0].train_dataset, None)]
    elif bad == "label_out_of_range":
        seq = [ContinualTask("t0", seq[0].train_dataset, seq[0].eval_dataset, label_names=["a"])]
    elif bad == []:
        seq = []
    with pytest.raises(ValueError, match=match):
        trainer.train_continual(seq)


def test_a_plain_model_is_refused(tmp_path):
    with pytest.raises(TypeError, match="get_peft_model"):
        ContinualTrainer(model=bert(), args=training_args(tmp_path))


def test_push_to_hub_uploads_adapter_memory_and_card_and_the_download_continues_the_sequence(tmp_path, monkeypatch):
    import huggingface_hub

    hub = tmp_path / "hub"
    calls = {}

    def fake_create_repo(self, repo_id, **kwargs):
        calls["create_repo"] = repo_id
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

    def fake_upload_folder(self, *, repo_id, folder_path, allow_patterns=None, revision=None, **kwargs):
        calls["upload"] = (repo_id, revision)
        for pattern in allow_patterns:
            for f in Path(folder_path).glob(pattern):
                if f.is_file():
                    hub.mkdir(exist_ok=True)
                    shutil.copy(f, hub / f.name)
        return "commit"

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", fake_create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", fake_upload_folder)
    out = tmp_path / "run"
    # a linear head aligned by its new rows (head_logits="linear") keeps the learned classes' rows bit for bit
    trainer = ContinualTrainer(model=inflora_bert(), args=training_args(out, num_train_epochs=1, head_logits="linear",
                                                                        hub_model_id="me/inflora-demo"))
    seq = tasks((2, 3, 2))
    trainer.train_continual(seq[:2])
    assert trainer.push_to_hub() == "commit"
    assert calls["upload"][0] == "me/inflora-demo"
    assert sorted(p.name for p in hub.iterdir()) == ["README.md", "accuracy_curve.png", "accuracy_matrix.png",
                                                     "adapter_config.json", "adapter_model.safetensors",
                                                     "class_statistics.safetensors", "continual_result.json"]
    card = (hub / "README.md").read_text()
    assert "import peft_inflora" in card and "t0, t1" in card and "final accuracy" in card
    # someone else downloads it and continues with the third task
    downloaded = PeftModel.from_pretrained(bert(num_labels=5), hub, is_trainable=True)
    assert downloaded.tasks_done() == 2
    ref_in = {k: torch.tensor([v]) for k, v in seq[0].eval_dataset[0].items() if k != "label"}
    trainer.peft_model.eval()
    with torch.no_grad():
        assert torch.equal(downloaded(**ref_in).logits, trainer.peft_model(**ref_in).logits)
    nxt = ContinualTrainer(model=downloaded, args=training_args(tmp_path / "next", num_train_epochs=1,
                                                                head_logits="linear"))
    with pytest.raises(ValueError, match="previous_result"):  # the learned tasks' classes must not be reused
        nxt.train_continual([seq[2]])
    with pytest.raises(ValueError, match="must start with"):
        nxt.train_continual([seq[1], seq[0], seq[2]], previous_result=hub)
    assert downloaded.tasks_done() == 2
    head = downloaded.base_model.model.classifier.modules_to_save["default"]
    old_rows = head.weight[:5].detach().clone()  # tasks t0 (2 classes) and t1 (3 classes)
    result = nxt.train_continual(seq, previous_result=ContinualResult.from_pretrained(hub))
    assert downloaded.tasks_done() == 3 and result.num_learned == 3
    assert result.accuracy_matrix[:2] == trainer.continual_result.accuracy_matrix  # the uploader's rows carry over
    assert len(result.accuracy_matrix[2]) == 3  # the new row evaluates the two downloaded tasks too
    head = downloaded.base_model.model.classifier.modules_to_save["default"]  # grown: a new module
    assert head.out_features == 7
    assert torch.equal(head.weight[:5], old_rows)  # the learned classes keep their head rows


def _kill_after_step(task_index: int, step: int) -> str:
    """A ``Kill`` callback that ends the process after optimizer step ``step`` of task ``task_index``."""
    return (
        "class Kill(ContinualCallback):\n"
        "    task = -1\n"
        "    def on_task_begin(self, args, state, control, task, task_index, **kw):\n"
        "        Kill.task = task_index\n"
        "    def on_step_end(self, args, state, control, **kw):\n"
        f"        if Kill.task == {task_index} and state.global_step == {step}:\n"
        "            os._exit(17)\n"
    )


KILLS = {
    # at the start of the third task (its statistics pass done, nothing trained yet)
    "at task begin": (
        "class Kill(ContinualCallback):\n"
        "    def on_task_begin(self, args, state, control, task, task_index, **kw):\n"
        "        if task_index == 2:\n"
        "            os._exit(17)\n"
    ),
    # in the middle of the second task's training, after its third optimizer step
    "mid task": _kill_after_step(1, 3),
    # the same with the Trainer's checkpoints every 2 steps (save_strategy="steps"): task 2 resumes from its step 2
    "mid task, Trainer checkpoint in the first epoch": _kill_after_step(1, 3),
    # after step 9 of task 2 (2 epochs of 6 steps), resumed from its step 8, inside the last epoch
    "mid task, Trainer checkpoint in the last epoch": _kill_after_step(1, 9),
    # while the checkpoint after the second task is being written: its safetensors file half written, not renamed
    "during a save": (
        "import peft_inflora.continual.checkpoint as T\n"
        "real_replace = T.os.replace\n"
        "def replace(src, dst):\n"
        "    if str(dst).endswith('after-task-02'):\n"
        "        f = os.path.join(src, 'adapter_model.safetensors')\n"
        "        data = open(f, 'rb').read()\n"
        "        open(f, 'wb').write(data[: len(data) // 2])\n"
        "        os._exit(17)\n"
        "    real_replace(src, dst)\n"
        "T.os.replace = replace\n"
        "class Kill(ContinualCallback):\n"
        "    pass\n"
    ),
}


def _run_script(out: Path, kill: str | None, resume: bool, save_steps: int = 0,
                save_only_model: bool = False) -> subprocess.CompletedProcess:
    """The fixtures' three tasks in a new process (killed as ``KILLS[kill]`` says); it prints the global step at which
    each task's training started (``first step <k>``: a task resumed from a Trainer checkpoint does not start at 1)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), str(HERE.parent / "src"),
                                                       os.environ.get("PYTHONPATH", "")]))
    steps = f", save_strategy='steps', save_steps={save_steps}, save_only_model={save_only_model}" \
        if save_steps else ""
    code = (
        "import os, sys\n"
        "from continual_fixtures import inflora_bert, tasks, training_args\n"
        "from peft_inflora import ContinualCallback, ContinualTrainer\n"
        + (KILLS[kill] if kill else "class Kill(ContinualCallback):\n    pass\n")
        + "class FirstStep(ContinualCallback):\n"
        "    def on_train_begin(self, args, state, control, **kw):\n"
        "        self.seen = False\n"
        "    def on_step_end(self, args, state, control, **kw):\n"
        "        if not self.seen:\n"
        "            print('first step', state.global_step, flush=True)\n"
        "        self.seen = True\n"
        f"trainer = ContinualTrainer(model=inflora_bert(), args=training_args({str(out)!r}{steps}), "
        "callbacks=[Kill(), FirstStep()])\n"
        f"trainer.train_continual(tasks(), resume_from_checkpoint={resume})\n"
    )
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def uninterrupted_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("straight")
    straight = _run_script(out, kill=None, resume=False)
    assert straight.returncode == 0, straight.stderr[-2000:]
    return out


@pytest.mark.parametrize("kill, last_checkpoint, save_steps, only_model, first_steps", [
    ("at task begin", 2, 0, False, [1]), ("mid task", 1, 0, False, [1, 1]), ("during a save", 1, 0, False, [1, 1]),
    ("mid task, Trainer checkpoint in the first epoch", 1, 2, False, [3, 1]),
    ("mid task, Trainer checkpoint in the first epoch", 1, 2, True, [1, 1])])
def test_a_killed_run_resumes_after_the_last_finished_task_and_ends_like_an_uninterrupted_one(
        tmp_path, uninterrupted_run, kill, last_checkpoint, save_steps, only_model, first_steps):
    """Resumed with ``resume_from_checkpoint=True``: after the last finished task, or, with the Trainer's own
    checkpoints (``save_strategy="steps"``), inside the interrupted task from its last one (the first training step
    after the restart is then 3, not 1); bit for bit the uninterrupted run. ``save_only_model`` checkpoints hold no
    optimizer state: the interrupted task starts over."""
    killed = _run_script(tmp_path, kill=kill, resume=False, save_steps=save_steps, save_only_model=only_model)
    assert killed.returncode == 17, killed.stderr[-2000:]
    done = sorted(p.name for p in (tmp_path / "continual").glob("after-task-*"))
    assert done == [f"after-task-{k:02d}" for k in range(1, last_checkpoint + 1)]  # never a half-written one
    resumed = _run_script(tmp_path, kill=None, resume=True, save_steps=save_steps, save_only_model=only_model)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert [int(line.split()[-1]) for line in resumed.stdout.splitlines() if line.startswith("first step")] \
        == first_steps
    a = load_file(tmp_path / "continual" / "after-task-03" / "adapter_model.safetensors")
    b = load_file(uninterrupted_run / "continual" / "after-task-03" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:  # same seeds, same data order, same statistics: bit-identical
        assert torch.equal(a[key], b[key]), key
    ra = json.loads((tmp_path / "continual_result.json").read_text())
    rb = json.loads((uninterrupted_run / "continual_result.json").read_text())
    assert ra["accuracy_matrix"] == rb["accuracy_matrix"]  # the metrics too, exactly


def test_a_task_resumed_inside_its_last_epoch_reads_its_class_statistics_in_one_extra_pass(tmp_path,
                                                                                            uninterrupted_run):
    """Killed after step 9 of task 2 (2 epochs of 6 steps), resumed from its Trainer checkpoint at step 8: the last
    epoch's record of the head's inputs (for the classifier alignment) would hold only its last 4 batches, so the
    task's class statistics come from one eval-mode pass over all 48 examples, as with ``extra_pass``."""
    kill = "mid task, Trainer checkpoint in the last epoch"
    killed = _run_script(tmp_path, kill=kill, resume=False, save_steps=2)
    assert killed.returncode == 17, killed.stderr[-2000:]
    resumed = _run_script(tmp_path, kill=None, resume=True, save_steps=2)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert [int(line.split()[-1]) for line in resumed.stdout.splitlines() if line.startswith("first step")] == [9, 1]
    statistics = load_file(tmp_path / "continual" / "after-task-03" / "class_statistics.safetensors")
    straight = load_file(uninterrupted_run / "continual" / "after-task-03" / "class_statistics.safetensors")
    assert torch.equal(statistics["classes"], straight["classes"])
    task_2 = statistics["tasks"] == 1
    assert statistics["counts"][task_2].sum() == 48 == straight["counts"][task_2].sum()  # every example, once
    assert torch.equal(statistics["counts"], straight["counts"])
    assert not torch.equal(statistics["means"][task_2], straight["means"][task_2])  # the trained model, read after
    result = json.loads((tmp_path / "continual_result.json").read_text())
    assert [len(row) for row in result["accuracy_matrix"]] == [1, 2, 3]


@pytest.mark.parametrize("loss_classes, lo", [("task", 2), ("seen", 0)])
def test_the_loss_is_cross_entropy_over_the_task_or_all_seen_classes(tmp_path, loss_classes, lo):
    trainer = ContinualTrainer(model=inflora_bert(), args=training_args(tmp_path, loss_classes=loss_classes))
    ensure_head_size(trainer.peft_model, 7)  # the head of tasks with 2, 3 and 2 classes
    trainer._task_classes = (2, 5)  # training the second task
    torch.manual_seed(0)
    inputs = {"input_ids": torch.randint(5, 90, (4, 12)), "attention_mask": torch.ones(4, 12, dtype=torch.long),
              "labels": torch.tensor([2, 3, 4, 2])}
    trainer.peft_model.eval()
    with torch.no_grad():
        logits = trainer.peft_model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
        loss = trainer.compute_loss(trainer.peft_model, dict(inputs))
    expected = torch.nn.functional.cross_entropy(logits[:, lo:5], inputs["labels"] - lo)
    assert torch.allclose(loss, expected)
    assert not torch.allclose(loss, torch.nn.functional.cross_entropy(logits[:, 2 - lo:5], inputs["labels"] - 2 + lo))


def test_an_unknown_loss_classes_value_is_refused(tmp_path):
    with pytest.raises(ValueError, match="loss_classes must be one of"):
        training_args(tmp_path, loss_classes="all")
