"""The SVD of a product of thin factors and its best low-rank truncations: the math of the LoRA export.

``dW = past_A past_B`` (``past_A``: ``d_out x R``, ``past_B``: ``R x d_in``) is never formed: its SVD comes from QR
decompositions of the two factors (``past_A = Q1 R1``, ``past_B^T = Q2 R2``, SVD of the small ``R1 R2^T``), and the
best rank-``k`` approximation splits the singular values evenly between ``lora_B`` and ``lora_A``. Pure torch.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch


# an export rank: None (exact), an int k >= 1 (best rank k), or a float t in (0, 1] (share of the energy)
ExportRank = Optional[Union[int, float]]


@torch.no_grad()
def spectrum_of_product(past_A: torch.Tensor, past_B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SVD of ``dW = past_A @ past_B`` from QRs of the factors, without forming ``dW`` (``d_out x d_in``).

    Args:
        past_A: ``(d_out, R)``.
        past_B: ``(R, d_in)``.

    Returns:
        ``(left, s, right)``, float64 on the CPU, with ``dW = left @ diag(s) @ right`` up to rounding: ``left``
        ``(d_out, m)`` and ``right`` ``(m, d_in)`` with orthonormal columns / rows, ``s`` ``(m,)`` descending,
        ``m = min(a, b)``, ``a = min(d_out, R)``, ``b = min(d_in, R)``.
    """
    # on the CPU: the factors are thin (R columns / rows), and float64 is not available on every accelerator
    A = past_A.detach().to(device="cpu", dtype=torch.float64)
    B = past_B.detach().to(device="cpu", dtype=torch.float64)
    q1, r1 = torch.linalg.qr(A)  # (d_out, a), (a, R)
    q2, r2 = torch.linalg.qr(B.T)  # (d_in, b), (b, R)
    u, s, vh = torch.linalg.svd(r1 @ r2.T, full_matrices=False)  # (a, m), (m,), (m, b)
    return q1 @ u, s, vh @ q2.T


def relative_truncation_error(singular_values: torch.Tensor, rank: int) -> float:
    """``sqrt(sum_{i >= rank} s_i^2) / sqrt(sum_i s_i^2)`` (0-based ``i``; 0.0 when all ``s`` are 0)."""
    s = singular_values.to(torch.float64)
    total = float((s * s).sum())
    if total == 0.0:
        return 0.0
    tail = float((s[rank:] * s[rank:]).sum())
    return math.sqrt(tail / total)


def energy_rank(singular_values: torch.Tensor, share: float) -> int:
    """The fewest leading singular values that hold ``share`` of the energy: the smallest ``k >= 1`` with
    ``sum_{i < k} s_i^2 >= share * sum_i s_i^2`` (0-based ``i``; 1 when all ``s`` are 0)."""
    cumulative = torch.cumsum(singular_values.to(torch.float64) ** 2, dim=0)
    if float(cumulative[-1]) == 0.0:
        return 1
    k = int(torch.searchsorted(cumulative, share * cumulative[-1]).item()) + 1
    return min(k, singular_values.numel())


@torch.no_grad()
def lora_factors(past_A: torch.Tensor, past_B: torch.Tensor, rank: ExportRank = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """LoRA factors of one layer's finished tasks.

    Args:
        past_A: ``(d_out, R)``, the stacked ``A_j``.
        past_B: ``(R, d_in)``, the stacked ``B_j``.
        rank: ``None``: exact (``lora_A = past_B``, ``lora_B = past_A``); an int ``k >= 1``: the best rank
            ``min(k, m)`` approximation (see the module docstring); a float ``t`` in ``(0, 1]``: the best rank
            ``energy_rank(s, t)`` approximation.

    Returns:
        ``(lora_A, lora_B, singular_values, relative_error)``: ``lora_A`` ``(r, d_in)`` and ``lora_B`` ``(d_out, r)``
        float32 on the CPU with ``lora_B @ lora_A ~= dW``; the float64 singular values of ``dW``; the relative
        Frobenius error of the truncation (0.0 when exact).
    """
    left, s, right = spectrum_of_product(past_A, past_B)
    if rank is None:
        lora_A, lora_B, error = past_B.detach(), past_A.detach(), 0.0
    else:
        k = energy_rank(s, rank) if isinstance(rank, float) else min(rank, s.numel())
        root = s[:k].sqrt()
        lora_B = left[:, :k] * root[None, :]
        lora_A = root[:, None] * right[:k]
        error = relative_truncation_error(s, k)
    as_saved = lambda t: t.to(device="cpu", dtype=torch.float32).contiguous()  # noqa: E731
    return as_saved(lora_A), as_saved(lora_B), s.cpu(), error
