"""Tiny random-config transformers models and synthetic batches for the architecture tests.

Every factory builds its model from a config object (never ``from_pretrained`` of a hub id), so the tests run
offline. Models are seeded: calling a factory twice with the same ``seed`` gives bit-identical weights, which is
how tests obtain "a fresh copy of the same base weights". Dropout is off everywhere so that training steps and
forward passes are deterministic.

Sizes: hidden 32, 2 layers, vocab 100 (ViT: 8x8 images, 4x4 patches).

Usage from tests (pytest's default ``prepend`` import mode puts ``tests/`` on ``sys.path``)::

    from tiny_models import tiny_bert, text_classification_batches
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn


VOCAB = 100
HIDDEN = 32
LAYERS = 2
HEADS = 4


def _seeded(seed: int, build: Callable[[], nn.Module]) -> nn.Module:
    """Build a model under a fixed torch seed (restoring the global RNG state afterwards), in eval mode."""
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = build()
    finally:
        torch.random.set_rng_state(state)
    return model.eval()


# ---------------------------------------------------------------------------------------------------- models
def tiny_bert(seed: int = 0, num_labels: int = 3) -> nn.Module:
    """``BertForSequenceClassification``: hidden 32, 2 layers, 4 heads, vocab 100, no dropout."""
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        intermediate_size=64,
        max_position_embeddings=64,
        type_vocab_size=2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        classifier_dropout=0.0,
        num_labels=num_labels,
        pad_token_id=0,
    )
    return _seeded(seed, lambda: BertForSequenceClassification(config))


def tiny_llama(seed: int = 0) -> nn.Module:
    """``LlamaForCausalLM``: hidden 32, 2 layers, 4 query heads / 2 kv heads, vocab 100."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=2,
        max_position_embeddings=64,
        attention_dropout=0.0,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    return _seeded(seed, lambda: LlamaForCausalLM(config))


def tiny_gpt2(seed: int = 0) -> nn.Module:
    """``GPT2LMHeadModel``: n_embd 32, 2 layers, 4 heads, vocab 100; attention is the ``Conv1D`` ``c_attn``."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=VOCAB,
        n_embd=HIDDEN,
        n_layer=LAYERS,
        n_head=HEADS,
        n_positions=64,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return _seeded(seed, lambda: GPT2LMHeadModel(config))


def tiny_t5(seed: int = 0) -> nn.Module:
    """``T5ForConditionalGeneration``: d_model 32, 2 encoder + 2 decoder blocks, 4 heads, vocab 100, no dropout."""
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(
        vocab_size=VOCAB,
        d_model=HIDDEN,
        d_kv=8,
        d_ff=64,
        num_layers=LAYERS,
        num_decoder_layers=LAYERS,
        num_heads=HEADS,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        dropout_rate=0.0,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return _seeded(seed, lambda: T5ForConditionalGeneration(config))


def tiny_vit(seed: int = 0, num_labels: int = 5) -> nn.Module:
    """``ViTForImageClassification``: 3x8x8 images, 4x4 patches (5 tokens with CLS), hidden 32, 2 layers."""
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        intermediate_size=64,
        image_size=8,
        patch_size=4,
        num_channels=3,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=num_labels,
    )
    return _seeded(seed, lambda: ViTForImageClassification(config))


# ---------------------------------------------------------------------------------------------------- batches
def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_lengths(n: int, min_len: int, max_len: int, generator: torch.Generator) -> list[int]:
    """``n`` lengths in ``[min_len, max_len]``; the first is always ``max_len`` so a batch has one full row."""
    lengths = torch.randint(min_len, max_len + 1, (n,), generator=generator).tolist()
    lengths[0] = max_len
    return lengths


def padded_ids(lengths: list[int], seq_len: int, generator: torch.Generator, low: int = 3,
               high: int = VOCAB, pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded token ids (real tokens in ``[low, high)``) and their attention mask."""
    ids = torch.randint(low, high, (len(lengths), seq_len), generator=generator)
    mask = torch.zeros(len(lengths), seq_len, dtype=torch.long)
    for row, length in enumerate(lengths):
        mask[row, :length] = 1
        ids[row, length:] = pad_id
    return ids, mask


def text_classification_batches(seed: int = 0, n_batches: int = 3, batch_size: int = 4, seq_len: int = 8,
                                num_labels: int = 3, low: int = 3, high: int = VOCAB) -> list[dict]:
    """Sequence-classification batches: ``input_ids``, ``attention_mask`` (right padding), ``labels``."""
    g = _generator(seed)
    batches = []
    for _ in range(n_batches):
        ids, mask = padded_ids(random_lengths(batch_size, seq_len // 2, seq_len, g), seq_len, g, low, high)
        labels = torch.randint(0, num_labels, (batch_size,), generator=g)
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return batches


def causal_lm_batches(seed: int = 0, n_batches: int = 3, batch_size: int = 4, seq_len: int = 8,
                      low: int = 3, high: int = VOCAB) -> list[dict]:
    """Causal-LM batches: ``input_ids``, ``attention_mask`` (right padding), ``labels`` = ids with -100 on padding."""
    g = _generator(seed)
    batches = []
    for _ in range(n_batches):
        ids, mask = padded_ids(random_lengths(batch_size, seq_len // 2, seq_len, g), seq_len, g, low, high)
        labels = ids.masked_fill(mask == 0, -100)
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return batches


def seq2seq_batches(seed: int = 0, n_batches: int = 3, batch_size: int = 4, source_len: int = 9,
                    target_len: int = 6, low: int = 3, high: int = VOCAB) -> list[dict]:
    """Seq2seq batches: ``input_ids``, ``attention_mask`` (source padding) and ``labels`` padded with -100.

    Source and target padding differ per row, so the encoder mask and the decoder mask (labels != -100) count
    different numbers of tokens.
    """
    g = _generator(seed)
    batches = []
    for _ in range(n_batches):
        ids, mask = padded_ids(random_lengths(batch_size, source_len // 2, source_len, g), source_len, g, low, high)
        target_lengths = random_lengths(batch_size, 2, target_len, g)
        target_lengths = target_lengths[::-1]  # the full-length target is not in the full-length source's row
        labels = torch.randint(low, high, (batch_size, target_len), generator=g)
        for row, length in enumerate(target_lengths):
            labels[row, length:] = -100
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return batches


def image_classification_batches(seed: int = 0, n_batches: int = 3, batch_size: int = 4, image_size: int = 8,
                                 num_labels: int = 5, shift: float = 0.0) -> list[dict]:
    """Image batches: ``pixel_values`` (no mask) and ``labels``. ``shift`` moves the pixel distribution."""
    g = _generator(seed)
    return [
        {
            "pixel_values": torch.randn(batch_size, 3, image_size, image_size, generator=g) + shift,
            "labels": torch.randint(0, num_labels, (batch_size,), generator=g),
        }
        for _ in range(n_batches)
    ]


# ---------------------------------------------------------------------------------------------------- specs
@dataclass
class ArchSpec:
    """One architecture of the end-to-end tests.

    ``make_model(seed)`` builds the base model; ``make_batches(task)`` the batches of task 0, 1, ... (different
    data per task); ``config`` the ``InfLoRAConfig`` keyword arguments; ``targeted`` the module-name suffixes that
    must be adapted (and no others); ``modules_to_save`` the names expected to train fully besides ``inflora_A``.
    """

    name: str
    make_model: Callable[[int], nn.Module]
    make_batches: Callable[[int], list[dict]]
    config: dict
    targeted: tuple[str, ...]
    n_targeted: int
    modules_to_save: tuple[str, ...] = ()
    output_key: str = "logits"
    extra: dict = field(default_factory=dict)


def arch_specs() -> dict[str, ArchSpec]:
    """The architectures the end-to-end tests run, by name."""
    return {
        "bert": ArchSpec(
            name="bert",
            make_model=lambda seed: tiny_bert(seed),
            make_batches=lambda task: text_classification_batches(
                seed=100 + task, low=3 + 40 * task, high=60 + 40 * task
            ),
            config=dict(r=4, target_modules=["query", "value"], modules_to_save=["classifier"]),
            targeted=("attention.self.query", "attention.self.value"),
            n_targeted=2 * LAYERS,
            modules_to_save=("classifier",),
        ),
        "llama": ArchSpec(
            name="llama",
            make_model=lambda seed: tiny_llama(seed),
            make_batches=lambda task: causal_lm_batches(seed=200 + task, low=3 + 40 * task, high=60 + 40 * task),
            config=dict(r=4, target_modules=["q_proj", "v_proj"]),
            targeted=("self_attn.q_proj", "self_attn.v_proj"),
            n_targeted=2 * LAYERS,
        ),
        "gpt2": ArchSpec(
            name="gpt2",
            make_model=lambda seed: tiny_gpt2(seed),
            make_batches=lambda task: causal_lm_batches(seed=300 + task, low=3 + 40 * task, high=60 + 40 * task),
            config=dict(r=4, target_modules=["c_attn"]),
            targeted=("attn.c_attn",),
            n_targeted=LAYERS,
        ),
        "t5": ArchSpec(
            name="t5",
            make_model=lambda seed: tiny_t5(seed),
            make_batches=lambda task: seq2seq_batches(seed=400 + task, low=3 + 40 * task, high=60 + 40 * task),
            config=dict(r=4, target_modules=["q", "v"]),
            targeted=("SelfAttention.q", "SelfAttention.v", "EncDecAttention.q", "EncDecAttention.v"),
            # encoder: 2 blocks x (q, v); decoder: 2 blocks x (self q, v + cross q, v)
            n_targeted=2 * LAYERS + 4 * LAYERS,
        ),
        "vit": ArchSpec(
            name="vit",
            make_model=lambda seed: tiny_vit(seed),
            make_batches=lambda task: image_classification_batches(seed=500 + task, shift=2.0 * task),
            # target_modules left unset on purpose: the default for ViT is key / value
            config=dict(r=4, modules_to_save=["classifier"]),
            targeted=("attention.k_proj", "attention.v_proj"),
            n_targeted=2 * LAYERS,
            modules_to_save=("classifier",),
        ),
    }


def model_outputs(model: nn.Module, batches: list[dict], key: str = "logits") -> torch.Tensor:
    """``key`` of the model's outputs over all batches, flattened and concatenated (eval mode, no grad; the
    model's train / eval mode is restored)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return torch.cat([model(**batch)[key].reshape(-1) for batch in batches])
    finally:
        model.train(was_training)


def mean_loss(model: nn.Module, batches: list[dict]) -> float:
    """Mean of ``model(**batch).loss`` over the batches (eval mode, no grad)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return float(sum(model(**batch).loss.item() for batch in batches) / len(batches))
    finally:
        model.train(was_training)


def train_steps(model: nn.Module, batches: list[dict], steps: int = 6, lr: float = 1e-2,
                optimizer: Optional[torch.optim.Optimizer] = None) -> torch.optim.Optimizer:
    """``steps`` Adam steps on ``model(**batch).loss``, cycling over ``batches``, in train mode (dropout is off in
    the tiny models). Only parameters that require grad go to the optimizer."""
    if optimizer is None:
        optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for step in range(steps):
        loss = model(**batches[step % len(batches)]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    return optimizer
