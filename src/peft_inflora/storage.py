"""How an adapter's continual state is laid out in ``adapter_model.safetensors``: one copy per input group, and the
storage precision of the memory basis.

Layers that read one input tensor (query / key / value of a block, an *input group*,
:class:`~peft_inflora.statistics.InputGroup`) get one design and one memory, so their ``inflora_B`` ``(r_t, d_in)``,
``inflora_past_B`` ``(R, d_in)`` and ``inflora_memory`` ``(d_in, k)`` hold the same values. Saving
(:func:`shared_state_for_save`, from ``InfLoRAModel._get_adapter_state_dict``) keeps each distinct value once, under
the first layer (in module order) that holds it; every other layer of the group gets instead a small key

    <layer>.<name>_source     uint8 (n,): the UTF-8 module name of the layer that holds the tensor

(``name`` one of :data:`SHARED_STATE_NAMES`). Sharing is decided by value (``torch.equal``), not by re-running the
statistics, so it is exact: a layer whose tensor differs (another rank in ``rank_pattern``,
``share_input_statistics=False``) keeps its own copy. Loading (:func:`expand_shared_state`, from
``InfLoRAModel._remap_adapter_state_dict_for_load``) puts the source's tensor back under every layer's key before
anything is loaded, so ``PeftModel.from_pretrained``, ``load_adapter`` and transformers' ``load_adapter`` see one
tensor per layer as before. Files written before this layout (one copy per layer) have no ``_source`` keys and load
unchanged.

Memory precision (``InfLoRAConfig.memory_storage_dtype``): the memory basis ``M`` (orthonormal columns) is written in
``float32`` (default, exact), ``bfloat16`` or ``float16``. A basis read in a 16-bit dtype is re-orthonormalised on
load (:func:`reorthonormalised_memory`: thin QR in float64, signs fixed so ``diag(R) > 0``, then float32). Rounding
each entry to unit roundoff ``u`` (``2^-8`` bf16, ``2^-11`` fp16; plus ``2^-25`` absolute for fp16 subnormals) moves
``M`` by ``E`` with ``||E||_2 <= ||E||_F <= u sqrt(k) (+ 2^-25 sqrt(d_in k))`` and the loaded subspace by at most

    sin(theta) = ||Q_loaded - Q_exact||_2 <= ||E||_2 / (1 - ||E||_2)   (+ 2^-24 sqrt(k) for the float32 result)
                                                                        (:func:`subspace_error_bound`)

so a design ``B`` built in the loaded free space leaks into old inputs ``X`` that lie in the exact memory by at most
``||X B^T||_F <= sin(theta) ||B||_2 ||X||_F``: the leakage of ``interference_report`` grows by at most ``sin(theta)``.
Measured in ``benchmarks/bench_adapter_size.py``. The outputs do not depend on the memory (only the next task's
design does), so they stay bit-identical.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from typing import Optional

import torch


#: per-layer tensors that the layers of one input group share
SHARED_STATE_NAMES = ("inflora_B", "inflora_past_B", "inflora_memory")
SOURCE_SUFFIX = "_source"
PEFT_KEY_PREFIX = "base_model.model."
MEMORY_STORAGE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: unit roundoff of each storage dtype (relative error of one rounded entry)
UNIT_ROUNDOFF = {torch.float32: 2.0 ** -24, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}
#: largest absolute rounding error of a subnormal entry (0: none below the normal range that matters here)
SUBNORMAL_ERROR = {torch.float32: 2.0 ** -150, torch.bfloat16: 2.0 ** -134, torch.float16: 2.0 ** -25}


def memory_storage_dtype(config) -> torch.dtype:
    """The torch dtype of ``config.memory_storage_dtype`` (``"float32"`` when the config has no such field). Raises
    ``ValueError`` naming the allowed values, before anything is written."""
    value = getattr(config, "memory_storage_dtype", "float32")
    if value not in MEMORY_STORAGE_DTYPES:
        raise ValueError(
            f"memory_storage_dtype must be one of {sorted(MEMORY_STORAGE_DTYPES)}, got {value!r}: use 'float32' "
            "(exact, the default) or 'bfloat16' / 'float16' (half the memory bytes, re-orthonormalised on load)."
        )
    return MEMORY_STORAGE_DTYPES[value]


def _split_key(key: str, adapter_name: Optional[str]) -> Optional[tuple[str, str]]:
    """``(module name, state name)`` of a state-dict key ``<module>.<state>[.<adapter>]`` for a shared state name."""
    if adapter_name is not None:
        suffix = f".{adapter_name}"
        if not key.endswith(suffix):
            return None
        key = key[: -len(suffix)]
    module, _, state = key.rpartition(".")
    return (module, state) if state in SHARED_STATE_NAMES and module else None


def _fingerprint(tensor: torch.Tensor) -> tuple:
    data = tensor.detach().to("cpu").contiguous().view(torch.uint8).reshape(-1).numpy()
    return (tensor.dtype, tuple(tensor.shape), hashlib.blake2b(data.tobytes(), digest_size=16).digest())


def _encode_name(name: str) -> torch.Tensor:
    return torch.tensor(list(name.encode("utf-8")), dtype=torch.uint8)


def _decode_name(tensor: torch.Tensor) -> str:
    return bytes(tensor.to(torch.uint8).reshape(-1).tolist()).decode("utf-8")


def shared_state_for_save(state_dict: Mapping[str, torch.Tensor], adapter_name: str,
                          memory_dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The adapter's state dict (keys ``<module>.<state>.<adapter>``) with one copy of each shared tensor per value:
    the first layer keeps it, later layers holding an equal tensor get ``<module>.<state>_source.<adapter>`` naming
    that layer instead. Memory bases are cast to ``memory_dtype``. Empty tensors are kept as they are (they cost
    only their header entry). Other keys pass through unchanged."""
    kept: dict[tuple, list[tuple[str, torch.Tensor]]] = {}
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        parts = _split_key(key, adapter_name)
        if parts is None:
            out[key] = tensor
            continue
        module, state = parts
        if state == "inflora_memory" and tensor.dtype != memory_dtype:
            tensor = tensor.detach().to(memory_dtype)
        if tensor.numel() == 0:
            out[key] = tensor
            continue
        bucket = kept.setdefault((state,) + _fingerprint(tensor), [])
        source = next((m for m, t in bucket if torch.equal(t, tensor)), None)
        if source is None:
            bucket.append((module, tensor))
            out[key] = tensor
        else:
            out[f"{module}.{state}{SOURCE_SUFFIX}.{adapter_name}"] = _encode_name(source.removeprefix(PEFT_KEY_PREFIX))
    return out


@torch.no_grad()
def reorthonormalised_memory(basis: torch.Tensor) -> torch.Tensor:
    """A memory basis read in a 16-bit dtype, made orthonormal again: thin QR in float64 with ``diag(R) > 0`` (so it
    stays close to the stored columns), returned in float32. ``(d_in, 0)`` stays empty."""
    b = basis.detach().to(torch.float64)
    if b.shape[1] == 0:
        return b.to(torch.float32)
    q, r = torch.linalg.qr(b, mode="reduced")
    signs = torch.sign(torch.diagonal(r))
    signs[signs == 0] = 1.0
    return (q * signs).to(torch.float32).contiguous()


def expand_shared_state(state_dict: Mapping[str, torch.Tensor], where: str = "The adapter checkpoint"
                        ) -> dict[str, torch.Tensor]:
    """Inverse of :func:`shared_state_for_save` on a checkpoint (keys without the adapter name): every
    ``<module>.<state>_source`` key is replaced by ``<module>.<state>`` holding the source layer's tensor, and memory
    bases stored in a 16-bit dtype are re-orthonormalised to float32 (:func:`reorthonormalised_memory`, once per
    stored tensor, so the layers of a group get the same values). A checkpoint without ``_source`` keys (written
    before this layout) comes back unchanged apart from the memory precision.

    Raises:
        ValueError: a ``_source`` key names a layer that holds no such tensor (a truncated or edited file).
    """
    out: dict[str, torch.Tensor] = {}
    sources: dict[str, str] = {}
    for key, tensor in state_dict.items():
        module, _, state = key.rpartition(".")
        if state.endswith(SOURCE_SUFFIX) and state[: -len(SOURCE_SUFFIX)] in SHARED_STATE_NAMES:
            sources[f"{module}.{state[: -len(SOURCE_SUFFIX)]}"] = _decode_name(tensor)
        else:
            out[key] = tensor
    uses_prefix = any(k.startswith(PEFT_KEY_PREFIX) for k in state_dict)
    for key, source in sources.items():
        state = key.rpartition(".")[2]
        source_key = f"{PEFT_KEY_PREFIX if uses_prefix else ''}{source}.{state}"
        if source_key not in out:
            raise ValueError(
                f"{where}: '{key}' is stored as a copy of layer '{source}', but the file holds no '{source_key}': it "
                "is truncated or was edited. Download or copy the adapter again, or save it again from the model it "
                "came from."
            )
        out[key] = out[source_key]
    done: dict[int, torch.Tensor] = {}
    for key, tensor in out.items():
        if key.rpartition(".")[2] == "inflora_memory" and tensor.dtype not in (torch.float32, torch.float64):
            if id(tensor) not in done:
                done[id(tensor)] = reorthonormalised_memory(tensor)
            out[key] = done[id(tensor)]
    # one tensor object per layer: a load with assign=True (low_cpu_mem_usage) must not tie the layers' buffers
    seen: set[int] = set()
    for key, tensor in out.items():
        if id(tensor) in seen:
            out[key] = tensor.clone()
        seen.add(id(tensor))
    return out


def subspace_error_bound(d_in: int, k: int, dtype: torch.dtype) -> float:
    """Upper bound on ``sin(theta) = ||Q_loaded - Q_exact||_2`` for a ``d_in x k`` orthonormal basis stored in
    ``dtype`` and re-orthonormalised: ``e / (1 - e)`` with ``e = u sqrt(k) + s sqrt(d_in k)`` (``u`` the unit
    roundoff, ``s`` the largest subnormal rounding error), a bound on ``||E||_F >= ||E||_2`` since every entry
    moves by at most ``u |m| + s`` and ``||M||_F = sqrt(k)``; plus ``2^-24 sqrt(k)`` for rounding the
    re-orthonormalised basis to float32. ``inf`` when ``e >= 1``."""
    e = UNIT_ROUNDOFF[dtype] * math.sqrt(k) + SUBNORMAL_ERROR[dtype] * math.sqrt(d_in * k)
    return e / (1.0 - e) + UNIT_ROUNDOFF[torch.float32] * math.sqrt(k) if e < 1.0 else math.inf


__all__ = [
    "MEMORY_STORAGE_DTYPES",
    "SHARED_STATE_NAMES",
    "expand_shared_state",
    "memory_storage_dtype",
    "reorthonormalised_memory",
    "shared_state_for_save",
    "subspace_error_bound",
]
