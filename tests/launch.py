"""Launching the multi-process test workers (``tests/*_worker.py``): ``torch.distributed.run`` on a free local port,
one thread per process, ``tests/`` and ``src/`` importable; the launch must exit 0."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path


HERE = Path(__file__).parent


def free_port() -> int:
    """A local TCP port nothing listens on now (for ``--master_port``)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_env(**env: str) -> dict:
    """This process's environment, one thread per process, ``tests/`` and ``src/`` on the path, and ``env``."""
    return dict(os.environ, OMP_NUM_THREADS="1", **env, PYTHONPATH=os.pathsep.join(
        [str(HERE), str(HERE.parent / "src"), os.environ.get("PYTHONPATH", "")]))


def torchrun(processes: int = 2, launcher: bool = False) -> list[str]:
    """The command that starts ``processes`` processes on this machine (one: plain ``python``, unless ``launcher``:
    then ``torch.distributed.run`` starts it, a world of one, as ``torchrun`` on a one-GPU machine does)."""
    if processes == 1 and not launcher:
        return [sys.executable]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
            "--master_addr", "127.0.0.1", "--master_port", str(free_port())]


def run_worker(worker: str, *args: object, processes: int = 2, launcher: bool = False, timeout: float = 300,
               **env: str) -> None:
    """Run ``tests/<worker>`` with ``args`` in ``processes`` processes (``launcher``: see ``torchrun``); fail the test
    (with the end of stderr) unless it exits 0 within ``timeout`` seconds."""
    run = subprocess.run(torchrun(processes, launcher) + [str(HERE / worker)] + [str(a) for a in args],
                         capture_output=True, text=True, timeout=timeout, env=worker_env(**env))
    assert run.returncode == 0, run.stderr[-4000:]
