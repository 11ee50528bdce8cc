"""Input statistics of a task: forward hooks that accumulate each adapted layer's input covariance.

For an adapted layer with input tokens ``x_n`` (``d_in``), over the ``N`` non-padding tokens of a task:

    C = (1/N) sum_n x_n x_n^T          (d_in x d_in), accumulated in float32 or float64, one GEMM per batch

Layers that read the same input tensor (query/key/value of one block) form one *input group*: their covariance is
computed once and they share one design and one memory. Padding tokens are left out with the batch's attention mask
(the decoder mask for decoder inputs of encoder-decoder models); inputs with no matching mask (e.g. ViT patches) use
every token. Under ``torch.distributed`` the sums and counts are all-reduced so every process sees the same ``C``.

Bounded memory (``sketch=ell``, ``InfLoRAConfig.statistics_sketch``): an input group of width ``d_in > 2 ell`` keeps a
Frequent Directions sketch (``2 ell x d_in``) and the exact trace instead of the ``d_in x d_in`` sum
(:class:`~peft_inflora.subspace.SketchAccumulator`; its ``covariance()`` is a
:class:`~peft_inflora.subspace.LowRankCovariance`, which the design and the memory update accept).
Narrower groups keep the exact sum (:class:`~peft_inflora.subspace.CovarianceAccumulator`), which is then
no larger.

Token budget: a pass may stop early, once every input group has seen ``max_tokens`` (non-padding) tokens; ``"auto"``
means ``AUTO_TOKENS_PER_FEATURE * d_in`` tokens for a group with ``d_in`` input features, and at most
``ceil(n / AUTO_BATCH_FRACTION)`` of the ``n`` batches when the iterable has a length (so that the two passes of a task
stay a small part of one epoch on small tasks too, where 16 tokens per feature would be the whole task). The batches
read are then a sample of the task: in a random (seeded) order when ``batches`` is a list or tuple, in the iterable's
own order otherwise (a shuffled DataLoader, as the ContinualTrainer passes, is already a random sample).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import nn
from tqdm.auto import tqdm

from .distributed import agree, check_adapter_not_sharded, check_agreement, reshard_fsdp_modules
from .errors import StatisticsError
from .subspace import CovarianceAccumulator, SketchAccumulator, uses_sketch


CROSS_ATTENTION_MARKERS = ("EncDecAttention", "encoder_attn", "crossattention", "cross_attn")
AUTO_TOKENS_PER_FEATURE = 16
"""``max_tokens="auto"``: a pass reads batches until every input group has seen 16 tokens per input feature (6144
tokens at d_in = 384, 65536 at d_in = 4096)."""
AUTO_BATCH_FRACTION = 8
"""``max_tokens="auto"`` reads at most ``ceil(n / 8)`` of ``n`` batches (at least one): with a no-grad forward at
about 0.45 of a training step, the two passes of a task then cost about 0.11 of a training epoch plus the design."""
KEY_VALUE_NAMES = ("k", "v", "key", "value", "k_proj", "v_proj", "to_k", "to_v")


Accumulator = Union[CovarianceAccumulator, SketchAccumulator]


def make_accumulator(dim: int, dtype: torch.dtype = torch.float64, device: Optional[torch.device] = None,
                     sketch: Optional[int] = None, memory=None) -> Accumulator:
    """The accumulator of an input group of width ``dim``: a :class:`~peft_inflora.subspace.SketchAccumulator` with a
    Frequent Directions sketch of ``sketch`` rows (split by the group's ``memory``, a
    :class:`~peft_inflora.subspace.Memory`, if given) when the sketch is smaller than the exact covariance
    (``2 * sketch < dim``, :func:`~peft_inflora.subspace.uses_sketch`), else the exact ``dim x dim`` sum."""
    if uses_sketch(sketch, dim):
        return SketchAccumulator(dim, int(sketch), dtype=dtype, device=device, memory=memory)
    return CovarianceAccumulator(dim, dtype, device)


@dataclass
class InputGroup:
    """Adapted layers that read one input tensor, and their shared accumulator."""

    names: list[str]
    accumulator: Accumulator

    @property
    def leader(self) -> str:
        return self.names[0]


def reads_decoder_states(layer_name: str) -> bool:
    """Whether a layer's input is the decoder's hidden states: inside a decoder, except the key/value of
    cross-attention, which read the encoder's outputs."""
    parts = layer_name.split(".")
    if "decoder" not in parts:
        return False
    is_cross = any(marker in layer_name for marker in CROSS_ATTENTION_MARKERS)
    return not (is_cross and parts[-1] in KEY_VALUE_NAMES)


def batch_token_masks(batch: Mapping, is_encoder_decoder: bool) -> dict[str, torch.Tensor]:
    """Boolean masks of real (non-padding) tokens: ``{"input": ..., "decoder": ...}`` where available."""
    masks: dict[str, torch.Tensor] = {}
    if batch.get("attention_mask") is not None:
        masks["input"] = batch["attention_mask"].bool()
    if is_encoder_decoder:
        if batch.get("decoder_attention_mask") is not None:
            masks["decoder"] = batch["decoder_attention_mask"].bool()
        elif batch.get("labels") is not None and batch.get("decoder_input_ids") is None:
            masks["decoder"] = batch["labels"] != -100  # decoder inputs are the labels shifted right
    return masks


def select_token_mask(layer_name: str, leading_shape: tuple, masks: dict[str, torch.Tensor]) -> Optional[torch.Tensor]:
    """The mask whose shape matches the layer input's leading dims; ties (equal encoder and decoder lengths) are
    broken by the layer's position. ``None``: no mask applies, every token counts."""
    matches = {k: m for k, m in masks.items() if tuple(m.shape) == tuple(leading_shape)}
    if not matches:
        return None
    if len(matches) == 1:
        return next(iter(matches.values()))
    return matches["decoder" if reads_decoder_states(layer_name) else "input"]


class InputStatisticsCollector:
    """Forward pre-hooks on the adapted layers that feed one accumulator per input group.

    Groups are found on the fly: a layer whose input is the very tensor object another layer already read in the same
    forward pass joins that layer's group (a weak reference guards against a freed tensor's id being reused).
    """

    def __init__(self, layers: Mapping[str, nn.Module], dtype: torch.dtype = torch.float64,
                 share_inputs: bool = True, sketch: Optional[int] = None,
                 memories: Optional[Mapping[str, object]] = None) -> None:
        self.layers = dict(layers)
        self.dtype = dtype
        self.share_inputs = share_inputs
        self.sketch = sketch
        self.memories = dict(memories or {})
        self.groups: dict[str, InputGroup] = {}
        self.leader_of: dict[str, str] = {}
        self._masks: dict[str, torch.Tensor] = {}
        self._seen: dict[int, tuple[weakref.ref, str]] = {}
        self._handles: list = []

    def __enter__(self) -> "InputStatisticsCollector":
        for name, layer in self.layers.items():
            self._handles.append(layer.register_forward_pre_hook(self._make_hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._seen.clear()

    def start_batch(self, masks: dict[str, torch.Tensor]) -> None:
        self._masks = masks
        self._seen = {}

    def _make_hook(self, name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0] if args else None
            if not isinstance(x, torch.Tensor):
                return
            leader = name
            if self.share_inputs:
                entry = self._seen.get(id(x))
                if entry is not None and entry[0]() is x:
                    leader = entry[1]
                else:
                    self._seen[id(x)] = (weakref.ref(x), name)
            known = self.leader_of.setdefault(name, leader)
            if known != leader:
                raise StatisticsError(
                    f"Layer '{name}' read the input of '{leader}' in one batch and of '{known}' in another: the "
                    "model's input sharing changes between batches. Set `share_input_statistics=False` in the "
                    "InfLoRAConfig."
                )
            if leader != name:
                if name not in self.groups[leader].names:
                    self.groups[leader].names.append(name)
                return
            group = self.groups.get(name)
            if group is None:
                group = InputGroup([name], make_accumulator(x.shape[-1], self.dtype, x.device, self.sketch,
                                                            self.memories.get(name)))
                self.groups[name] = group
            tokens = x.reshape(-1, x.shape[-1])
            mask = select_token_mask(name, tuple(x.shape[:-1]), self._masks)
            if mask is not None:
                tokens = tokens[mask.reshape(-1).to(tokens.device)]
            group.accumulator.update(tokens)

        return hook


def _to_device(batch: Mapping, device: torch.device) -> dict:
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def token_budget(max_tokens: Union[int, str, None], d_in: int) -> Optional[int]:
    """Tokens an input group of width ``d_in`` needs before a pass may stop: ``max_tokens`` itself, or
    ``AUTO_TOKENS_PER_FEATURE * d_in`` for ``"auto"``; None: no budget (read every batch)."""
    if max_tokens is None:
        return None
    if max_tokens == "auto":
        return AUTO_TOKENS_PER_FEATURE * int(d_in)
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise StatisticsError(f"max_tokens must be an int >= 1, 'auto' or None, got {max_tokens!r}.")
    return max_tokens


def auto_batch_limit(max_tokens: Union[int, str, None], batches: Iterable) -> Optional[int]:
    """The batch cap that ``max_tokens="auto"`` adds: ``ceil(len(batches) / AUTO_BATCH_FRACTION)`` when ``batches``
    has a length, else None (an iterable of unknown length is read until the token budget)."""
    if max_tokens != "auto" or not hasattr(batches, "__len__"):
        return None
    return max(1, -(-len(batches) // AUTO_BATCH_FRACTION))


def _budget_reached(groups: Mapping[str, InputGroup], max_tokens: Union[int, str, None]) -> bool:
    if max_tokens is None or not groups:
        return False
    return all(group.accumulator.local_count >= token_budget(max_tokens, group.accumulator.dim)
               for group in groups.values())


def _sampling_order(batches: Iterable, max_tokens: Union[int, str, None], seed: int = 0) -> Iterable:
    """A list or tuple read under a token budget: in a seeded random order, so that a budget that stops the pass
    early reads a random sample rather than the first batches (which may all hold one class)."""
    if max_tokens is None or not isinstance(batches, (list, tuple)) or len(batches) < 2:
        return batches
    order = torch.randperm(len(batches), generator=torch.Generator().manual_seed(seed)).tolist()
    return [batches[i] for i in order]


_END = object()  # end of a statistics pass's batches


def _next_batch(ordered: Iterator, device: torch.device,
                is_encoder_decoder: bool) -> tuple[object, Optional[Exception]]:
    """The next batch, checked and ready for the forward (``(inputs, masks)``; ``_END`` when there is none), and the
    error raised instead (a failing loader, a batch that is not a dict), if any."""
    try:
        batch = next(ordered, _END)
        if batch is _END:
            return _END, None
        if not isinstance(batch, Mapping):
            raise StatisticsError(
                f"Each batch must be a dict of model inputs (e.g. input_ids, attention_mask), got "
                f"{type(batch).__name__}."
            )
        batch = _to_device(batch, device)
        masks = batch_token_masks(batch, is_encoder_decoder)
        if not is_encoder_decoder:
            # no loss needed; encoder-decoder models keep labels, from which they build decoder inputs
            batch = {k: v for k, v in batch.items() if k != "labels"}
        return (batch, masks), None
    except Exception as err:  # agreed on like a failing forward
        return _END, err


def _stop_together(stop: bool, error: Optional[Exception], step: str) -> bool:
    """``stop`` on any process means stop on every process, and a failed batch on any process means every process
    raises (:func:`~peft_inflora.distributed.check_agreement`: one all-reduce per batch; no-op without
    torch.distributed). So every process runs the same number of forwards: under FSDP each forward is a collective,
    and a process that ran one more than the others would wait for them forever."""
    return check_agreement(step, error, stop=stop)


@torch.no_grad()
def collect_statistics(model: nn.Module, layers: Mapping[str, nn.Module], batches: Iterable[Mapping], *,
                       dtype: torch.dtype = torch.float64, share_inputs: bool = True,
                       max_batches: Optional[int] = None, max_tokens: Union[int, str, None] = None,
                       sketch: Optional[int] = None, memories: Optional[Mapping[str, object]] = None,
                       desc: str = "InfLoRA statistics", progress: bool = True,
                       step: Optional[str] = None) -> list[InputGroup]:
    """Run ``model`` in eval mode under no_grad over ``batches`` and return the input groups with their summed
    statistics (all-reduced across processes). The model's train/eval mode is restored; nothing else changes.

    ``max_batches``: read at most that many batches. ``max_tokens`` (int, ``"auto"`` or None): stop after the batch
    that gives every input group at least that many non-padding tokens (``"auto"``: ``AUTO_TOKENS_PER_FEATURE``
    times the group's input width, and at most :func:`auto_batch_limit` batches), counted per process; lists and
    tuples are then read in a seeded random order. Under ``torch.distributed`` every process reads the same number of
    batches: the pass stops on all of them as soon as one has read ``max_batches``, reached the token budget or run
    out of batches (:func:`_stop_together`).
    ``sketch`` (int or None): groups wider than ``2 * sketch`` keep a Frequent Directions sketch of ``sketch`` rows
    instead of the exact covariance (:func:`make_accumulator`), split by ``memories[leader]`` (the memory of the
    group's first layer, a :class:`~peft_inflora.subspace.Memory`) when given: the design and memory update must then
    run with that memory.

    ``step``: the name of the pass in the :class:`~peft_inflora.errors.DistributedStepError` the other processes raise
    when one process fails (a bad batch, a failing loader, a layer its batches never reach, NaN or inf in its
    statistics); default ``desc``. Every process then raises before the statistics are all-reduced.
    """
    step = step or desc
    with agree(step):  # validate before running anything, on every process
        if max_tokens is not None:
            token_budget(max_tokens, 1)
        check_adapter_not_sharded(layers)  # FSDP must leave A_t whole: begin_task / end_task replace it
        if isinstance(batches, Mapping):
            raise StatisticsError("`batches` is a single batch (a dict): pass an iterable of batches, e.g. [batch] "
                                  "or a DataLoader.")
    auto_cap = auto_batch_limit(max_tokens, batches)
    if auto_cap is not None:
        max_batches = auto_cap if max_batches is None else min(max_batches, auto_cap)
    config = getattr(model, "config", None)
    is_encoder_decoder = bool(getattr(config, "is_encoder_decoder", False))
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    was_training = model.training
    n_batches = 0
    model.eval()
    try:
        with InputStatisticsCollector(layers, dtype=dtype, share_inputs=share_inputs, sketch=sketch,
                                      memories=memories) as collector:
            total = min(len(batches), max_batches) if hasattr(batches, "__len__") and max_batches else None
            if total is None and hasattr(batches, "__len__"):
                total = len(batches)
            with tqdm(total=total, desc=desc, disable=not progress, leave=False) as bar:
                try:
                    ordered = iter(_sampling_order(batches, max_tokens))
                    batch, error = _next_batch(ordered, device, is_encoder_decoder)
                except Exception as err:  # the loader could not start on this process
                    batch, error = _END, err
                # a batch is fetched and checked before the processes agree to run it: under FSDP the forward is
                # a collective, which a process whose batch failed must not leave the others waiting in
                while not _stop_together(batch is _END, error, step):
                    try:
                        _forward(model, collector, *batch)
                    except Exception as err:  # every process raises at the next agreement, none waits
                        batch, error = _END, err
                        continue
                    n_batches += 1
                    bar.update()
                    done = (max_batches is not None and n_batches >= max_batches) or _budget_reached(
                        collector.groups, max_tokens)
                    batch, error = (_END, None) if done else _next_batch(ordered, device, is_encoder_decoder)
    finally:
        model.train(was_training)
        reshard_fsdp_modules(model)  # FSDP2 keeps the root unsharded after a forward: hand back sharded params
    if n_batches == 0:
        raise StatisticsError("`batches` is empty: the statistics pass needs at least one batch of the task's data.")
    groups = [collector.groups[k] for k in sorted(collector.groups)]
    with agree(step):  # local checks before the all-reduce: a process with other groups or NaN must not join it
        missing = set(layers) - set(collector.leader_of)
        if missing:
            raise StatisticsError(
                f"{len(missing)} adapted layer(s) never ran during the statistics pass (e.g. {sorted(missing)[0]}): "
                "the batches must exercise every adapted layer (for encoder-decoder models include labels or "
                "decoder_input_ids)."
            )
        for group in groups:
            if not group.accumulator.is_finite():
                raise _non_finite_error(group.leader)
    for group in groups:
        group.accumulator.all_reduce()
        if group.accumulator.count.item() == 0:
            raise StatisticsError(
                f"No non-padding tokens reached layer '{group.leader}': every token was masked by the attention "
                "mask. Check the batches' attention_mask."
            )
        if not group.accumulator.is_finite():  # finite on every process, but the sum overflowed
            raise _non_finite_error(group.leader)
    return groups


def _non_finite_error(leader: str) -> StatisticsError:
    return StatisticsError(
        f"The input statistics of layer '{leader}' contain NaN or inf: the model produced non-finite "
        "activations on these batches (check the data, or load the model in a wider dtype)."
    )


def _forward(model: nn.Module, collector: InputStatisticsCollector, batch: dict,
             masks: dict[str, torch.Tensor]) -> None:
    """One forward of the statistics pass, its inputs' statistics added to ``collector``."""
    collector.start_batch(masks)
    try:
        model(**batch)
    except StatisticsError:
        raise
    except Exception as err:  # the batch does not fit the model
        hint = f"Each batch must hold the inputs the model's forward needs (got keys {sorted(batch)})."
        if "DTensor" in str(err):
            hint = ("Some parameters are still sharded: with FSDP2 apply `fully_shard` to "
                    "`peft_model.base_model.model` (the model this pass calls) as the root, not to "
                    "the PeftModel, whose forward hooks this pass does not run.")
        raise StatisticsError(
            f"The model could not run on a statistics batch ({type(err).__name__}: {err}). {hint}"
        ) from err
