"""Specification tests for peft_inflora.subspace (InfLoRA design and GPM/DualGPM memory).

Every numerical claim is checked against an independent numpy float64 reference written below with
explicit projector matrices, np.linalg.eigh and explicit loops (no code shared with the module).
"""

import math

import numpy as np
import pytest
import torch

from peft_inflora.subspace import (
    MEMORY_FORMS,
    Memory,
    captured_energy_ratio,
    design_eigen,
    design_random,
    energy_threshold,
    principal_angle_cosines,
    update_memory,
)


SCALE = 1.0 / math.sqrt(3.0)


# ---------------------------------------------------------------------------------------------
# numpy reference implementation
# ---------------------------------------------------------------------------------------------
def random_orthonormal(rng, d, k):
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    return q[:, :k]


def random_covariance(rng, d, decay=0.7, n=None, rank=None):
    """C = X^T X / n with X rows of a rotated, geometrically decaying spectrum (thresholds matter)."""
    n = n if n is not None else 4 * d
    scales = decay ** np.arange(d)
    if rank is not None:
        scales[rank:] = 0.0
    X = rng.standard_normal((n, d)) * scales @ random_orthonormal(rng, d, d).T
    return X.T @ X / n


def ref_projector(M):
    """Q = I - M M^T for an explicit basis M (d, k)."""
    d = M.shape[0]
    return np.eye(d) - M @ M.T


def ref_top_eigvecs(A, r):
    """Top-r eigenvectors (columns) of a symmetric matrix A, descending eigenvalues."""
    w, V = np.linalg.eigh(A)
    order = np.argsort(w)[::-1]
    return V[:, order[:r]], w[order]


def ref_design_eigen_projector(C, M, r, rtol=1e-6):
    """Projector onto the row space of the eigen design: top eigenvectors of Q C^2 Q (usable only)."""
    Q = ref_projector(M)
    A = Q @ C @ C @ Q
    V, w = ref_top_eigvecs(A, C.shape[0])
    sigma_max = np.abs(np.linalg.eigvalsh(C)).max()
    usable = sum(1 for x in w if x > (rtol * sigma_max) ** 2)
    k = min(r, usable)
    return V[:, :k] @ V[:, :k].T, k


def ref_update_memory(M, C, threshold, energy="squared", rtol=1e-6):
    """GPM memory update written as plainly as possible; returns the new explicit basis (d, k')."""
    d = C.shape[0]
    S = C @ C if energy == "squared" else C
    total = np.trace(S)
    Q = ref_projector(M)
    QSQ = Q @ S @ Q
    captured = total - np.trace(QSQ)
    V, e = ref_top_eigvecs(QSQ, d)
    lam_max = np.linalg.eigvalsh(S).max()
    n_nonneg = sum(1 for x in e if x > rtol**2 * lam_max)
    n_nonneg = min(n_nonneg, d - M.shape[1])
    if threshold >= 1.0:
        j = n_nonneg
    elif M.shape[1] == 0:
        j = 0
        running = 0.0
        for x in e:
            running += x
            if running / total < threshold:
                j += 1
        j = max(j, 1)
    else:
        if captured / total >= threshold:
            return M
        j = 0
        added = 0.0
        while j < n_nonneg and (captured + added) / total < threshold:
            added += e[j]
            j += 1
    j = min(j, n_nonneg)
    return np.concatenate([M, V[:, :j]], axis=1)


def assert_close(actual, desired, atol=1e-12):
    """Absolute tolerance only (numpy's default rtol=1e-7 would hide errors on entries of size ~1)."""
    np.testing.assert_allclose(actual, desired, rtol=0, atol=atol)


def t64(a):
    return torch.from_numpy(np.ascontiguousarray(a)).to(torch.float64)


def mem_from(M):
    return Memory(t64(M), "basis")


def assert_orthonormal_columns(B, atol=1e-12):
    B = B.numpy()
    assert_close(B.T @ B, np.eye(B.shape[1]), atol=atol)


# ---------------------------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------------------------
class TestMemory:
    def test_empty_memory_is_zero_columns_and_identity_projector(self):
        m = Memory.empty(7)
        assert m.basis.shape == (7, 0) and m.form == "basis" and m.basis.dtype == torch.float64
        assert (m.d_in, m.dimension, m.free_dimension) == (7, 0, 7)
        assert_close(m.projector().numpy(), np.eye(7))
        assert Memory.empty(5, dtype=torch.float32).basis.dtype == torch.float32

    def test_forms(self):
        assert MEMORY_FORMS == ("basis", "complement")

    def test_basis_and_complement_give_the_same_projector(self):
        rng = np.random.default_rng(0)
        W = random_orthonormal(rng, 10, 10)
        M, P = W[:, :3], W[:, 3:]
        mb, mc = Memory(t64(M), "basis"), Memory(t64(P), "complement")
        assert (mb.dimension, mb.free_dimension) == (3, 7)
        assert (mc.dimension, mc.free_dimension) == (3, 7)
        assert_close(mb.projector().numpy(), ref_projector(M), atol=1e-12)
        assert_close(mc.projector().numpy(), P @ P.T, atol=1e-12)
        assert_close(mb.projector().numpy(), mc.projector().numpy(), atol=1e-12)

    def test_project_is_Q_times_X_in_float64_for_matrices_and_vectors(self):
        rng = np.random.default_rng(1)
        W = random_orthonormal(rng, 9, 9)
        X = rng.standard_normal((9, 4))
        for mem, Q in [(Memory(t64(W[:, :4])), ref_projector(W[:, :4])),
                       (Memory(t64(W[:, 4:]), "complement"), W[:, 4:] @ W[:, 4:].T)]:
            out = mem.project(torch.from_numpy(X).float())
            assert out.dtype == torch.float64 and out.shape == (9, 4)
            assert_close(out.numpy(), Q @ X.astype(np.float32), atol=1e-12)
            v = mem.project(t64(X[:, 0]))
            assert v.shape == (9,)
            assert_close(v.numpy(), Q @ X[:, 0], atol=1e-12)

    def test_full_complement_and_empty_complement(self):
        full = Memory(torch.zeros(6, 0, dtype=torch.float64), "complement")  # P empty: memory = R^6
        assert (full.dimension, full.free_dimension) == (6, 0)
        assert_close(full.project(torch.ones(6, 2)).numpy(), 0.0)

    def test_to_converts_dtype_and_keeps_form(self):
        m = Memory(torch.eye(5, dtype=torch.float64)[:, :2], "complement").to(dtype=torch.float32)
        assert m.basis.dtype == torch.float32 and m.form == "complement"

    def test_invalid_memory(self):
        with pytest.raises(ValueError, match="form must be one of"):
            Memory(torch.zeros(4, 1), "orthogonal")
        with pytest.raises(ValueError, match="must be 2-D"):
            Memory(torch.zeros(4))
        with pytest.raises(ValueError, match="at most d_in orthonormal columns"):
            Memory(torch.zeros(3, 4))
        with pytest.raises(ValueError, match=r"project expects X of shape \(4,\)"):
            Memory.empty(4).project(torch.zeros(5, 2))


# ---------------------------------------------------------------------------------------------
# energy threshold schedule
# ---------------------------------------------------------------------------------------------
class TestEnergyThreshold:
    def test_linear_schedule_from_lamb_towards_one(self):
        assert energy_threshold(0.95, 0, 10) == pytest.approx(0.95)
        assert energy_threshold(0.95, 5, 10) == pytest.approx(0.975)
        assert energy_threshold(0.98, 9, 10) == pytest.approx(0.98 + 0.02 * 0.9)
        assert energy_threshold(0.5, 3, 4) == pytest.approx(0.875)

    def test_unknown_total_uses_lamb(self):
        assert energy_threshold(0.97, 123) == 0.97
        assert energy_threshold(1.0, 0, 1) == 1.0

    @pytest.mark.parametrize(
        "args, message",
        [
            ((0.0, 0, 10), r"lamb must be in \(0, 1\]"),
            ((1.2, 0, 10), r"lamb must be in \(0, 1\]"),
            ((0.95, -1, 10), "task_index must be >= 0"),
            ((0.95, 10, 10), "task_index 10 >= total_tasks 10"),
            ((0.95, 0, 0), "total_tasks must be >= 1"),
            ((0.95, 1.5, 10), "task_index must be an integer"),
        ],
    )
    def test_errors(self, args, message):
        with pytest.raises(ValueError, match=message):
            energy_threshold(*args)


# ---------------------------------------------------------------------------------------------
# eigen design
# ---------------------------------------------------------------------------------------------
class TestDesignEigen:
    @pytest.mark.parametrize("d, k, r, seed", [(6, 0, 2, 0), (12, 4, 3, 1), (16, 7, 5, 2), (24, 10, 10, 3)])
    def test_rows_are_top_eigenvectors_of_Q_C2_Q(self, d, k, r, seed):
        rng = np.random.default_rng(seed)
        C = random_covariance(rng, d)
        M = random_orthonormal(rng, d, k)
        B = design_eigen(t64(C), mem_from(M), r)
        assert B.dtype == torch.float64 and B.shape == (r, d)
        Bn = B.numpy()
        # scale applied, rows orthonormal before scaling
        assert_close(Bn @ Bn.T, SCALE**2 * np.eye(r), atol=1e-12)
        # same row space as the numpy reference (sign-free comparison via projectors)
        ref_proj, ref_k = ref_design_eigen_projector(C, M, r)
        assert ref_k == r
        assert_close(Bn.T @ Bn / SCALE**2, ref_proj, atol=1e-9)
        # interference-free: rows orthogonal to the memory
        if k:
            assert np.abs(Bn @ M).max() < 1e-10

    def test_each_row_matches_the_ordered_eigenvector_up_to_sign(self):
        rng = np.random.default_rng(4)
        C, M = random_covariance(rng, 10), random_orthonormal(rng, 10, 3)
        B = design_eigen(t64(C), mem_from(M), 4, scale=1.0).numpy()
        Q = ref_projector(M)
        V, _ = ref_top_eigvecs(Q @ C @ C @ Q, 4)
        for i in range(4):
            assert abs(abs(B[i] @ V[:, i]) - 1.0) < 1e-9

    def test_empty_memory_gives_top_eigenvectors_of_C(self):
        rng = np.random.default_rng(5)
        C = random_covariance(rng, 8)
        B = design_eigen(t64(C), Memory.empty(8), 3, scale=2.0).numpy() / 2.0
        V, _ = ref_top_eigvecs(C, 3)
        assert_close(B.T @ B, V @ V.T, atol=1e-10)

    def test_it_is_C_squared_not_Q_C_Q(self):
        # span(M) random, hence not invariant under C: the top eigenvectors of Q C Q are a different
        # subspace from those of Q C^2 Q. The design follows the authors (C squared).
        rng = np.random.default_rng(6)
        d, r = 8, 2
        C = random_covariance(rng, d, decay=0.6)
        M = random_orthonormal(rng, d, 3)
        Q = ref_projector(M)
        assert np.abs(Q @ C @ M).max() > 1e-2  # not invariant
        B = design_eigen(t64(C), mem_from(M), r, scale=1.0).numpy()
        V_sq, _ = ref_top_eigvecs(Q @ C @ C @ Q, r)
        V_lin, _ = ref_top_eigvecs(Q @ C @ Q, r)
        assert_close(B.T @ B, V_sq @ V_sq.T, atol=1e-10)
        assert np.abs(B.T @ B - V_lin @ V_lin.T).max() > 1e-3

    def test_memory_in_complement_form_gives_the_same_design(self):
        rng = np.random.default_rng(7)
        W = random_orthonormal(rng, 12, 12)
        C = random_covariance(rng, 12)
        Bb = design_eigen(t64(C), Memory(t64(W[:, :8])), 3)
        Bc = design_eigen(t64(C), Memory(t64(W[:, 8:]), "complement"), 3)
        assert_close(Bb.numpy(), Bc.numpy(), atol=1e-10)  # same sign convention too

    def test_sign_convention_largest_entry_positive_and_deterministic(self):
        rng = np.random.default_rng(8)
        C = random_covariance(rng, 10)
        B = design_eigen(t64(C), Memory.empty(10), 5)
        idx = B.abs().argmax(dim=1)
        assert (B[torch.arange(5), idx] > 0).all()
        B2 = design_eigen(t64(-(-C)), Memory.empty(10), 5)
        assert torch.equal(B, B2)

    def test_float32_covariance_gives_float64_rows(self):
        rng = np.random.default_rng(9)
        C = random_covariance(rng, 10)
        B32 = design_eigen(torch.from_numpy(C).float(), Memory.empty(10), 3)
        B64 = design_eigen(t64(C), Memory.empty(10), 3)
        assert B32.dtype == torch.float64
        assert_close(B32.numpy(), B64.numpy(), atol=1e-4)

    def test_usable_count_limits_rank(self):
        rng = np.random.default_rng(10)
        C = random_covariance(rng, 12, rank=3)
        assert np.linalg.matrix_rank(C) == 3
        B = design_eigen(t64(C), Memory.empty(12), 5)
        assert B.shape == (3, 12)
        # a memory covering that rank-3 range leaves nothing usable
        w, V = np.linalg.eigh(C)
        M = V[:, -3:]
        assert design_eigen(t64(C), mem_from(M), 5).shape == (0, 12)

    def test_full_memory_gives_zero_rows(self):
        rng = np.random.default_rng(11)
        C = random_covariance(rng, 6)
        assert design_eigen(t64(C), Memory(torch.eye(6, dtype=torch.float64)), 2).shape == (0, 6)
        assert design_eigen(t64(C), Memory(torch.zeros(6, 0), "complement"), 2).shape == (0, 6)

    def test_zero_covariance_gives_zero_rows(self):
        assert design_eigen(torch.zeros(5, 5), Memory.empty(5), 2).shape == (0, 5)

    def test_errors(self):
        mem = Memory.empty(4)
        with pytest.raises(ValueError, match="covariance must be square"):
            design_eigen(torch.zeros(4, 3), mem, 2)
        with pytest.raises(ValueError, match=r"covariance is \(5, 5\) but memory.d_in is 4"):
            design_eigen(torch.eye(5), mem, 2)
        bad = torch.eye(4)
        bad[1, 2] = float("nan")
        with pytest.raises(ValueError, match="statistics contain NaN or inf: 1 of 16"):
            design_eigen(bad, mem, 2)
        bad[1, 2] = float("inf")
        with pytest.raises(ValueError, match="statistics contain NaN or inf"):
            design_eigen(bad, mem, 2)
        with pytest.raises(ValueError, match="r .* must be a positive integer"):
            design_eigen(torch.eye(4), mem, 0)
        with pytest.raises(ValueError, match="r .* must be a positive integer"):
            design_eigen(torch.eye(4), mem, -3)
        with pytest.raises(ValueError, match="r .* must be a positive integer"):
            design_eigen(torch.eye(4), mem, 2.5)
        with pytest.raises(ValueError, match="scale must be a finite positive number"):
            design_eigen(torch.eye(4), mem, 2, scale=0.0)
        with pytest.raises(ValueError, match="memory must be a peft_inflora.subspace.Memory"):
            design_eigen(torch.eye(4), torch.zeros(4, 0), 2)


# ---------------------------------------------------------------------------------------------
# random design
# ---------------------------------------------------------------------------------------------
class TestDesignRandom:
    def test_rows_in_free_space_unit_norm_times_scale(self):
        rng = np.random.default_rng(12)
        M = random_orthonormal(rng, 16, 6)
        B = design_random(mem_from(M), 4, generator=torch.Generator().manual_seed(0))
        assert B.dtype == torch.float64 and B.shape == (4, 16)
        assert_close(torch.linalg.vector_norm(B, dim=1).numpy(), SCALE, atol=1e-12)
        assert np.abs(B.numpy() @ M).max() < 1e-10

    def test_is_the_normalised_projection_of_a_gaussian_draw(self):
        rng = np.random.default_rng(13)
        M = random_orthonormal(rng, 10, 3)
        G = torch.randn(3, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(42)).numpy()
        ref = G @ ref_projector(M)
        ref = ref / np.linalg.norm(ref, axis=1, keepdims=True)
        B = design_random(mem_from(M), 3, scale=1.0, generator=torch.Generator().manual_seed(42))
        assert_close(B.numpy(), ref, atol=1e-12)

    def test_deterministic_for_a_seed(self):
        mem = Memory.empty(12)
        a = design_random(mem, 5, generator=torch.Generator().manual_seed(3))
        b = design_random(mem, 5, generator=torch.Generator().manual_seed(3))
        c = design_random(mem, 5, generator=torch.Generator().manual_seed(4))
        assert torch.equal(a, b)
        assert not torch.allclose(a, c)

    def test_at_most_free_dimension_rows(self):
        rng = np.random.default_rng(14)
        M = random_orthonormal(rng, 8, 6)  # free dimension 2
        B = design_random(mem_from(M), 5, generator=torch.Generator().manual_seed(0))
        assert B.shape == (2, 8)
        assert np.linalg.matrix_rank(B.numpy()) == 2
        assert design_random(Memory(torch.eye(8, dtype=torch.float64)), 5).shape == (0, 8)

    def test_errors(self):
        with pytest.raises(ValueError, match="r .* must be a positive integer"):
            design_random(Memory.empty(4), 0)
        with pytest.raises(ValueError, match="memory must be a peft_inflora.subspace.Memory"):
            design_random(None, 2)


# ---------------------------------------------------------------------------------------------
# memory update
# ---------------------------------------------------------------------------------------------
def run_update(M, C, threshold, kind="gpm", energy="squared", form="basis"):
    mem = Memory(t64(M), form)
    return update_memory(mem, t64(C), threshold, kind=kind, energy=energy)


class TestUpdateMemoryRules:
    @pytest.mark.parametrize("d, threshold, energy, seed", [
        (6, 0.9, "squared", 0), (12, 0.95, "squared", 1), (16, 0.99, "squared", 2), (20, 0.5, "squared", 3),
        (12, 0.9, "linear", 4), (24, 0.97, "linear", 5),
    ])
    def test_first_task_rule_matches_reference(self, d, threshold, energy, seed):
        rng = np.random.default_rng(seed)
        C = random_covariance(rng, d)
        new = update_memory(Memory.empty(d), t64(C), threshold, kind="gpm", energy=energy)
        ref = ref_update_memory(np.zeros((d, 0)), C, threshold, energy)
        assert new.form == "basis" and new.dimension == ref.shape[1] >= 1
        assert_close(new.projector().numpy(), ref_projector(ref), atol=1e-9)
        assert_orthonormal_columns(new.basis)

    def test_first_task_stops_just_below_the_threshold(self):
        # eigenvalues of C: 3, 2, 1, 1/2 (rotated) -> squared energies 9, 4, 1, 1/4 (total 14.25)
        rng = np.random.default_rng(15)
        R = random_orthonormal(rng, 4, 4)
        C = R @ np.diag([3.0, 2.0, 1.0, 0.5]) @ R.T
        ratios = np.cumsum([9, 4, 1, 0.25]) / 14.25  # 0.632, 0.912, 0.982, 1.0
        assert update_memory(Memory.empty(4), t64(C), 0.95).dimension == 2  # 0.912 < 0.95 <= 0.982
        assert update_memory(Memory.empty(4), t64(C), 0.90).dimension == 1  # 0.632 < 0.90 <= 0.912
        assert update_memory(Memory.empty(4), t64(C), 0.5).dimension == 1  # count 0 -> at least 1
        assert update_memory(Memory.empty(4), t64(C), 0.99).dimension == 3
        assert ratios[2] < 0.99

    @pytest.mark.parametrize("d, k, threshold, energy, seed", [
        (8, 2, 0.9, "squared", 0), (12, 3, 0.95, "squared", 1), (16, 5, 0.99, "squared", 2),
        (24, 8, 0.97, "squared", 3), (12, 4, 0.9, "linear", 4), (16, 6, 0.95, "linear", 5),
    ])
    def test_later_task_rule_matches_reference(self, d, k, threshold, energy, seed):
        rng = np.random.default_rng(seed)
        C = random_covariance(rng, d)
        M = random_orthonormal(rng, d, k)
        new = run_update(M, C, threshold, energy=energy)
        ref = ref_update_memory(M, C, threshold, energy)
        assert ref.shape[1] > k  # the case actually adds directions
        assert new.dimension == ref.shape[1]
        assert_close(new.projector().numpy(), ref_projector(ref), atol=1e-9)
        assert_orthonormal_columns(new.basis)
        # the old memory stays inside the new one
        assert_close(new.project(t64(M)).numpy(), 0.0, atol=1e-12)

    def test_later_task_adds_the_smallest_number_of_directions_reaching_the_threshold(self):
        rng = np.random.default_rng(16)
        C = random_covariance(rng, 12)
        M = random_orthonormal(rng, 12, 3)
        threshold = 0.95
        new = run_update(M, C, threshold)
        j = new.dimension - 3
        ratio_with = captured_energy_ratio(new, t64(C))
        assert ratio_with >= threshold
        # one fewer direction would not reach it
        fewer = Memory(new.basis[:, :-1])
        assert captured_energy_ratio(fewer, t64(C)) < threshold
        assert j >= 1

    def test_no_change_when_captured_energy_reaches_threshold(self):
        rng = np.random.default_rng(17)
        C = random_covariance(rng, 10)
        first = update_memory(Memory.empty(10), t64(C), 0.99, kind="gpm")
        assert captured_energy_ratio(first, t64(C)) >= 0.9
        again = update_memory(first, t64(C), 0.9, kind="gpm")
        assert again.dimension == first.dimension
        assert_close(again.projector().numpy(), first.projector().numpy(), atol=1e-12)

    def test_threshold_one_keeps_every_non_negligible_direction(self):
        rng = np.random.default_rng(18)
        C = random_covariance(rng, 12, rank=4)
        first = update_memory(Memory.empty(12), t64(C), 1.0)
        assert first.dimension == 4
        w, V = np.linalg.eigh(C)
        assert_close(first.projector().numpy(), ref_projector(V[:, -4:]), atol=1e-9)
        # later task with threshold 1: all non-negligible new directions, nothing more
        C2 = random_covariance(rng, 12, rank=3)
        second = update_memory(first, t64(C2), 1.0)
        assert second.dimension == 7
        # full rank covariance: the memory fills the space but never exceeds d_in
        third = update_memory(second, t64(random_covariance(rng, 12)), 1.0, kind="gpm")
        assert third.dimension == 12 and third.basis.shape == (12, 12)
        assert update_memory(third, t64(random_covariance(rng, 12)), 1.0, kind="gpm").dimension == 12

    def test_never_more_than_the_non_negligible_directions(self):
        rng = np.random.default_rng(19)
        C = random_covariance(rng, 10, rank=2)
        assert update_memory(Memory.empty(10), t64(C), 0.999999).dimension <= 2
        M = random_orthonormal(rng, 10, 3)
        assert run_update(M, C, 0.999999).dimension <= 5

    def test_linear_and_squared_energy_differ_as_expected(self):
        # eigenvalues 4, 2, 1, 1, 1, 1. linear: total 10, cumsum .4 .6 .7 .8 .9 1 -> 4 below 0.85
        # squared: energies 16 4 1 1 1 1, total 24, cumsum .667 .833 .875 ... -> 2 below 0.85
        rng = np.random.default_rng(20)
        R = random_orthonormal(rng, 6, 6)
        C = R @ np.diag([4.0, 2.0, 1.0, 1.0, 1.0, 1.0]) @ R.T
        sq = update_memory(Memory.empty(6), t64(C), 0.85, energy="squared")
        lin = update_memory(Memory.empty(6), t64(C), 0.85, energy="linear")
        assert (sq.dimension, lin.dimension) == (2, 4)
        assert_close(sq.projector().numpy(), ref_projector(R[:, :2]), atol=1e-10)
        # the linear memory contains the two leading directions too
        assert_close(lin.project(t64(R[:, :2])).numpy(), 0.0, atol=1e-10)
        assert captured_energy_ratio(sq, t64(C)) == pytest.approx(20 / 24)
        assert captured_energy_ratio(sq, t64(C), energy="linear") == pytest.approx(6 / 10)

    def test_input_memory_not_modified_and_result_is_float64(self):
        rng = np.random.default_rng(21)
        M = random_orthonormal(rng, 8, 2)
        mem = mem_from(M)
        before = mem.basis.clone()
        new = update_memory(mem, t64(random_covariance(rng, 8)), 0.99)
        assert torch.equal(mem.basis, before) and mem.form == "basis"
        assert new.basis.dtype == torch.float64 and new is not mem

    def test_float32_memory_and_covariance(self):
        rng = np.random.default_rng(22)
        d = 16
        C1, C2 = random_covariance(rng, d), random_covariance(rng, d)
        for kind in ("gpm", "dualgpm"):
            m64 = update_memory(Memory.empty(d), t64(C1), 0.9, kind=kind)
            m32 = m64.to(dtype=torch.float32)
            assert m32.basis.dtype == torch.float32
            n64 = update_memory(m64, t64(C2), 0.97, kind=kind)
            n32 = update_memory(m32, torch.from_numpy(C2).float(), 0.97, kind=kind)
            assert n32.basis.dtype == torch.float64
            assert (n32.dimension, n32.form) == (n64.dimension, n64.form)
            assert_close(n32.projector().numpy(), n64.projector().numpy(), atol=1e-5)
            # the float32 round-off of the stored basis is cleaned: columns orthonormal in float64
            assert_orthonormal_columns(n32.basis, atol=1e-12)


class TestGPMvsDualGPM:
    def test_same_projector_over_a_task_sequence_crossing_half(self):
        rng = np.random.default_rng(23)
        d = 16
        gpm, dual = Memory.empty(d), Memory.empty(d)
        ref = np.zeros((d, 0))
        dims, forms = [], []
        for t in range(7):
            C = random_covariance(rng, d, decay=0.6)
            eps = energy_threshold(0.9, t, 7)
            gpm = update_memory(gpm, t64(C), eps, kind="gpm")
            dual = update_memory(dual, t64(C), eps, kind="dualgpm")
            ref = ref_update_memory(ref, C, eps)
            assert gpm.form == "basis"
            assert gpm.dimension == dual.dimension == ref.shape[1]
            assert_close(dual.projector().numpy(), gpm.projector().numpy(), atol=1e-10)
            assert_close(gpm.projector().numpy(), ref_projector(ref), atol=1e-8)
            assert_orthonormal_columns(gpm.basis)
            assert_orthonormal_columns(dual.basis)
            # DualGPM stores the complement exactly when the memory exceeds half the space
            assert dual.form == ("complement" if dual.dimension > d / 2 else "basis")
            expected_cols = d - dual.dimension if dual.form == "complement" else dual.dimension
            assert dual.basis.shape == (d, expected_cols)
            dims.append(dual.dimension)
            forms.append(dual.form)
        # the sequence really crosses d/2 and shrinks P afterwards
        assert 0 < dims[0] <= d / 2
        assert forms.count("complement") >= 2 and forms[-1] == "complement"
        assert dims == sorted(dims) and dims[-1] > dims[forms.index("complement")]

    def test_exactly_half_stays_basis_one_more_switches(self):
        d = 8
        R = random_orthonormal(np.random.default_rng(24), d, d)
        C4 = R[:, :4] @ np.diag([4.0, 3.0, 2.0, 1.0]) @ R[:, :4].T
        four = update_memory(Memory.empty(d), t64(C4), 1.0, kind="dualgpm")
        assert (four.dimension, four.form, four.basis.shape) == (4, "basis", (8, 4))
        C5 = R[:, 4:5] @ R[:, 4:5].T
        five = update_memory(four, t64(C5), 1.0, kind="dualgpm")
        assert (five.dimension, five.form, five.basis.shape) == (5, "complement", (8, 3))
        assert_close(five.projector().numpy(), R[:, 5:] @ R[:, 5:].T, atol=1e-12)

    def test_first_task_exceeding_half_stores_the_complement(self):
        rng = np.random.default_rng(25)
        d = 16
        C = random_covariance(rng, d, decay=0.97)  # flat spectrum: many directions needed
        dual = update_memory(Memory.empty(d), t64(C), 0.95, kind="dualgpm")
        gpm = update_memory(Memory.empty(d), t64(C), 0.95, kind="gpm")
        assert dual.dimension == gpm.dimension > d / 2
        assert dual.form == "complement" and dual.basis.shape == (d, d - dual.dimension)
        assert_orthonormal_columns(dual.basis)
        assert_close(dual.projector().numpy(), gpm.projector().numpy(), atol=1e-10)

    def test_gpm_converts_a_complement_memory_back_to_basis(self):
        rng = np.random.default_rng(26)
        W = random_orthonormal(rng, 10, 10)
        C = random_covariance(rng, 10)
        from_c = run_update(W[:, 6:], C, 0.99, kind="gpm", form="complement")
        from_b = run_update(W[:, :6], C, 0.99, kind="gpm")
        assert from_c.form == "basis"
        assert_close(from_c.projector().numpy(), from_b.projector().numpy(), atol=1e-10)


class TestUpdateMemoryErrors:
    @pytest.mark.parametrize(
        "kwargs, message",
        [
            (dict(threshold=0.0), r"threshold must be in \(0, 1\]"),
            (dict(threshold=1.01), r"threshold must be in \(0, 1\]"),
            (dict(threshold=float("nan")), r"threshold must be in \(0, 1\]"),
            (dict(threshold=0.9, kind="ogd"), "unknown kind 'ogd': use 'gpm'"),
            (dict(threshold=0.9, energy="cubic"), "unknown energy 'cubic': use 'squared'"),
        ],
    )
    def test_bad_options(self, kwargs, message):
        with pytest.raises(ValueError, match=message):
            update_memory(Memory.empty(4), torch.eye(4), **kwargs)

    def test_bad_covariances(self):
        mem = Memory.empty(4)
        with pytest.raises(ValueError, match="covariance must be square"):
            update_memory(mem, torch.zeros(4, 5), 0.9)
        with pytest.raises(ValueError, match=r"covariance is \(6, 6\) but memory.d_in is 4"):
            update_memory(mem, torch.eye(6), 0.9)
        bad = torch.eye(4)
        bad[0, 0] = float("-inf")
        with pytest.raises(ValueError, match="statistics contain NaN or inf"):
            update_memory(mem, bad, 0.9)
        with pytest.raises(ValueError, match="covariance has no energy"):
            update_memory(mem, torch.zeros(4, 4), 0.9)


# ---------------------------------------------------------------------------------------------
# diagnostics
# ---------------------------------------------------------------------------------------------
class TestDiagnostics:
    def test_principal_angle_cosines_against_reference(self):
        rng = np.random.default_rng(27)
        U, V = rng.standard_normal((12, 3)), rng.standard_normal((12, 5))
        qu, _ = np.linalg.qr(U)
        qv, _ = np.linalg.qr(V)
        ref = np.linalg.svd(qu.T @ qv, compute_uv=False)
        got = principal_angle_cosines(t64(U), t64(V))
        assert got.shape == (3,) and got.dtype == torch.float64
        assert_close(got.numpy(), ref, atol=1e-12)
        assert (got[:-1] >= got[1:]).all()

    def test_principal_angle_cosines_known_cases(self):
        e = np.eye(4)
        theta = 0.3
        v = math.cos(theta) * e[:, 0] + math.sin(theta) * e[:, 1]
        assert_close(principal_angle_cosines(t64(e[:, 0]), t64(v)).numpy(), [math.cos(theta)])
        assert_close(principal_angle_cosines(t64(e[:, :2]), t64(e[:, 2:])).numpy(), [0, 0], atol=1e-15)
        # same subspace, different (non-orthonormal, rank-deficient) spanning sets
        A = e[:, :2] @ np.array([[2.0, 1.0, 3.0], [0.0, 5.0, 5.0]])
        assert_close(principal_angle_cosines(t64(A), t64(e[:, :2])).numpy(), [1, 1], atol=1e-12)
        assert principal_angle_cosines(torch.zeros(4, 0), t64(e)).shape == (0,)
        with pytest.raises(ValueError, match="same number of rows"):
            principal_angle_cosines(torch.zeros(4, 1), torch.zeros(5, 1))

    def test_captured_energy_ratio_against_reference(self):
        rng = np.random.default_rng(28)
        C, M = random_covariance(rng, 10), random_orthonormal(rng, 10, 4)
        Q = ref_projector(M)
        for energy, S in (("squared", C @ C), ("linear", C)):
            ref = (np.trace(S) - np.trace(Q @ S @ Q)) / np.trace(S)
            assert captured_energy_ratio(mem_from(M), t64(C), energy) == pytest.approx(ref, abs=1e-12)
            P = random_orthonormal(rng, 10, 10)
            comp = Memory(t64(P[:, 4:]), "complement")
            base = Memory(t64(P[:, :4]))
            assert captured_energy_ratio(comp, t64(C), energy) == pytest.approx(
                captured_energy_ratio(base, t64(C), energy), abs=1e-12)
        assert captured_energy_ratio(Memory.empty(10), t64(C)) == pytest.approx(0.0, abs=1e-15)
        assert captured_energy_ratio(Memory(torch.eye(10, dtype=torch.float64)), t64(C)) == pytest.approx(1.0)
        with pytest.raises(ValueError, match="unknown energy"):
            captured_energy_ratio(Memory.empty(10), t64(C), "abs")
