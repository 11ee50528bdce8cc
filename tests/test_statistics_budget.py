"""The token budget of the statistics passes (``statistics_max_tokens``): where a pass stops, which batches it reads,
what is counted, and that the InfLoRA lifecycle passes the configured budget down."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from torch import nn

from peft_inflora import InfLoRAConfig, StatisticsError
from peft_inflora.statistics import (
    AUTO_BATCH_FRACTION,
    AUTO_TOKENS_PER_FEATURE,
    auto_batch_limit,
    collect_statistics,
    token_budget,
)


D = 8


class Net(nn.Module):
    """``lin(x)``; ``x`` of shape (batch, tokens, D) with an optional attention_mask over (batch, tokens)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(D, 4)

    def forward(self, x, attention_mask=None, labels=None):
        return self.lin(x)


def batches(n: int, tokens: int = 10, seed: int = 0, marker: bool = True) -> list[dict]:
    """``n`` batches of one sequence of ``tokens`` tokens; batch i is the constant vector i + 1 (identifiable)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        x = torch.full((1, tokens, D), float(i + 1)) if marker else torch.randn(1, tokens, D, generator=g)
        out.append({"x": x})
    return out


def read(model: nn.Module, data, **kwargs):
    groups = collect_statistics(model, {"lin": model.lin}, data, progress=False, **kwargs)
    assert len(groups) == 1
    return groups[0].accumulator


# ---------------------------------------------------------------------------------------------- token_budget
def test_token_budget_values():
    assert token_budget(None, 384) is None
    assert token_budget("auto", 384) == AUTO_TOKENS_PER_FEATURE * 384 == 6144
    assert token_budget(1000, 384) == 1000
    for bad in (0, -5, 2.5, "all", True):
        with pytest.raises(StatisticsError, match="max_tokens must be"):
            token_budget(bad, 384)


def test_config_field_and_validation():
    assert InfLoRAConfig().statistics_max_tokens == "auto"
    assert InfLoRAConfig(statistics_max_tokens=None).statistics_max_tokens is None
    assert InfLoRAConfig(statistics_max_tokens=4096).statistics_max_tokens == 4096
    for bad in (0, "full", 1.5, True):
        with pytest.raises(ValueError, match="statistics_max_tokens"):
            InfLoRAConfig(statistics_max_tokens=bad)


# ---------------------------------------------------------------------------------------------- where a pass stops
def test_pass_stops_after_the_batch_that_reaches_the_budget():
    model = Net()
    assert read(model, iter(batches(10)), max_tokens=25).local_count == 30  # 3 batches of 10 tokens
    assert read(model, iter(batches(10)), max_tokens=30).local_count == 30
    assert read(model, iter(batches(10)), max_tokens=None).local_count == 100
    assert read(model, iter(batches(10)), max_tokens=10_000).local_count == 100  # the data runs out first


def test_iterables_are_read_in_their_own_order():
    drawn = []

    def stream():
        for i, b in enumerate(batches(10)):
            drawn.append(i)
            yield b

    acc = read(Net(), stream(), max_tokens=20)
    assert drawn == [0, 1]  # no batch is fetched beyond the budget
    expected = sum(10 * (i + 1) ** 2 for i in (0, 1))
    assert float(acc.sum[0, 0]) == pytest.approx(expected)


def test_lists_are_sampled_in_a_seeded_random_order():
    data = batches(12)
    acc = read(Net(), data, max_tokens=30)
    assert acc.local_count == 30
    picked = float(acc.sum[0, 0])
    head = sum(10 * (i + 1) ** 2 for i in (0, 1, 2))
    assert picked != pytest.approx(head)  # not simply the first batches (they may all be one class)
    assert float(read(Net(), data, max_tokens=30).sum[0, 0]) == picked  # deterministic
    assert float(read(Net(), tuple(data), max_tokens=30).sum[0, 0]) == picked


def test_without_a_budget_every_batch_counts_and_order_does_not_matter():
    data = batches(6, marker=False)
    full = read(Net(), data, max_tokens=None)
    again = read(Net(), list(reversed(data)), max_tokens=None)
    torch.testing.assert_close(full.sum, again.sum)
    assert full.local_count == 60


def test_auto_budget_scales_with_the_input_width():
    data = batches(40, tokens=50, marker=False)
    acc = read(Net(), data, max_tokens="auto")
    assert AUTO_TOKENS_PER_FEATURE * D == 128
    assert acc.local_count == 150  # 3 batches of 50 tokens: the first count >= 128


def test_auto_reads_at_most_an_eighth_of_a_sized_task():
    """A small task has fewer tokens than 16 per feature: "auto" then still stops after ceil(n / 8) batches."""
    assert AUTO_BATCH_FRACTION == 8
    assert [auto_batch_limit("auto", range(n)) for n in (1, 8, 9, 12, 18, 1000)] == [1, 1, 2, 2, 3, 125]
    assert auto_batch_limit(None, range(12)) is None and auto_batch_limit(500, range(12)) is None
    assert auto_batch_limit("auto", iter(range(12))) is None  # unknown length: the token budget alone
    data = batches(12, tokens=2)  # 24 tokens in all, far below the 128 that 16 tokens per feature ask
    assert read(Net(), data, max_tokens="auto").local_count == 4  # 2 batches of 2 tokens
    assert read(Net(), data, max_tokens="auto", max_batches=1).local_count == 2  # the smaller cap wins
    assert read(Net(), data, max_tokens=None).local_count == 24
    assert read(Net(), iter(data), max_tokens="auto").local_count == 24  # no length: read until the data runs out


def test_padding_does_not_count_towards_the_budget():
    x = torch.randn(1, 10, D)
    mask = torch.zeros(1, 10, dtype=torch.long)
    mask[0, :4] = 1  # 4 real tokens per batch
    data = iter([{"x": x, "attention_mask": mask} for _ in range(10)])
    acc = read(Net(), data, max_tokens=10)
    assert acc.local_count == 12  # three batches of 4 real tokens


def test_max_batches_still_applies():
    assert read(Net(), iter(batches(10)), max_tokens=1000, max_batches=2).local_count == 20


# ---------------------------------------------------------------------------------------------- through the model
@pytest.mark.parametrize("budget, expected", [(None, 8), (25, 3), ("auto", 8)])
def test_begin_and_end_task_read_the_configured_budget(budget, expected):
    torch.manual_seed(0)
    model = get_peft_model(Net(), InfLoRAConfig(r=2, target_modules=["lin"], statistics_max_tokens=budget))
    data = batches(8, marker=False)  # auto: 16 * 8 = 128 tokens > the 80 there are

    drawn = []

    class Loader:
        def __iter__(self):
            for i, b in enumerate(data):
                drawn.append(i)
                yield b

    model.begin_task(Loader(), progress=False)
    assert len(drawn) == expected
    drawn.clear()
    model.end_task(Loader(), progress=False)
    assert len(drawn) == expected
