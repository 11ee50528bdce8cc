"""Specification of the bounded-memory statistics (``InfLoRAConfig(statistics_sketch=ell)``,
peft_inflora.subspace.sketch).

* Frequent Directions keeps its guarantee, checked against numpy float64 on random matrices:
  ``0 <= x^T (X^T X - S^T S) x <= Delta <= ||X - X_k||_F^2 / (ell + 1 - k)``;
* data of rank <= ell is sketched exactly, and then the design and the memory equal the exact mode's;
* merged sketches (also across processes) sketch the concatenation within the same bound;
* the squared-energy total of the sketch is an upper bound of the exact one; a threshold the sketch cannot reach warns;
* the config field, the lifecycle of a tiny model in sketch mode, and save -> load.
"""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from launch import free_port, worker_env
from peft import PeftModel, get_peft_model
from tiny_models import text_classification_batches, tiny_bert

import peft_inflora.model as model_module
from peft_inflora import InfLoRAConfig
from peft_inflora.statistics import CovarianceAccumulator, collect_statistics
from peft_inflora.subspace import (
    SKETCH_AUTO_SIZE,
    FrequentDirections,
    LowRankCovariance,
    Memory,
    SketchAccumulator,
    SketchWarning,
    captured_energy_ratio,
    design_eigen,
    sketch_size,
    update_memory,
    uses_sketch,
)


HERE = Path(__file__).parent


# ---------------------------------------------------------------------------------------------- data
def orthonormal(rng: np.random.Generator, d: int) -> np.ndarray:
    return np.linalg.qr(rng.standard_normal((d, d)))[0]


def decaying(rng: np.random.Generator, n: int, d: int, alpha: float, rank: int | None = None) -> np.ndarray:
    """``n`` rows in R^d whose covariance has eigenvalues ``i^-alpha`` (the first ``rank`` only), randomly rotated."""
    scales = np.arange(1, d + 1, dtype=np.float64) ** (-alpha / 2)
    if rank is not None:
        scales[rank:] = 0.0
    return (rng.standard_normal((n, d)) * scales) @ orthonormal(rng, d).T


def sketch_rows(X: np.ndarray, ell: int, batch: int = 37) -> FrequentDirections:
    fd = FrequentDirections(X.shape[1], ell)
    for start in range(0, X.shape[0], batch):
        fd.update(torch.from_numpy(X[start: start + batch]))
    return fd


def sketched_covariance(X: np.ndarray, ell: int, batch: int = 37, memory: Memory | None = None) -> LowRankCovariance:
    acc = SketchAccumulator(X.shape[1], ell, memory=memory)
    for start in range(0, X.shape[0], batch):
        acc.update(torch.from_numpy(X[start: start + batch]))
    return acc.covariance()


def exact_covariance(X: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(X.T @ X / X.shape[0])


def assert_fd_guarantee(X: np.ndarray, S: np.ndarray, delta: float, ell: int) -> None:
    """The Frequent Directions guarantee of the sketch ``S`` of ``X`` with total shrinkage ``delta`` (numpy)."""
    scale = np.linalg.norm(X) ** 2
    tol = 1e-10 * scale
    gap = np.linalg.eigvalsh(X.T @ X - S.T @ S)
    assert gap.min() >= -tol  # S^T S never overestimates X^T X
    assert gap.max() <= delta + tol  # ... and underestimates it by at most delta in any direction
    sv = np.linalg.svd(X, compute_uv=False)
    for k in range(min(ell, len(sv)) + 1):
        tail = float((sv[k:] ** 2).sum())
        assert delta <= tail / (ell + 1 - k) + tol
        if k < ell:
            assert delta <= tail / (ell - k) + tol  # the textbook form of the bound follows
    assert scale - np.linalg.norm(S) ** 2 >= (ell + 1) * delta - tol
    assert np.linalg.norm(S.T @ S) <= np.linalg.norm(X.T @ X) * (1 + 1e-12)  # hence never more squared energy
    assert S.shape[0] <= 2 * ell


# ---------------------------------------------------------------------------------------------- Frequent Directions
@pytest.mark.parametrize("n,d,ell,alpha", [(400, 30, 5, 0.0), (700, 48, 8, 1.0), (257, 40, 12, 2.0),
                                           (100, 64, 10, 0.5), (33, 20, 16, 1.0)])
def test_frequent_directions_guarantee(n, d, ell, alpha):
    rng = np.random.default_rng(n + d)
    X = decaying(rng, n, d, alpha)
    fd = sketch_rows(X, ell)
    assert_fd_guarantee(X, fd.matrix.numpy(), fd.shrinkage, ell)
    assert fd.shrinkage > 0 or n <= ell or np.linalg.matrix_rank(X) <= ell


def test_the_guarantee_also_holds_after_compression():
    X = decaying(np.random.default_rng(1), 500, 32, 0.7)
    fd = sketch_rows(X, 6)
    fd.compress()
    assert fd.rows <= 6
    assert_fd_guarantee(X, fd.matrix.numpy(), fd.shrinkage, 6)


def test_the_sketch_does_not_depend_on_how_rows_are_batched():
    X = decaying(np.random.default_rng(2), 211, 24, 1.0)
    reference = sketch_rows(X, 5, batch=X.shape[0])
    for batch in (1, 7, 64):
        other = sketch_rows(X, 5, batch=batch)
        assert torch.equal(other.matrix, reference.matrix)
        assert other.shrinkage == reference.shrinkage


def test_rows_of_rank_at_most_ell_are_sketched_exactly():
    X = decaying(np.random.default_rng(3), 400, 30, 0.0, rank=6)
    for ell in (6, 9):
        fd = sketch_rows(X, ell)
        S = fd.matrix.numpy()
        assert fd.shrinkage <= 1e-12 * np.linalg.norm(X) ** 2
        np.testing.assert_allclose(S.T @ S, X.T @ X, atol=1e-10 * np.linalg.norm(X) ** 2)


def test_merged_sketches_sketch_the_concatenation():
    rng = np.random.default_rng(4)
    X1, X2 = decaying(rng, 300, 40, 1.0), 2.0 * decaying(rng, 180, 40, 0.3)
    ell = 7
    merged = sketch_rows(X1, ell)
    second = sketch_rows(X2, ell)
    merged.merge(second)
    assert merged.shrinkage >= second.shrinkage > 0
    assert_fd_guarantee(np.vstack([X1, X2]), merged.matrix.numpy(), merged.shrinkage, ell)


def test_frequent_directions_rejects_bad_arguments():
    with pytest.raises(ValueError, match="ell"):
        FrequentDirections(8, 0)
    fd = FrequentDirections(8, 2)
    with pytest.raises(ValueError, match=r"shape \(n, 8\)"):
        fd.update(torch.zeros(3, 7))
    with pytest.raises(ValueError, match="merge"):
        fd.merge(FrequentDirections(9, 2))


# ---------------------------------------------------------------------------------------------- sketched covariance
def test_sketched_covariance_is_within_delta_of_the_exact_one_and_keeps_the_exact_trace():
    X = decaying(np.random.default_rng(5), 600, 36, 1.0)
    cov = sketched_covariance(X, 6)
    C = X.T @ X / X.shape[0]
    assert cov.count == 600 and cov.basis.shape == (36, 6)
    np.testing.assert_allclose(cov.basis.T.numpy() @ cov.basis.numpy(), np.eye(6), atol=1e-12)
    assert cov.trace == pytest.approx(np.trace(C), rel=1e-12)
    assert cov.residual_trace > 0
    gap = np.linalg.eigvalsh(C - cov.dense().numpy())  # compensated: within +-delta
    assert -cov.shrinkage - 1e-12 <= gap.min() and gap.max() <= cov.shrinkage + 1e-12
    # every direction outside the sketch has energy at most delta
    outside = np.eye(36) - cov.basis.numpy() @ cov.basis.numpy().T
    assert np.linalg.eigvalsh(outside @ C @ outside).max() <= cov.shrinkage + 1e-12


@pytest.mark.parametrize("seed", range(4))
def test_energy_totals_without_a_memory(seed):
    rng = np.random.default_rng(seed)
    X = decaying(rng, 400, 30, [0.0, 0.5, 1.0, 2.0][seed])
    cov = sketched_covariance(X, 5)
    C = X.T @ X / X.shape[0]
    memory = Memory.empty(30)
    total, outside, residual = cov.energy_totals(memory, "squared")
    # the sketched energy plus the least squared energy the missing trace can have (spread over 30 - 5 directions)
    assert residual == pytest.approx(cov.residual_trace ** 2 / 25)
    assert total == pytest.approx(float((cov.values ** 2).sum()) + residual) and outside == pytest.approx(total)
    if seed == 3:  # a fast-decaying spectrum: 5 directions hold nearly all of the energy
        assert total == pytest.approx(float((C * C).sum()), rel=0.01)
    total, _, residual = cov.energy_totals(memory, "linear")
    assert total == pytest.approx(np.trace(C), rel=1e-12) and residual == pytest.approx(cov.residual_trace)


@pytest.mark.parametrize("form", ["basis", "complement"])
def test_statistics_split_by_a_memory_keep_its_blocks_exact(form):
    rng = np.random.default_rng(11)
    d = 36
    dims = 6 if form == "basis" else 24
    memory = update_memory(Memory.empty(d), exact_covariance(decaying(rng, 300, d, 0.0, rank=dims)), 1.0)
    assert memory.form == form
    X = decaying(rng, 800, d, 0.5)
    cov = sketched_covariance(X, 5, memory=memory)
    assert cov.shrinkage > 0 and cov.memory_form == form and cov.exact_dim == memory.basis.shape[1]
    C = torch.from_numpy(X.T @ X / X.shape[0])
    E = memory.basis
    P = torch.eye(d, dtype=torch.float64) - E @ E.T
    approx = cov.dense()
    torch.testing.assert_close(approx @ E, C @ E, atol=1e-10, rtol=0)  # every block touching E is exact
    gap = torch.linalg.eigvalsh(P @ (C - approx) @ P)  # the sketched block within +-delta
    assert -cov.shrinkage - 1e-10 <= float(gap.min()) and float(gap.max()) <= cov.shrinkage + 1e-10
    QC = memory.project(C)
    total, outside, _ = cov.energy_totals(memory, "linear")
    assert total == pytest.approx(float(torch.trace(C)))
    assert outside == pytest.approx(float(torch.trace(QC @ memory.projector())))
    total, outside, residual = cov.energy_totals(memory, "squared")
    if form == "complement":  # the free space is the exact side: what lies outside the memory is exact
        assert outside == pytest.approx(float((QC * QC).sum()), rel=1e-10)
        U, s = cov.projected(memory, "squared")
        torch.testing.assert_close(s, torch.linalg.svdvals(QC)[: s.numel()], atol=1e-10, rtol=0)
    # ||C||_F^2 = ||P C P||^2 + 2 ||P C E||^2 + ||E^T C E||^2: the last two exact, the first sketched
    sketched = float((cov.values ** 2).sum()) + residual
    PCE, ECE = P @ C @ E, E.T @ C @ E
    exact_part = 2 * float((PCE * PCE).sum()) + float((ECE * ECE).sum())
    assert total == pytest.approx(sketched + exact_part, rel=1e-10)
    assert residual == pytest.approx(cov.residual_trace ** 2 / (d - E.shape[1] - cov.basis.shape[1]))
    # threshold 1 asks for every direction: only sketched candidates (form "basis") can miss some
    if form == "basis":
        with pytest.warns(SketchWarning, match="leading half"):
            update_memory(memory, cov, 1.0)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("error", SketchWarning)
            assert_same_memory(update_memory(memory, cov, 1.0), update_memory(memory, C, 1.0, solver="exact"))


def test_split_statistics_must_be_used_with_their_memory():
    rng = np.random.default_rng(12)
    memory = update_memory(Memory.empty(30), exact_covariance(decaying(rng, 100, 30, 0.0, rank=4)), 1.0)
    cov = sketched_covariance(decaying(rng, 200, 30, 1.0), 5, memory=memory)
    design_eigen(cov, Memory(memory.basis.float(), memory.form), 2)  # the same memory stored in float32 is fine
    other = update_memory(memory, exact_covariance(decaying(rng, 100, 30, 0.0, rank=3)), 1.0)
    for wrong in (Memory.empty(30), other):
        with pytest.raises(ValueError, match="collected against a memory"):
            design_eigen(cov, wrong, 2)
    with pytest.raises(ValueError, match="width 30, the statistics for 31"):
        SketchAccumulator(31, 4, memory=memory)


def test_sketched_covariance_is_checked_against_the_layer():
    cov = sketched_covariance(decaying(np.random.default_rng(6), 50, 20, 1.0), 4)
    with pytest.raises(ValueError, match="width 20 but memory.d_in is 21"):
        design_eigen(cov, Memory.empty(21), 2)
    bad = LowRankCovariance(cov.basis, cov.values, float("nan"), cov.shrinkage, cov.count)
    with pytest.raises(ValueError, match="NaN or inf"):
        update_memory(Memory.empty(20), bad, 0.9)
    with pytest.raises(ValueError, match="values"):
        LowRankCovariance(cov.basis, cov.values[:2], 1.0, 0.0, 1.0)


# ---------------------------------------------------------------------------------------------- exact at rank <= ell
def assert_same_memory(a: Memory, b: Memory) -> None:
    assert a.dimension == b.dimension and a.form == b.form
    torch.testing.assert_close(a.projector(), b.projector(), atol=1e-9, rtol=0)


@pytest.mark.parametrize("kind", ["gpm", "dualgpm"])
@pytest.mark.parametrize("energy", ["squared", "linear"])
def test_data_of_rank_at_most_ell_gives_the_exact_design_and_memory(kind, energy):
    rng = np.random.default_rng(7)
    d, ell = 40, 8
    tasks = [decaying(rng, 300, d, 1.0, rank=6), decaying(rng, 250, d, 0.5, rank=8), decaying(rng, 90, d, 0.0, rank=3)]
    memory = Memory.empty(d)
    for t, X in enumerate(tasks):
        C, cov = exact_covariance(X), sketched_covariance(X, ell)
        torch.testing.assert_close(design_eigen(cov, memory, 3), design_eigen(C, memory, 3, solver="exact"),
                                   atol=1e-9, rtol=0)
        for threshold in (0.9, 0.99, 1.0):
            assert_same_memory(update_memory(memory, cov, threshold, kind=kind, energy=energy),
                               update_memory(memory, C, threshold, kind=kind, energy=energy, solver="exact"))
        memory = update_memory(memory, C, 0.99, kind=kind, energy=energy, solver="exact")
        assert memory.dimension > 0


@pytest.mark.parametrize("form", ["basis", "complement"])
@pytest.mark.parametrize("energy", ["squared", "linear"])
def test_statistics_split_by_the_memory_give_the_exact_design_and_memory_at_rank_at_most_ell(form, energy):
    rng = np.random.default_rng(13)
    d, ell = 40, 8
    dims = 5 if form == "basis" else 25
    memory = update_memory(Memory.empty(d), exact_covariance(decaying(rng, 200, d, 0.0, rank=dims)), 1.0)
    assert memory.form == form
    X = decaying(rng, 300, d, 1.0, rank=8)
    C, cov = exact_covariance(X), sketched_covariance(X, ell, memory=memory)
    assert cov.exact_dim == memory.basis.shape[1]
    torch.testing.assert_close(design_eigen(cov, memory, 4), design_eigen(C, memory, 4, solver="exact"), atol=1e-9,
                               rtol=0)
    for threshold in (0.9, 0.999, 1.0):
        assert_same_memory(update_memory(memory, cov, threshold, energy=energy),
                           update_memory(memory, C, threshold, energy=energy, solver="exact"))


def test_exactness_also_from_a_memory_stored_as_its_complement():
    rng = np.random.default_rng(8)
    d = 40
    memory = update_memory(Memory.empty(d), exact_covariance(decaying(rng, 200, d, 0.0, rank=25)), 1.0,
                           kind="dualgpm", solver="exact")
    assert memory.form == "complement" and memory.dimension == 25
    X = decaying(rng, 300, d, 1.0, rank=8)
    C, cov = exact_covariance(X), sketched_covariance(X, 8)
    torch.testing.assert_close(design_eigen(cov, memory, 4), design_eigen(C, memory, 4, solver="exact"), atol=1e-9,
                               rtol=0)
    assert_same_memory(update_memory(memory, cov, 0.999), update_memory(memory, C, 0.999, solver="exact"))


# ---------------------------------------------------------------------------------------------- beyond rank ell
def test_a_large_enough_sketch_of_decaying_data_nearly_reproduces_the_exact_design_and_memory():
    rng = np.random.default_rng(9)
    X = decaying(rng, 3000, 64, 1.0)
    C, cov = exact_covariance(X), sketched_covariance(X, 32)
    assert cov.shrinkage > 0  # not the exact regime
    memory = Memory.empty(64)
    B, B_exact = design_eigen(cov, memory, 4), design_eigen(C, memory, 4, solver="exact")
    assert float(torch.linalg.svdvals(B @ B_exact.T * 3).min()) > 0.9999  # rows scaled by 1/sqrt(3)
    sketched, exact = update_memory(memory, cov, 0.95), update_memory(memory, C, 0.95, solver="exact")
    # the sketch's total overestimates the energy: the exact directions and some more, at least the exact energy
    assert exact.dimension <= sketched.dimension <= 2 * exact.dimension
    assert captured_energy_ratio(sketched, C) >= captured_energy_ratio(exact, C)
    assert float(torch.linalg.svdvals(exact.basis.T @ sketched.basis).min()) > 0.999


def test_a_threshold_the_sketch_cannot_reach_warns_and_takes_every_sketch_direction():
    X = decaying(np.random.default_rng(10), 400, 30, 0.0)  # flat spectrum: 4 directions hold little of it
    cov = sketched_covariance(X, 4)
    with pytest.warns(SketchWarning, match="Raise `statistics_sketch`"):
        memory = update_memory(Memory.empty(30), cov, 0.95)
    assert memory.dimension == cov.basis.shape[1] == 4
    with warnings.catch_warnings():
        warnings.simplefilter("error", SketchWarning)
        update_memory(Memory.empty(30), cov, 0.2)  # reachable: no warning


# ---------------------------------------------------------------------------------------------- statistics pass
def test_accumulator_choice_follows_the_width():
    assert uses_sketch(8, 17) and not uses_sketch(8, 16) and not uses_sketch(None, 4096)
    model = tiny_bert()
    layers = {"q0": model.bert.encoder.layer[0].attention.self.query}
    batches = text_classification_batches(seed=0)
    for ell, kind in ((8, SketchAccumulator), (16, CovarianceAccumulator), (None, CovarianceAccumulator)):
        (group,) = collect_statistics(model, layers, batches, sketch=ell, progress=False)
        assert type(group.accumulator) is kind
        tokens = sum(int(b["attention_mask"].sum()) for b in batches)
        assert int(group.accumulator.count.item()) == group.accumulator.local_count == tokens
    (group,) = collect_statistics(model, layers, batches, sketch=8, progress=False)
    assert group.accumulator.nbytes == 2 * 8 * 32 * 8 < CovarianceAccumulator(32).nbytes


# ---------------------------------------------------------------------------------------------- config
def test_config_field():
    assert InfLoRAConfig().statistics_sketch is None
    assert InfLoRAConfig(statistics_sketch="auto").statistics_sketch == "auto"
    assert sketch_size("auto") == SKETCH_AUTO_SIZE == 256 and sketch_size(None) is None and sketch_size(64) == 64
    assert InfLoRAConfig(r=8, statistics_sketch=8).statistics_sketch == 8
    for bad in (0, -3, 2.5, "big", True, [64]):
        with pytest.raises(ValueError, match="statistics_sketch must be an int >= 1"):
            InfLoRAConfig(statistics_sketch=bad)
    with pytest.raises(ValueError, match="statistics_sketch=8 keeps 8 directions .* fewer than the rank 10"):
        InfLoRAConfig(statistics_sketch=8)
    with pytest.raises(ValueError, match="fewer than the rank 40"):
        InfLoRAConfig(r=4, rank_pattern={"query": 40}, statistics_sketch=32)
    config = InfLoRAConfig(r=4, statistics_sketch=12)
    assert InfLoRAConfig(**{k: v for k, v in config.to_dict().items()}).statistics_sketch == 12


# ---------------------------------------------------------------------------------------------- lifecycle
def sketch_model(ell: int = 15, seed: int = 0, **kwargs):
    config = InfLoRAConfig(r=4, target_modules=["query", "value"], statistics_sketch=ell, statistics_max_tokens=None,
                           **kwargs)
    return get_peft_model(tiny_bert(seed=seed), config)


def designs(model) -> dict[str, torch.Tensor]:
    return {n: layer.inflora_B["default"].detach().clone() for n, layer in model.base_model.inflora_layers().items()}


def memories(model) -> dict[str, Memory]:
    return {n: layer.get_memory("default") for n, layer in model.base_model.inflora_layers().items()}


@pytest.mark.filterwarnings("ignore::peft_inflora.errors.SketchWarning")  # 6 rows are too few for tiny BERT
def test_lifecycle_in_sketch_mode_uses_sketches_and_keeps_the_invariants(monkeypatch):
    seen, forms = [], []
    original = model_module.collect_statistics

    def spy(*args, **kwargs):
        groups = original(*args, **kwargs)
        seen.append([type(g.accumulator) for g in groups])
        forms.append({getattr(g.accumulator, "memory_form", None) for g in groups})
        return groups

    monkeypatch.setattr(model_module, "collect_statistics", spy)
    model = sketch_model(ell=6)
    for task in range(2):
        batches = text_classification_batches(seed=task, n_batches=4)
        before = memories(model)
        ranks = model.begin_task(batches, progress=False)
        assert set(ranks.values()) == {4}
        for name, B in designs(model).items():  # the design avoids the memory
            assert B.shape == (4, 32)
            torch.testing.assert_close(before[name].project(B.double().T), B.double().T, atol=1e-5, rtol=0)
        model.end_task(batches, progress=False)
        assert all(0 < m.dimension <= 6 * (task + 1) for m in memories(model).values())
    assert len(seen) == 4 and all(kind is SketchAccumulator for kinds in seen for kind in kinds)
    assert forms == [{None}, {None}, {"basis"}, {"basis"}]  # task 2's statistics are split by task 1's memory
    # the interference report measures X^T X itself: it keeps the exact statistics
    model.begin_task(text_classification_batches(seed=5), progress=False)
    seen.clear()
    report = model.interference_report(text_classification_batches(seed=0), progress=False)
    assert report and all(kind is CovarianceAccumulator for kind in seen[0])


def test_lifecycle_equals_exact_mode_when_each_pass_sees_at_most_ell_tokens():
    exact = get_peft_model(tiny_bert(), InfLoRAConfig(r=4, target_modules=["query", "value"],
                                                      statistics_max_tokens=None))
    sketched = sketch_model(ell=15)
    for task in range(2):
        batches = text_classification_batches(seed=task, n_batches=1, batch_size=2, seq_len=7)  # <= 14 tokens
        for model in (exact, sketched):
            model.begin_task(batches, progress=False)
        for name, B in designs(exact).items():
            torch.testing.assert_close(designs(sketched)[name], B, atol=1e-5, rtol=0)
        for model in (exact, sketched):
            model.end_task(batches, progress=False)
        for name, memory in memories(exact).items():
            assert memories(sketched)[name].dimension == memory.dimension
            torch.testing.assert_close(memories(sketched)[name].projector(), memory.projector(), atol=1e-5, rtol=0)


@pytest.mark.filterwarnings("ignore::peft_inflora.errors.SketchWarning")
def test_save_and_load_keep_the_field_and_the_state(tmp_path):
    model = sketch_model(ell=6)
    batches = text_classification_batches(seed=0, n_batches=4)
    model.begin_task(batches, progress=False)
    model.end_task(batches, progress=False)
    model.save_pretrained(tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(tiny_bert(), tmp_path / "adapter", is_trainable=True)
    assert loaded.peft_config["default"].statistics_sketch == 6
    for name, memory in memories(model).items():
        torch.testing.assert_close(memories(loaded)[name].projector(), memory.projector(), atol=1e-6, rtol=0)
    nxt = text_classification_batches(seed=1, n_batches=4)
    model.begin_task(nxt, progress=False)
    loaded.begin_task(nxt, progress=False)
    for name, B in designs(model).items():
        torch.testing.assert_close(designs(loaded)[name], B, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------- distributed
@pytest.mark.multiprocess
def test_two_processes_merge_to_the_identical_sketch_of_all_tokens(tmp_path):
    import sketch_distributed_worker as worker

    env = worker_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE="2")
    procs = [subprocess.Popen([sys.executable, str(HERE / "sketch_distributed_worker.py"), str(tmp_path)],
                              env=dict(env, RANK=str(rank)), stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{rank}.pt") for rank in (0, 1))
    for key in ("matrix", "values", "basis"):
        assert torch.equal(r0[key], r1[key]), key
    assert r0["shrinkage"] == r1["shrinkage"] > 0
    X = worker.tokens()
    assert r0["count"] == r1["count"] == worker.N and r0["local_count"] + r1["local_count"] == worker.N
    assert r0["square_sum"] == pytest.approx(float((X * X).sum()), rel=1e-12)
    assert_fd_guarantee(X.numpy(), r0["matrix"].numpy(), r0["shrinkage"], worker.ELL)
    # split by a memory: the exact product is the all-reduced C E, the sketch one of the projected rows of all tokens
    for key in ("split_product", "split_matrix"):
        assert torch.equal(r0[key], r1[key]), key
    E = worker.memory().basis
    torch.testing.assert_close(r0["split_product"], X.T @ X @ E / worker.N, atol=1e-12, rtol=0)
    projected = X - X @ E @ E.T
    assert_fd_guarantee(projected.numpy(), r0["split_matrix"].numpy(), r0["split_shrinkage"], worker.ELL)
