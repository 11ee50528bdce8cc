"""Model cards wherever the continual trainer writes an adapter, and hub_strategy against the mocked Hub API.

The Hub is ``FakeHub`` of ``test_hub_revisions`` (huggingface_hub's ``HfApi`` methods patched on the class, one folder
per repository and revision); no network.
"""

from __future__ import annotations

import json
import shutil

import pytest
from continual_fixtures import VOCAB, bert, inflora_bert, tasks, training_args
from huggingface_hub import ModelCard
from peft import PeftModel
from test_hub_revisions import FakeHub
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from peft_inflora import ContinualResult, ContinualTrainer
from peft_inflora.continual.hub import HubPushError


PLACEHOLDER = "[More Information Needed]"
ADAPTER_FILES = {"README.md", "accuracy_curve.png", "accuracy_matrix.png", "adapter_config.json",
                 "adapter_model.safetensors", "class_statistics.safetensors", "continual_result.json"}


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    fake = FakeHub(tmp_path_factory.mktemp("hub"))
    with pytest.MonkeyPatch.context() as mp:
        fake.install(mp)
        yield fake


@pytest.fixture(scope="module")
def tokenizer():
    vocab = {"[PAD]": 0, "[UNK]": 1} | {f"w{i}": i for i in range(2, VOCAB)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]")


def tokenizer_files(tokenizer, tmp_path) -> set[str]:
    tokenizer.save_pretrained(tmp_path / "tok")
    return {p.name for p in (tmp_path / "tok").iterdir()}


def assert_full_card(folder, result: ContinualResult, *, license=None, language=None, base_model=None):
    """The card in ``folder``: Hub metadata, the sequence with sizes, the matrix and metrics, settings, capacity,
    loading; no template placeholder."""
    text = (folder / "README.md").read_text(encoding="utf-8")
    assert PLACEHOLDER not in text and "Model Card for Model ID" not in text
    card = ModelCard.load(folder / "README.md")
    assert card.data.library_name == "peft"
    assert {"peft", "inflora", "continual-learning"} <= set(card.data.tags)
    assert card.data.license == license and card.data.base_model == base_model
    assert card.data.language == ([language] if language else None)
    metrics = {m["type"]: m["value"] for m in card.data.to_dict()["model-index"][0]["results"][0]["metrics"]}
    assert metrics == pytest.approx(result.metrics(), abs=1e-6)
    for name in result.task_names[: result.num_learned]:
        assert f"| `{name}` | " in text
    assert "| 48 | 24 |" in text  # train / eval examples of a task
    assert result.summary_table() in text  # the accuracy matrix, A_T, A_avg, BWT, forgetting
    assert "| `energy_threshold` | `0.95` |" in text and "| `r` | `4` |" in text
    # the class-incremental head as it was trained and aligned ("auto" resolved)
    assert "| `head_logits` | `cosine` |" in text and "| `classifier_alignment` | `authors` |" in text
    assert "## Capacity left per layer" in text and "`bert.encoder.layer.0.attention.self.query` | 32 |" in text
    assert "PeftModel.from_pretrained(base, REPO_ID" in text and "import peft_inflora" in text
    return card, text


# ---------------------------------------------------------------------------------------------- cards
@pytest.fixture(scope="module")
def card_run(tmp_path_factory, tokenizer):
    out = tmp_path_factory.mktemp("cards")
    trainer = ContinualTrainer(model=inflora_bert(), processing_class=tokenizer,
                               args=training_args(out / "run", num_train_epochs=1))
    trainer.train_continual(tasks((2, 3)))
    return trainer, out


def test_every_after_task_checkpoint_holds_a_card_of_that_point_and_the_tokenizer(card_run, tokenizer, tmp_path):
    trainer, out = card_run
    for k in (1, 2):
        checkpoint = out / "run" / "continual" / f"after-task-{k:02d}"
        result = ContinualResult.from_json(checkpoint / "continual_result.json")
        assert result.num_learned == k
        _, text = assert_full_card(checkpoint, result)
        assert f"checkpoint after task {k} of the run" in text
        assert tokenizer_files(tokenizer, tmp_path) <= {p.name for p in checkpoint.iterdir()}


def test_save_model_writes_the_card_result_and_plots_next_to_the_final_adapter(card_run):
    trainer, out = card_run
    trainer.save_model(str(out / "adapter"))  # what the examples write
    assert ADAPTER_FILES <= {p.name for p in (out / "adapter").iterdir()}
    assert_full_card(out / "adapter", trainer.continual_result)
    assert ContinualResult.from_pretrained(out / "adapter").accuracy_matrix == trainer.continual_result.accuracy_matrix


def test_card_arguments_reach_the_metadata_and_are_kept_for_later_cards(card_run):
    trainer, out = card_run
    folder = trainer.save_for_hub(str(out / "for_hub"), license="apache-2.0", language="en",
                                  finetuned_from="sentence-transformers/all-MiniLM-L6-v2", tags=["news"])
    card, _ = assert_full_card(folder, trainer.continual_result, license="apache-2.0", language="en",
                               base_model="sentence-transformers/all-MiniLM-L6-v2")
    assert "news" in card.data.tags
    trainer.create_model_card(dataset_name="bbc_news")  # TRL's name; output_dir's card has the earlier ones too
    card, _ = assert_full_card(out / "run", trainer.continual_result, license="apache-2.0", language="en",
                               base_model="sentence-transformers/all-MiniLM-L6-v2")
    assert card.data.datasets == ["bbc_news"]
    with pytest.raises(TypeError, match="Unknown model card argument"):
        trainer.save_for_hub(str(out / "typo"), licence="mit")


def test_a_mid_task_trainer_checkpoint_gets_a_card_that_says_so(tmp_path):
    trainer = ContinualTrainer(model=inflora_bert(),
                               args=training_args(tmp_path, num_train_epochs=1, save_strategy="epoch"))
    trainer.train_continual(tasks((2,)))
    (checkpoint,) = (tmp_path / "continual" / "task-01-t0").glob("checkpoint-*")
    text = (checkpoint / "README.md").read_text()
    assert PLACEHOLDER not in text and "in the middle of task 1 (t0)" in text


# ---------------------------------------------------------------------------------------------- hub_strategy
@pytest.mark.parametrize("strategy", ["end", "every_save", "checkpoint", "all_checkpoints"])
def test_hub_strategy_decides_what_goes_to_the_hub_after_each_task(hub, tokenizer, tmp_path, strategy):
    repo = f"me/{strategy}"
    out = tmp_path / "run"
    args = training_args(out, num_train_epochs=1, push_to_hub=True, hub_model_id=repo, hub_strategy=strategy,
                         save_strategy="epoch")  # mid-task Trainer checkpoints too: never pushed
    trainer = ContinualTrainer(model=inflora_bert(), args=args, processing_class=tokenizer)
    seq = tasks((2, 3, 2))
    trainer.train_continual(seq[:2])
    root = ADAPTER_FILES | tokenizer_files(tokenizer, tmp_path)
    uploads = [(u[2], sorted(u[3])) for u in hub.calls_for(repo, "upload")]

    def under(prefix, checkpoint):
        files = root | {"progress.json", "training_args.json"}
        return sorted(f"{prefix}/{f}" for f in files)

    expected = {
        "end": [],
        "every_save": [("main", sorted(root))] * 2,
        "checkpoint": [("main", sorted(root)), ("main", under("last-checkpoint", 1))] * 2,
        "all_checkpoints": [("main", sorted(root)), ("main", under("continual/after-task-01", 1)),
                            ("main", sorted(root)), ("main", under("continual/after-task-02", 2))],
    }[strategy]
    assert uploads == expected
    if strategy == "end":
        trainer.push_to_hub(license="mit")
        assert [(u[2], sorted(u[3])) for u in hub.calls_for(repo, "upload")] == [("main", sorted(root))]
    main = hub.folder(repo)
    assert not any("checkpoint-" in f for f in hub.files(repo))
    assert ContinualResult.from_pretrained(repo).accuracy_matrix == trainer.continual_result.accuracy_matrix
    assert PeftModel.from_pretrained(bert(num_labels=5), repo).tasks_done() == 2
    assert_full_card(main, trainer.continual_result, license="mit" if strategy == "end" else None)
    if strategy == "checkpoint":
        assert json.loads((main / "last-checkpoint" / "progress.json").read_text())["tasks_done"] == 2
        text = (main / "last-checkpoint" / "README.md").read_text()
        assert 'subfolder="last-checkpoint"' in text and PLACEHOLDER not in text
    if strategy == "all_checkpoints":  # the repository is an output_dir to resume in
        local = tmp_path / "downloaded"
        shutil.copytree(main, local)
        resumed = ContinualTrainer(model=inflora_bert(), processing_class=tokenizer,
                                   args=training_args(local, num_train_epochs=1))
        result = resumed.train_continual(seq, resume_from_checkpoint=True)
        assert result.accuracy_matrix[:2] == trainer.continual_result.accuracy_matrix and result.num_learned == 3


def test_a_failed_per_task_push_raises_after_the_checkpoint_is_saved(hub, tmp_path):
    hub.folder("me/flaky-save").mkdir(parents=True)
    hub.fail_uploads.add(("me/flaky-save", "main"))
    args = training_args(tmp_path, num_train_epochs=1, push_to_hub=True, hub_model_id="me/flaky-save",
                         hub_strategy="every_save")
    trainer = ContinualTrainer(model=inflora_bert(), args=args)
    with pytest.raises(HubPushError, match=r"after task 1 \('t0'\).*hub_strategy=every_save.*after-task-01"):
        trainer.train_continual(tasks((2, 2)))
    assert (tmp_path / "continual" / "after-task-01" / "adapter_model.safetensors").is_file()
