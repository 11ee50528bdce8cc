"""Entry point of the distributed token-budget test: ``torchrun --nproc_per_node 2 budget_distributed_worker.py OUT``.

The two processes hold shards of very different sizes per batch: process 0's batches carry 10 real tokens, process
1's 2 (the rest is padding). With a per-process token budget of 20, process 0 reaches it after 2 batches and process
1 after 10, so a pass that stopped each process on its own count would run 2 forwards on one process and 10 on the
other. Under FSDP2 (every forward all-gathers the sharded weights) that deadlocks; the pass must stop every process
after the same batch. The model here is ``fully_shard``-ed, so a mismatch hangs (the test's timeout fails it).

Written to OUT: ``rank{r}.json`` with the tokens this process read (``local_count``), the batches its loader handed
out (one more than it read when it was told to stop: the next batch is fetched before the processes agree) and the
all-reduced token count.
"""

from __future__ import annotations

import json
import os
import sys

import torch
from torch import nn

from peft_inflora.statistics import collect_statistics


D, TOKENS, BATCHES, BUDGET = 8, 10, 12, 20


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(D, D)
        self.out = nn.Linear(D, 2)

    def forward(self, x, attention_mask=None):
        return self.out(self.lin(x))


def shard(rank: int) -> list[dict]:
    g = torch.Generator().manual_seed(rank)
    real = 10 if rank == 0 else 2
    mask = torch.zeros(1, TOKENS, dtype=torch.long)
    mask[0, :real] = 1
    return [{"x": torch.randn(1, TOKENS, D, generator=g), "attention_mask": mask.clone()} for _ in range(BATCHES)]


def main(out: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank()
    torch.manual_seed(0)
    model = Net()
    mesh = init_device_mesh("cpu", (torch.distributed.get_world_size(),))
    fully_shard(model.lin, mesh=mesh)  # a non-root unit reshards after each forward: every forward all-gathers it
    fully_shard(model, mesh=mesh)
    read = []

    class Loader:  # no length: only the token budget stops the pass
        def __iter__(self):
            for i, batch in enumerate(shard(rank)):
                read.append(i)
                yield batch

    (group,) = collect_statistics(model, {"lin": model.lin}, Loader(), max_tokens=BUDGET, progress=False)
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"local_count": group.accumulator.local_count, "handed_out": len(read),
                   "count": float(group.accumulator.count)}, f)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
