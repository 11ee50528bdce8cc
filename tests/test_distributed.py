"""Several processes (DDP over gloo on CPU): every rank designs the same B_t and memory, equal to one process's."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

HERE = Path(__file__).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), str(HERE.parent / "src"),
                                                       os.environ.get("PYTHONPATH", "")]),
                OMP_NUM_THREADS="1")


@pytest.mark.multiprocess
def test_two_processes_design_identically_and_like_one_process(tmp_path):
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), str(HERE / "distributed_worker.py"), str(tmp_path / "two")],
                         env=_env(), capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run([sys.executable, str(HERE / "distributed_worker.py"), str(tmp_path / "one")],
                         env=_env(), capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]

    for task in (0, 1):
        r0 = load_file(tmp_path / "two" / f"design-task{task}-rank0.safetensors")
        r1 = load_file(tmp_path / "two" / f"design-task{task}-rank1.safetensors")
        for name in r0:  # all-reduced statistics: the ranks agree bit for bit
            assert torch.equal(r0[name], r1[name]), name
    # task 1 is designed before any training: two shards summed == one process over all data (float32 sums of
    # the same tokens in another order: equal to ~1e-6; rows compared as a subspace, sign-free)
    single = load_file(tmp_path / "one" / "design-task0-rank0.safetensors")
    r0 = load_file(tmp_path / "two" / "design-task0-rank0.safetensors")
    for name in single:
        a, b = single[name].double(), r0[name].double()
        torch.testing.assert_close(a.T @ a, b.T @ b, atol=1e-5, rtol=0)
    f0 = load_file(tmp_path / "two" / "final-rank0.safetensors")
    f1 = load_file(tmp_path / "two" / "final-rank1.safetensors")
    for key in f0:  # DDP keeps the replicas identical: trained A_t, folded past and memory
        assert torch.equal(f0[key], f1[key]), key
