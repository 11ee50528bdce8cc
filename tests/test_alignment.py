"""Class statistics of head inputs and classifier alignment (peft_inflora.continual.alignment)."""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from peft_inflora.continual.alignment import (
    ClassFeatureAccumulator,
    ClassStatistics,
    HeadInputRecorder,
    align_classifier,
    collect_class_statistics,
    storage_bytes,
    task_normalized_logits,
)


def random_features(n=90, d=6, classes=(0, 1, 2), seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g) * 3 + 1
    y = torch.tensor([classes[i % len(classes)] for i in range(n)])
    return x, y


def test_moments_equal_numpy_float64():
    x, y = random_features()
    acc = ClassFeatureAccumulator(6)
    acc.update(x, y)
    classes, counts, means, covs = acc.moments()
    assert classes == [0, 1, 2]
    xn, yn = x.double().numpy(), y.numpy()
    for i, c in enumerate(classes):
        rows = xn[yn == c]
        assert counts[i] == len(rows)
        np.testing.assert_allclose(means[i].numpy(), rows.mean(0), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(covs[i].numpy(), np.cov(rows.T), rtol=1e-10, atol=1e-12)
    assert means.dtype == covs.dtype == torch.float64


def test_streamed_batches_equal_all_at_once():
    x, y = random_features(n=101)
    whole, streamed = ClassFeatureAccumulator(6), ClassFeatureAccumulator(6)
    whole.update(x, y)
    perm = torch.randperm(101, generator=torch.Generator().manual_seed(1))
    for chunk in perm.split(7):
        streamed.update(x[chunk], y[chunk])
    for a, b in zip(whole.moments()[1:], streamed.moments()[1:]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-10)


def stats_for(storage, rank=None, seed=0):
    stats = ClassStatistics(6, storage, rank=rank)
    for task, classes in enumerate([(0, 1, 2), (3, 4)]):
        acc = ClassFeatureAccumulator(6)
        acc.update(*random_features(classes=classes, seed=seed + task))
        stats.add_task(acc, task)
    return stats


@pytest.mark.parametrize("storage,rank", [("full", None), ("shared", None), ("lowrank", 2)])
def test_with_task_extends_a_copy_and_leaves_the_statistics_as_they_were(storage, rank):
    """What the trainer's alignment step relies on (compute, agree, commit): a failure, or another process's, after
    with_task changed nothing."""
    stats = stats_for(storage, rank)
    before = {k: v.clone() for k, v in stats.state_dict().items()}
    acc = ClassFeatureAccumulator(6)
    acc.update(*random_features(classes=(5, 6), seed=7))
    extended = stats.with_task(acc, 2)
    assert all(torch.equal(before[k], v) for k, v in stats.state_dict().items())  # untouched, scatter included
    assert len(stats) == 5 and len(extended) == 7 and extended.tasks.tolist() == [0, 0, 0, 1, 1, 2, 2]
    stats.add_task(acc, 2)  # the same as adding in place
    assert all(torch.equal(stats.state_dict()[k], v) for k, v in extended.state_dict().items())


def test_shared_storage_is_the_pooled_within_class_covariance():
    stats = stats_for("shared")
    xs = [random_features(classes=(0, 1, 2), seed=0), random_features(classes=(3, 4), seed=1)]
    scatter, dof = np.zeros((6, 6)), 0
    for x, y in xs:
        for c in torch.unique(y):
            rows = x[y == c].double().numpy()
            scatter += (len(rows) - 1) * np.cov(rows.T)
            dof += len(rows) - 1
    for i in range(len(stats)):
        np.testing.assert_allclose(stats.covariance(i).numpy(), scatter / dof, rtol=1e-10)
    assert stats.tasks.tolist() == [0, 0, 0, 1, 1]


def test_lowrank_storage_keeps_the_diagonal_and_the_top_eigenpairs():
    full, low = stats_for("full"), stats_for("lowrank", rank=2)
    for i in range(len(full)):
        cov = full.covariance(i).numpy()
        approx = low.covariance(i).numpy()
        np.testing.assert_allclose(np.diag(approx), np.diag(cov), rtol=1e-10)  # residual diagonal makes it exact
        values, vectors = np.linalg.eigh(cov)
        top = vectors[:, -2:] @ np.diag(values[-2:]) @ vectors[:, -2:].T
        off = ~np.eye(6, dtype=bool)
        np.testing.assert_allclose(approx[off], top[off], atol=1e-10)


def test_lowrank_reconstructs_a_covariance_of_that_rank_exactly():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(40, 2, generator=g) @ torch.randn(2, 6, generator=g)  # rank-2 centred data (+ a mean)
    acc = ClassFeatureAccumulator(6)
    acc.update(x + 5.0, torch.zeros(40, dtype=torch.long))
    low, full = ClassStatistics(6, "lowrank", rank=2), ClassStatistics(6, "full")
    low.add_task(acc, 0)
    full.add_task(acc, 0)
    torch.testing.assert_close(low.covariance(0), full.covariance(0), rtol=1e-8, atol=1e-10)


def test_storage_bytes_match_the_state_dict():
    for storage, rank in [("full", None), ("shared", None), ("lowrank", 2)]:
        stats = stats_for(storage, rank)
        assert stats.nbytes() == storage_bytes(6, 5, storage, rank or 0)
    assert storage_bytes(768, 200, "full", element_size=4) > 470e6 > storage_bytes(768, 200, "lowrank", 16)


def test_samples_have_the_stored_mean_and_covariance():
    stats = stats_for("full")
    draws = stats.sample(0, 200_000, torch.Generator().manual_seed(0), ridge=0.0)
    torch.testing.assert_close(draws.mean(0), stats.means[0], atol=0.05, rtol=0)
    torch.testing.assert_close(torch.cov(draws.T), stats.covariance(0), atol=0.15, rtol=0.02)
    scaled = stats.sample(0, 100_000, torch.Generator().manual_seed(0), mean_scale=0.5, ridge=0.0)
    torch.testing.assert_close(scaled.mean(0), 0.5 * stats.means[0], atol=0.05, rtol=0)


def test_state_dict_round_trips_through_safetensors(tmp_path):
    for storage, rank in [("full", None), ("shared", None), ("lowrank", 3)]:
        stats = stats_for(storage, rank)
        save_file(stats.state_dict(), tmp_path / f"{storage}.safetensors")
        loaded = ClassStatistics.from_state_dict(load_file(tmp_path / f"{storage}.safetensors"))
        assert loaded.storage == storage and len(loaded) == 5
        for i in range(5):
            assert torch.equal(loaded.covariance(i), stats.covariance(i))
            assert torch.equal(loaded.means[i], stats.means[i])


def test_recorder_collects_inside_a_pass_with_labels_from_the_batches():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    head = model[2]
    batches = [{"x": torch.randn(5, 4), "labels": torch.randint(0, 3, (5,))} for _ in range(4)]
    acc = ClassFeatureAccumulator(6)
    with HeadInputRecorder(head, acc) as recorder:
        tracked = recorder.track(batches)
        assert len(tracked) == 4
        for batch in tracked:  # a pass that drops the labels before the forward, as end_task's does
            model(batch["x"])
    reference = ClassFeatureAccumulator(6)
    for batch in batches:
        reference.update(model[:2](batch["x"]), batch["labels"])
    for a, b in zip(acc.moments()[1:], reference.moments()[1:]):
        torch.testing.assert_close(a, b)
    model(torch.randn(2, 4))  # the hook is gone after the block
    assert sum(acc.counts.values()) == 20


def test_collect_class_statistics_from_a_dataloader_of_dicts():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.classifier = nn.Linear(4, 6), nn.Linear(6, 3)

        def forward(self, x):
            return self.classifier(torch.relu(self.body(x)))

    model = Model().train()
    batches = [{"x": torch.randn(8, 4), "labels": torch.arange(8) % 3} for _ in range(3)]
    acc = collect_class_statistics(model, model.classifier, batches)
    assert model.training and sorted(acc.counts) == [0, 1, 2] and sum(acc.counts.values()) == 24


def separable_problem(seed=0):
    """Two tasks of Gaussian classes far apart; a head whose task-0 rows are strongly biased upwards."""
    g = torch.Generator().manual_seed(seed)
    d, centres = 8, torch.eye(8)[:4] * 6.0
    stats = ClassStatistics(d, "full")
    test_x, test_y = [], []
    for task, classes in enumerate([(0, 1), (2, 3)]):
        acc = ClassFeatureAccumulator(d)
        for c in classes:
            x = centres[c] + torch.randn(100, d, generator=g)
            acc.update(x, torch.full((100,), c))
            test_x.append(centres[c] + torch.randn(100, d, generator=g))
            test_y.append(torch.full((100,), c))
        stats.add_task(acc, task)
    head = nn.Linear(d, 6)
    with torch.no_grad():
        head.weight.zero_()
        head.weight[:4] = centres / 6.0
        head.bias.copy_(torch.tensor([8.0, 8.0, 0.0, 0.0, 7.0, 7.0]))  # old classes win most of task 1's inputs
    return head, stats, torch.cat(test_x), torch.cat(test_y)


@pytest.mark.parametrize("decay,temperature", [(True, 0.1), (False, None)])
def test_alignment_fixes_a_biased_head(decay, temperature):
    head, stats, x, y = separable_problem()
    before = float((head(x)[:, :4].argmax(-1) == y).float().mean())
    untouched = head.weight[4:].clone(), head.bias[4:].clone()
    losses = align_classifier(head, stats, mean_decay=decay, logit_temperature=temperature, seed=0)
    after = float((head(x)[:, :4].argmax(-1) == y).float().mean())
    assert before < 0.53 and after > 0.95
    assert len(losses) == 5 and losses[-1] < losses[0]
    assert torch.equal(head.weight[4:], untouched[0]) and torch.equal(head.bias[4:], untouched[1])


def test_alignment_of_the_last_task_only_keeps_the_old_rows():
    head, stats, x, y = separable_problem()
    with torch.no_grad():
        head.bias[:2] = 0.0  # task 0's rows are right; task 1's are biased down
        head.bias[2:4] = -8.0
    old = head.weight[:2].clone(), head.bias[:2].clone()
    assert float((head(x)[:, :4].argmax(-1) == y).float().mean()) < 0.6
    align_classifier(head, stats, trainable_tasks=[1], logit_temperature=None, mean_decay=False, epochs=15)
    assert torch.equal(head.weight[:2], old[0]) and torch.equal(head.bias[:2], old[1])
    assert float((head(x)[:, :4].argmax(-1) == y).float().mean()) > 0.95
    with pytest.raises(ValueError, match="trainable_tasks"):
        align_classifier(head, stats, trainable_tasks=[5])


def test_alignment_is_deterministic_for_a_seed():
    heads = []
    for seed in (0, 0, 1):
        head, stats, _, _ = separable_problem()
        align_classifier(head, stats, seed=seed, epochs=2)
        heads.append(head.weight.detach().clone())
    assert torch.equal(heads[0], heads[1]) and not torch.equal(heads[0], heads[2])


def test_task_normalized_logits_divide_by_the_mean_task_norm():
    logits = torch.tensor([[3.0, 4.0, 0.0, 1.0]])
    out = task_normalized_logits(logits, torch.tensor([0, 0, 1, 1]), 0.5)
    torch.testing.assert_close(out, logits / ((5.0 + 1.0) / 2) / 0.5, atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", ["empty", "dim", "not_linear", "row", "temperature"])
def test_bad_input_raises_before_the_head_changes(case):
    head, stats, _, _ = separable_problem()
    before = {k: v.clone() for k, v in head.state_dict().items()}
    target = head
    if case == "empty":
        stats = ClassStatistics(8)
    elif case == "dim":
        target = nn.Linear(5, 6)
        before = {k: v.clone() for k, v in target.state_dict().items()}
    elif case == "not_linear":
        target = nn.Sequential(head)
    elif case == "row":
        target = nn.Linear(8, 3)
        before = {k: v.clone() for k, v in target.state_dict().items()}
    kwargs = {"logit_temperature": -1.0} if case == "temperature" else {}
    message = {"empty": "No class statistics", "dim": "in_features", "not_linear": "nn.Linear", "row": "row",
               "temperature": "logit_temperature"}[case]
    with pytest.raises(ValueError, match=message):
        align_classifier(target, stats, **kwargs)
    after = (head if case == "not_linear" else target).state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_accumulator_rejects_mismatched_input():
    acc = ClassFeatureAccumulator(6)
    with pytest.raises(ValueError, match="features must be"):
        acc.update(torch.randn(4, 5), torch.zeros(4))
    with pytest.raises(ValueError, match="labels"):
        acc.update(torch.randn(4, 6), torch.zeros(3))
    with pytest.raises(ValueError, match="No features"):
        acc.moments()
    stats = stats_for("full")
    acc.update(*random_features(classes=(0,)))
    with pytest.raises(ValueError, match="already have statistics"):
        stats.add_task(acc, 2)
    assert len(stats) == 5
    with pytest.raises(ValueError, match="lowrank"):
        ClassStatistics(6, "lowrank")
