"""Entry point of the multi-process sketch test: ``python sketch_distributed_worker.py OUT`` with RANK, WORLD_SIZE,
MASTER_ADDR and MASTER_PORT set (one process per rank, gloo on CPU).

Every rank draws the same tokens X [N, d], sketches its shard (rows rank, rank + W, ...) in batches of 13 rows with a
:class:`~peft_inflora.subspace.SketchAccumulator` (once without a memory, once split by the memory ``memory()``),
merges with ``all_reduce()`` and writes what it then holds to OUT/rank{RANK}.pt.
"""

import os
import sys

import torch

from peft_inflora.subspace import Memory, SketchAccumulator


N, D, ELL = 300, 24, 5


def tokens() -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    scales = torch.arange(1, D + 1, dtype=torch.float64) ** -0.5
    return torch.randn(N, D, dtype=torch.float64, generator=g) * scales


def memory() -> Memory:
    g = torch.Generator().manual_seed(8)
    return Memory(torch.linalg.qr(torch.randn(D, 3, dtype=torch.float64, generator=g))[0], "basis")


def main(out: str) -> None:
    torch.distributed.init_process_group("gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    acc = SketchAccumulator(D, ELL)
    for batch in tokens()[rank::world].split(13):
        acc.update(batch)
    acc.all_reduce()
    cov = acc.covariance()
    split = SketchAccumulator(D, ELL, memory=memory())
    for batch in tokens()[rank::world].split(13):
        split.update(batch)
    split.all_reduce()
    split_cov = split.covariance()
    torch.save({"matrix": acc.sketch.matrix.clone(), "shrinkage": acc.sketch.shrinkage, "count": acc.count.item(),
                "square_sum": acc.square_sum.item(), "values": cov.values, "basis": cov.basis,
                "local_count": acc.local_count, "split_product": split_cov.exact_product,
                "split_matrix": split.sketch.matrix.clone(), "split_shrinkage": split.sketch.shrinkage},
               os.path.join(out, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
