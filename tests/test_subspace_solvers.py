"""The randomized solver of the design and the memory update, against float64 numpy references.

The references below use explicit projector matrices and ``np.linalg.eigh`` (no code shared with the module). The
covariances have decaying spectra with distinct eigenvalues, so the exact subspaces are well defined.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from peft_inflora import InfLoRAConfig
from peft_inflora.subspace import (
    AUTO_EXACT_MAX_DIM,
    Memory,
    captured_energy_ratio,
    design_eigen,
    principal_angle_cosines,
    randomized,
    resolve_solver,
    solvers,
    update_memory,
)


D = 160
D_MEM = 400  # the randomized memory update gives up beyond D / 16 directions: room for ~25


def covariance(seed: int, d: int = D, decay: float = 0.93, rank: int | None = None) -> np.ndarray:
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    lam = decay ** np.arange(d)
    if rank is not None:
        lam[rank:] = 0.0
    return (Q * lam) @ Q.T


def power_law_covariance(seed: int, d: int = D, alpha: float = 1.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    return (Q * np.arange(1, d + 1, dtype=float) ** -alpha) @ Q.T


def ref_top(A: np.ndarray, k: int) -> np.ndarray:
    w, V = np.linalg.eigh(A)
    return V[:, np.argsort(w)[::-1][:k]]


def ref_design(C: np.ndarray, M: np.ndarray, r: int) -> np.ndarray:
    """Top-r eigenvectors of Q C^2 Q, Q = I - M M^T (columns)."""
    Q = np.eye(C.shape[0]) - M @ M.T
    return ref_top(Q @ C @ C @ Q, r)


def ref_memory(C: np.ndarray, M: np.ndarray, threshold: float, energy: str = "squared") -> np.ndarray:
    """GPM update (authors' rules), explicit basis of the new memory."""
    S_ = C @ C if energy == "squared" else C
    Q = np.eye(C.shape[0]) - M @ M.T
    QSQ = Q @ S_ @ Q
    total = np.trace(S_)
    captured = total - np.trace(QSQ)
    w, V = np.linalg.eigh(QSQ)
    order = np.argsort(w)[::-1]
    w, V = w[order], V[:, order]
    if M.shape[1] == 0:
        j = max(int(np.sum(np.cumsum(w) / total < threshold)), 1)
    else:
        if captured / total >= threshold:
            return M
        ratios = (captured + np.cumsum(w)) / total
        j = int(np.argmax(ratios >= threshold)) + 1
    return np.concatenate([M, V[:, :j]], axis=1)


def explicit_basis(memory: Memory) -> np.ndarray:
    B = memory.basis.numpy()
    if memory.form == "basis":
        return B
    w, V = np.linalg.eigh(np.eye(B.shape[0]) - B @ B.T)
    return V[:, w > 0.5]


def t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a))


def no_dense_decomposition(monkeypatch):
    """Make every dense path of the solvers fail, so a test proves the randomized path ran."""
    def boom(*args, **kwargs):
        raise AssertionError("a dense decomposition ran")

    for name in ("_projected_left_singular", "_gram_left_singular", "_projected_eigh", "_sigma_max"):
        monkeypatch.setattr(solvers, name, boom)


# ---------------------------------------------------------------------------------------------- solver choice
def test_auto_is_exact_up_to_the_limit_and_randomized_above():
    assert resolve_solver("auto", AUTO_EXACT_MAX_DIM) == "exact"
    assert resolve_solver("auto", AUTO_EXACT_MAX_DIM + 1) == "randomized"
    assert resolve_solver("exact", 10_000) == "exact"
    assert resolve_solver("randomized", 8) == "randomized"
    with pytest.raises(ValueError, match="unknown solver 'eigh'"):
        resolve_solver("eigh", 10)
    C = t(covariance(0))
    with pytest.raises(ValueError, match="unknown solver"):
        design_eigen(C, Memory.empty(D), 4, solver="svd")
    with pytest.raises(ValueError, match="unknown solver"):
        update_memory(Memory.empty(D), C, 0.9, solver="svd")


def test_config_field():
    assert InfLoRAConfig().solver == "auto"
    assert InfLoRAConfig(solver="randomized").solver == "randomized"
    with pytest.raises(ValueError, match="solver must be one of"):
        InfLoRAConfig(solver="eigh")


# ---------------------------------------------------------------------------------------------- design
@pytest.mark.parametrize("memory_form", ["empty", "basis", "complement"])
def test_randomized_design_matches_numpy(monkeypatch, memory_form):
    C = covariance(1)
    rng = np.random.default_rng(3)
    k = {"empty": 0, "basis": 30, "complement": 100}[memory_form]  # complement: 100 > D / 2, P has 60 columns
    full, _ = np.linalg.qr(rng.standard_normal((D, D)))
    M = full[:, :k]
    memory = Memory(t(full[:, k:]), "complement") if memory_form == "complement" else Memory(t(M), "basis")
    no_dense_decomposition(monkeypatch)
    B = design_eigen(t(C), memory, 8, solver="randomized").numpy()
    assert B.shape == (8, D)
    U = B.T * math.sqrt(3.0)
    np.testing.assert_allclose(U.T @ U, np.eye(8), atol=1e-10)  # orthonormal rows (before the 1/sqrt(3) scale)
    assert k == 0 or np.abs(B @ M).max() < 1e-10  # orthogonal to the memory
    cos = principal_angle_cosines(t(U), t(ref_design(C, M, 8)))
    assert float(cos.min()) > 1 - 1e-9


def test_randomized_design_is_deterministic_and_sign_fixed():
    C = t(covariance(4))
    a = design_eigen(C, Memory.empty(D), 6, solver="randomized")
    b = design_eigen(C, Memory.empty(D), 6, solver="randomized")
    assert torch.equal(a, b)
    exact = design_eigen(C, Memory.empty(D), 6, solver="exact")
    torch.testing.assert_close(a, exact, atol=1e-6, rtol=0)  # same vectors, same signs


def test_randomized_design_of_a_low_rank_covariance_keeps_only_usable_directions():
    C = t(covariance(5, rank=5))
    B = design_eigen(C, Memory.empty(D), 8, solver="randomized")
    assert B.shape[0] == 5 == design_eigen(C, Memory.empty(D), 8, solver="exact").shape[0]


def test_randomized_design_falls_back_when_the_free_space_is_small():
    C = t(covariance(6))
    rng = np.random.default_rng(0)
    M, _ = np.linalg.qr(rng.standard_normal((D, D - 20)))  # 20 free dimensions < 2 * (8 + 16)
    memory = Memory(t(M), "basis")
    B = design_eigen(C, memory, 8, solver="randomized")
    assert float(principal_angle_cosines(B.T, t(ref_design(C.numpy(), M, 8))).min()) > 1 - 1e-9


def test_design_on_a_cuda_generator_is_refused():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    with pytest.raises(ValueError, match="CPU torch.Generator"):
        design_eigen(t(covariance(0)), Memory.empty(D), 4, solver="randomized",
                     generator=torch.Generator(device="cuda"))


# ---------------------------------------------------------------------------------------------- memory update
@pytest.mark.parametrize("kind", ["gpm", "dualgpm"])
@pytest.mark.parametrize("energy", ["squared", "linear"])
def test_randomized_memory_sequence_matches_numpy(monkeypatch, kind, energy):
    """Three tasks in a row, every one through the randomized path (dense decompositions are disabled): same
    dimension as the reference every time, same subspace."""
    memory, M = Memory.empty(D_MEM), np.zeros((D_MEM, 0))
    decay = 0.93 if energy == "squared" else 0.86  # about 20 directions for the first task: two blocks
    references = []
    for task in range(3):
        C = covariance(10 + task, d=D_MEM, decay=decay)
        M = ref_memory(C, M, 0.95, energy)
        references.append((C, M))
    assert randomized.RANDOMIZED_FIRST_BLOCK < references[0][1].shape[1] <= D_MEM * randomized.RANDOMIZED_MAX_FRACTION
    no_dense_decomposition(monkeypatch)
    for C, M in references:
        memory = update_memory(memory, t(C), 0.95, kind=kind, energy=energy, solver="randomized")
        assert memory.dimension == M.shape[1]
        got = explicit_basis(memory)
        assert float(principal_angle_cosines(t(got), t(M)).min()) > 0.9999
        np.testing.assert_allclose(got @ got.T, M @ M.T, atol=1e-3)


def test_randomized_memory_update_of_a_complement_memory(monkeypatch):
    rng = np.random.default_rng(7)
    full, _ = np.linalg.qr(rng.standard_normal((D_MEM, D_MEM)))
    M0 = full[:, :250]  # more than half of the space: DualGPM stores the 150 complement columns
    C = covariance(70, d=D_MEM, decay=0.7)
    M = ref_memory(C, M0, 0.75)
    assert 250 < M.shape[1] < 250 + 9  # a few directions: within the randomized solver's reach (150 / 16)
    no_dense_decomposition(monkeypatch)
    memory = update_memory(Memory(t(full[:, 250:]), "complement"), t(C), 0.75, solver="randomized")
    assert memory.form == "complement" and memory.dimension == M.shape[1]
    got = explicit_basis(memory)
    assert float(principal_angle_cosines(t(got), t(M)).min()) > 0.9999
    np.testing.assert_allclose(got @ got.T, M @ M.T, atol=1e-3)


def test_randomized_memory_captures_the_threshold_of_every_later_task():
    """Directions are chosen by their exact energies: whatever the accuracy the memory captures >= eps."""
    memory = update_memory(Memory.empty(D_MEM), t(covariance(30, d=D_MEM, decay=0.8)), 0.9, solver="randomized")
    for task, eps in ((31, 0.95), (32, 0.97)):
        C = t(covariance(task, d=D_MEM, decay=0.85))
        memory = update_memory(memory, C, eps, solver="randomized")
        assert captured_energy_ratio(memory, C) >= eps - 1e-12


def test_flat_spectrum_falls_back_to_a_dense_eigh_with_the_same_result():
    C = power_law_covariance(40, alpha=0.25)  # 95% of the squared energy needs most directions
    M = ref_memory(C, np.zeros((D, 0)), 0.95)
    assert M.shape[1] > D * randomized.RANDOMIZED_MAX_FRACTION
    memory = update_memory(Memory.empty(D), t(C), 0.95, solver="randomized")
    assert memory.dimension == M.shape[1]
    got = explicit_basis(memory)
    np.testing.assert_allclose(got @ got.T, M @ M.T, atol=1e-6)


def test_threshold_one_keeps_every_non_negligible_direction():
    C = covariance(50, rank=12)
    memory = update_memory(Memory.empty(D), t(C), 1.0, solver="randomized")
    assert memory.dimension == 12 == update_memory(Memory.empty(D), t(C), 1.0, solver="exact").dimension


def test_more_directions_estimate():
    flat = torch.ones(16, dtype=torch.float64)
    assert randomized._more_directions(flat, 4.5, 100) == 5  # flat bound
    decaying = torch.arange(1, 17, dtype=torch.float64) ** -2.0
    missing = float((torch.arange(17, 41, dtype=torch.float64) ** -2.0).sum())
    estimate = randomized._more_directions(decaying, missing, 1000)
    assert 20 <= estimate <= 30  # power law fitted to the tail: about 24 more
    assert randomized._more_directions(decaying, math.inf, 50) == 51


def test_exact_sigma_max_uses_the_symmetric_eigenvalues():
    C = t(covariance(60))
    assert solvers._sigma_max(C) == pytest.approx(float(torch.linalg.matrix_norm(C, ord=2)), rel=1e-12)


# ---------------------------------------------------------------------------------------------- through the model
def test_model_uses_the_configured_solver(monkeypatch):
    from peft import get_peft_model
    from torch import nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(96, 8)

        def forward(self, x, labels=None):
            return self.lin(x)

    calls = []
    for name in ("design_eigen", "update_memory"):
        original = getattr(__import__("peft_inflora.lifecycle", fromlist=[name]), name)

        def spy(*args, __original=original, __name=name, **kwargs):
            calls.append((__name, kwargs.get("solver")))
            return __original(*args, **kwargs)

        monkeypatch.setattr(f"peft_inflora.lifecycle.{name}", spy)
    torch.manual_seed(0)
    model = get_peft_model(Net(), InfLoRAConfig(r=4, target_modules=["lin"], solver="randomized"))
    g = torch.Generator().manual_seed(0)
    batches = [{"x": torch.randn(64, 96, generator=g) * torch.linspace(2, 0.1, 96)} for _ in range(3)]
    model.begin_task(batches, progress=False)
    model.end_task(batches, progress=False)
    assert calls == [("design_eigen", "randomized"), ("update_memory", "randomized")]
