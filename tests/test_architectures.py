"""End-to-end specification tests of InfLoRA on tiny random-config transformers models.

Architectures: BERT (sequence classification, ``query``/``value``, ``classifier`` saved), Llama (causal LM,
``q_proj``/``v_proj``), GPT-2 (``Conv1D`` ``c_attn``, fan_in_fan_out), T5 (q/v of encoder self, decoder self and
decoder cross attention) and ViT (image classification, default targets key/value, ``classifier`` saved).

For each the continual lifecycle runs once (module-scoped fixture ``run``) and records what the tests check:

1. ``begin_task`` leaves the outputs unchanged (A_t = 0);
2. after ``begin_task`` exactly the ``inflora_A`` parameters and ``modules_to_save`` require grad;
3. a few Adam steps change loss and outputs, and only the trainable parameters change;
4. ``end_task`` leaves the outputs unchanged (folding is exact);
5. the second task's B_t has rows orthogonal to the memory;
6. ``save_pretrained`` -> ``PeftModel.from_pretrained`` onto fresh base weights gives bit-identical outputs.

Plus the input statistics: T5's input groups and token counts (cross-attention key/value read the encoder output),
BERT's shared q/v group, and padding invariance of the covariance.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field

import pytest
import torch
from peft import PeftModel, get_peft_model
from tiny_models import (
    arch_specs,
    mean_loss,
    model_outputs,
    seq2seq_batches,
    text_classification_batches,
    tiny_bert,
    tiny_llama,
    tiny_t5,
    tiny_vit,
    train_steps,
)
from torch import nn
from transformers.pytorch_utils import Conv1D

import peft_inflora
from peft_inflora.statistics import collect_statistics


ADAPTER = "default"
SPECS = arch_specs()
DESIGN_SCALE = 1 / 3**0.5


def make_peft_model(spec, seed: int = 0):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. GPT-2's "fan_in_fan_out is set to False but the target is Conv1D"
        return get_peft_model(spec.make_model(seed), peft_inflora.InfLoRAConfig(**spec.config))


def snapshot(model: nn.Module) -> tuple[dict, dict]:
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    return params, buffers


@dataclass
class Run:
    """What one architecture's lifecycle recorded (see the module docstring)."""

    spec: object
    model: nn.Module
    batches: list
    batches2: list
    out_base: torch.Tensor = None
    out_wrapped: torch.Tensor = None
    out_begin: torch.Tensor = None
    ranks: dict = None
    begin_A: dict = field(default_factory=dict)
    begin_B: dict = field(default_factory=dict)
    trainable: set = None
    expected_trainable: set = None
    loss_before: float = None
    loss_after: float = None
    before_train: tuple = None
    after_train: tuple = None
    out_trained: torch.Tensor = None
    out_end: torch.Tensor = None
    end_state: dict = field(default_factory=dict)
    memories: dict = field(default_factory=dict)
    designs2: dict = field(default_factory=dict)
    out_end_task2_data: torch.Tensor = None
    out_begin2: torch.Tensor = None
    out_begin2_task2_data: torch.Tensor = None
    saved: dict = field(default_factory=dict)
    after_end2: dict = field(default_factory=dict)
    merge_copy: nn.Module = None


@pytest.fixture(scope="module", params=list(SPECS))
def run(request, tmp_path_factory):
    spec = SPECS[request.param]
    torch.manual_seed(0)
    b1, b2 = spec.make_batches(0), spec.make_batches(1)
    base = spec.make_model(0)
    r = Run(spec=spec, model=None, batches=b1, batches2=b2)
    r.out_base = model_outputs(base, b1)
    model = make_peft_model(spec)
    r.model = model
    r.out_wrapped = model_outputs(model, b1)

    # task 1
    r.ranks = model.begin_task(b1, progress=False)
    r.out_begin = model_outputs(model, b1)
    layers = model.base_model.inflora_layers()
    for name, layer in layers.items():
        r.begin_A[name] = layer.inflora_A[ADAPTER].detach().clone()
        r.begin_B[name] = layer.inflora_B[ADAPTER].detach().clone()
    r.trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    r.loss_before = mean_loss(model, b1)
    r.before_train = snapshot(model)
    train_steps(model, b1, steps=6, lr=1e-2)  # optimizer created after begin_task
    r.after_train = snapshot(model)
    r.loss_after = mean_loss(model, b1)
    r.out_trained = model_outputs(model, b1)

    model.end_task(b1, progress=False)
    r.out_end = model_outputs(model, b1)
    r.end_state = {
        "tasks_done": model.tasks_done(),
        "in_progress": model.task_in_progress(),
        "A_shapes": {n: tuple(layer.inflora_A[ADAPTER].shape) for n, layer in layers.items()},
        "past_A_shapes": {n: tuple(layer.inflora_past_A[ADAPTER].shape) for n, layer in layers.items()},
        "past_B_shapes": {n: tuple(layer.inflora_past_B[ADAPTER].shape) for n, layer in layers.items()},
    }
    r.memories = {n: layer.get_memory(ADAPTER) for n, layer in layers.items()}
    path = tmp_path_factory.mktemp(f"{spec.name}_finished")
    model.save_pretrained(str(path))
    r.saved["finished"] = (path, b1, model_outputs(model, b1))

    # task 2
    r.out_end_task2_data = model_outputs(model, b2)
    model.begin_task(b2, progress=False)
    r.out_begin2 = model_outputs(model, b1)
    r.out_begin2_task2_data = model_outputs(model, b2)
    r.designs2 = {n: layer.inflora_B[ADAPTER].detach().clone() for n, layer in layers.items()}
    train_steps(model, b2, steps=3, lr=1e-2)
    path = tmp_path_factory.mktemp(f"{spec.name}_in_progress")
    model.save_pretrained(str(path))
    r.saved["in_progress"] = (path, b2, model_outputs(model, b2))
    r.merge_copy = copy.deepcopy(model)

    # finishing task 2 (to compare with a checkpoint loaded mid-task and finished there)
    model.end_task(b2, progress=False)
    r.after_end2 = {
        "outputs": model_outputs(model, b2),
        "memories": {n: layer.get_memory(ADAPTER).projector() for n, layer in layers.items()},
    }
    return r


def expected_trainable_names(model, spec) -> set:
    names = set()
    for module_name, layer in model.base_model.inflora_layers().items():
        names.add(f"base_model.model.{module_name}.inflora_A.{ADAPTER}")
    for n, _ in model.named_parameters():
        if any(f"{m}.modules_to_save.{ADAPTER}." in n for m in spec.modules_to_save):
            names.add(n)
    return names


# ---------------------------------------------------------------------------------------------------- targets
def test_targeted_layers(run):
    """Exactly the expected linear / Conv1D layers are wrapped (for ViT: the default target modules)."""
    layers = run.model.base_model.inflora_layers()
    assert len(layers) == run.spec.n_targeted, sorted(layers)
    for name, layer in layers.items():
        assert name.endswith(run.spec.targeted), name
        assert isinstance(layer.get_base_layer(), (nn.Linear, Conv1D))
    for suffix in run.spec.targeted:
        assert any(name.endswith(suffix) for name in layers), suffix


def test_llama_default_target_modules_are_q_and_v():
    model = get_peft_model(tiny_llama(0), peft_inflora.InfLoRAConfig(r=4))
    layers = model.base_model.inflora_layers()
    assert sorted(layers) == sorted(f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj"))
    assert set(model.peft_config[ADAPTER].target_modules) >= {"q_proj", "v_proj"}


def test_vit_default_target_modules_are_key_and_value():
    model = get_peft_model(tiny_vit(0), peft_inflora.InfLoRAConfig(r=4, modules_to_save=["classifier"]))
    suffixes = {name.rsplit(".", 1)[-1] for name in model.base_model.inflora_layers()}
    assert suffixes in ({"k_proj", "v_proj"}, {"key", "value"})
    assert len(model.base_model.inflora_layers()) == 4


# ---------------------------------------------------------------------------------------------------- (1)
def test_wrapping_and_begin_task_leave_outputs_unchanged(run):
    assert torch.equal(run.out_wrapped, run.out_base)
    assert torch.equal(run.out_begin, run.out_base)


def test_begin_task_creates_zero_A_and_rank_r_design(run):
    layers = run.model.base_model.inflora_layers()
    assert set(run.ranks) == set(layers)
    for name, layer in layers.items():
        r = run.ranks[name]
        assert r == 4
        assert run.begin_A[name].shape == (layer.out_features, r)
        assert run.begin_B[name].shape == (r, layer.in_features)
        assert torch.count_nonzero(run.begin_A[name]) == 0
        # eigen design: orthonormal rows scaled by 1/sqrt(3)
        B = run.begin_B[name].double()
        torch.testing.assert_close(B @ B.T, DESIGN_SCALE**2 * torch.eye(r, dtype=torch.float64), atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------------- (2)
def test_after_begin_task_only_A_and_modules_to_save_require_grad(run):
    expected = expected_trainable_names(run.model, run.spec)
    assert run.trainable == expected
    assert len(expected) == run.spec.n_targeted + 2 * len(run.spec.modules_to_save)  # weight + bias per head


# ---------------------------------------------------------------------------------------------------- (3)
def test_training_changes_loss_and_outputs(run):
    assert run.loss_after < run.loss_before - 1e-3, (run.loss_before, run.loss_after)
    assert (run.out_trained - run.out_begin).abs().max() > 1e-4


def test_training_changes_only_trainable_params(run):
    (params0, buffers0), (params1, buffers1) = run.before_train, run.after_train
    assert params0.keys() == params1.keys()
    assert buffers0.keys() == buffers1.keys()
    frozen = [n for n in params0 if n not in run.trainable]
    assert frozen
    for n in frozen:
        assert torch.equal(params0[n], params1[n]), f"frozen parameter {n} changed"
    for n in buffers0:
        assert torch.equal(buffers0[n], buffers1[n]), f"buffer {n} changed during training"
    for n in run.trainable:
        if ".inflora_A." in n:
            assert not torch.equal(params0[n], params1[n]), f"trainable {n} did not change"
    for m in run.spec.modules_to_save:
        head = [n for n in run.trainable if f"{m}.modules_to_save." in n]
        assert any(not torch.equal(params0[n], params1[n]) for n in head), f"{m} did not train"
        # the original (non-saved) head stays frozen and unchanged
        original = [n for n in params0 if f"{m}.original_module." in n]
        assert original and all(torch.equal(params0[n], params1[n]) for n in original)


def test_base_weights_untouched_after_two_tasks(run):
    """fold="adapter": the wrapped model's base weights equal a fresh copy of the base model bit for bit."""
    fresh = dict(run.spec.make_model(0).named_parameters())
    inner = run.model.base_model.model
    checked = 0
    for n, p in inner.named_parameters():
        if ".inflora_" in n or ".modules_to_save." in n:
            continue
        key = n.replace(".base_layer.", ".").replace(".original_module.", ".")
        assert key in fresh, n
        assert torch.equal(p, fresh[key]), f"base weight {n} changed"
        checked += 1
    assert checked == len(fresh)


# ---------------------------------------------------------------------------------------------------- (4)
def test_end_task_leaves_outputs_unchanged(run):
    torch.testing.assert_close(run.out_end, run.out_trained, atol=1e-5, rtol=1e-5)


def test_end_task_folds_branch_into_past(run):
    state = run.end_state
    assert state["tasks_done"] == 1 and not state["in_progress"]
    for name, layer in run.model.base_model.inflora_layers().items():
        assert state["A_shapes"][name] == (layer.out_features, 0)
        assert state["past_A_shapes"][name] == (layer.out_features, 4)
        assert state["past_B_shapes"][name] == (4, layer.in_features)
        memory = run.memories[name]
        assert memory.d_in == layer.in_features
        assert 1 <= memory.dimension < memory.d_in


# ---------------------------------------------------------------------------------------------------- (5)
def test_second_task_design_is_orthogonal_to_memory(run):
    for name, B in run.designs2.items():
        memory = run.memories[name]
        B = B.double()
        assert B.shape[0] == 4 and B.norm() > 0.5
        # |Q B^T - B^T| small: every row of B_t lies in the free space
        assert (memory.project(B.T) - B.T).norm() <= 1e-5 * B.norm(), name
        # and directly |B M| with M a basis of the protected subspace
        P = memory.projector()
        protected = torch.eye(memory.d_in, dtype=torch.float64) - P
        assert (B @ protected).norm() <= 1e-5 * B.norm(), name
        torch.testing.assert_close(B @ B.T, DESIGN_SCALE**2 * torch.eye(4, dtype=torch.float64), atol=1e-5, rtol=0)


def test_second_begin_task_leaves_outputs_unchanged(run):
    torch.testing.assert_close(run.out_begin2, run.out_end, atol=0, rtol=0)
    torch.testing.assert_close(run.out_begin2_task2_data, run.out_end_task2_data, atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------------- (6)
@pytest.mark.parametrize("state", ["finished", "in_progress"])
def test_save_load_roundtrip_bit_identical(run, state):
    path, batches, expected = run.saved[state]
    fresh = run.spec.make_model(0)
    loaded = PeftModel.from_pretrained(fresh, str(path)).eval()
    assert isinstance(loaded.peft_config[ADAPTER], peft_inflora.InfLoRAConfig)
    out = model_outputs(loaded, batches)
    assert torch.equal(out, expected), (out - expected).abs().max()
    assert loaded.tasks_done() == 1  # task 1 finished; in_progress: task 2 begun and trained
    assert loaded.task_in_progress() == (state == "in_progress")


def test_loaded_in_progress_checkpoint_finishes_like_the_original(run):
    """A checkpoint saved mid-task, loaded trainable and finished with end_task, gives the same model and memory
    as finishing the original."""
    path, batches, _ = run.saved["in_progress"]
    loaded = PeftModel.from_pretrained(run.spec.make_model(0), str(path), is_trainable=True)
    loaded.end_task(batches, progress=False)
    out = model_outputs(loaded, batches)
    torch.testing.assert_close(out, run.after_end2["outputs"], atol=1e-6, rtol=1e-6)
    for name, layer in loaded.base_model.inflora_layers().items():
        torch.testing.assert_close(layer.get_memory(ADAPTER).projector(), run.after_end2["memories"][name],
                                   atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------------- GPT-2
@pytest.mark.parametrize("run", ["gpt2"], indirect=True)
def test_gpt2_conv1d_fan_in_fan_out(run):
    layers = run.model.base_model.inflora_layers()
    for name, layer in layers.items():
        assert isinstance(layer.get_base_layer(), Conv1D)
        assert layer.fan_in_fan_out is True
        assert (layer.in_features, layer.out_features) == (32, 96)
        assert run.designs2[name].shape == (4, 32)
        assert layer.inflora_past_A[ADAPTER].shape == (96, 8)  # two tasks done


@pytest.mark.parametrize("run", ["gpt2"], indirect=True)
def test_gpt2_merge_and_unload_matches_adapter_model(run):
    model = run.merge_copy  # task 1 folded, task 2 trained and in progress
    _, batches, expected = run.saved["in_progress"]
    assert torch.equal(model_outputs(model, batches), expected)
    base_out = model_outputs(run.spec.make_model(0), batches)
    assert (expected - base_out).abs().max() > 1e-4  # the adapter does something
    want = {}
    for name, layer in model.base_model.inflora_layers().items():
        W = layer.get_base_layer().weight.detach().double()  # Conv1D: (in, out)
        delta = (layer.inflora_past_A[ADAPTER].double() @ layer.inflora_past_B[ADAPTER].double()
                 + layer.inflora_A[ADAPTER].detach().double() @ layer.inflora_B[ADAPTER].double())
        want[name] = W + delta.T
    merged = model.merge_and_unload()
    for name, W in want.items():
        module = merged.get_submodule(name)
        assert type(module) is Conv1D
        torch.testing.assert_close(module.weight.double(), W, atol=1e-6, rtol=0)
    torch.testing.assert_close(model_outputs(merged, batches), expected, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------- BERT
@pytest.mark.parametrize("run", ["bert"], indirect=True)
def test_bert_query_and_value_share_design(run):
    for i in range(2):
        q = f"bert.encoder.layer.{i}.attention.self.query"
        v = f"bert.encoder.layer.{i}.attention.self.value"
        assert torch.equal(run.begin_B[q], run.begin_B[v])
        assert torch.equal(run.designs2[q], run.designs2[v])
        torch.testing.assert_close(run.memories[q].projector(), run.memories[v].projector(), atol=0, rtol=0)
    assert not torch.equal(run.begin_B["bert.encoder.layer.0.attention.self.query"],
                           run.begin_B["bert.encoder.layer.1.attention.self.query"])


def _groups_by_name(groups):
    return {frozenset(g.names): g for g in groups}


def test_bert_statistics_groups():
    model = get_peft_model(tiny_bert(0), peft_inflora.InfLoRAConfig(r=4, target_modules=["query", "key", "value"]))
    batches = text_classification_batches(seed=1)
    groups = collect_statistics(model.base_model.model, model.base_model.inflora_layers(), batches, progress=False)
    prefix = "bert.encoder.layer.{}.attention.self."
    assert set(_groups_by_name(groups)) == {
        frozenset(prefix.format(i) + p for p in ("query", "key", "value")) for i in range(2)
    }
    n_tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    for g in groups:
        assert int(g.accumulator.count) == n_tokens


def _token_rows(seed: int, lengths: list[int]):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 100, (n,), generator=g) for n in lengths]


@pytest.mark.parametrize("factory,targets", [
    (tiny_bert, ["query", "value"]),
    (tiny_llama, ["q_proj", "v_proj"]),
])
def test_padding_does_not_change_covariance(factory, targets):
    """One padded batch (extra masked positions holding random token ids) gives the same covariance and token count
    as the same sequences run unpadded, one per batch."""
    model = get_peft_model(factory(0), peft_inflora.InfLoRAConfig(r=4, target_modules=targets))
    lengths = [7, 3, 5, 6]
    rows = _token_rows(7, lengths)
    unpadded = [{"input_ids": row[None], "attention_mask": torch.ones(1, len(row), dtype=torch.long)} for row in rows]
    width = max(lengths) + 4
    g = torch.Generator().manual_seed(8)
    ids = torch.randint(3, 100, (len(rows), width), generator=g)  # random "pad" ids, not the pad token
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = row
        mask[i, : len(row)] = 1
    padded = [{"input_ids": ids, "attention_mask": mask}]
    layers = model.base_model.inflora_layers()
    inner = model.base_model.model
    ref = {frozenset(g.names): g for g in collect_statistics(inner, layers, unpadded, progress=False)}
    got = {frozenset(g.names): g for g in collect_statistics(inner, layers, padded, progress=False)}
    assert set(ref) == set(got) and len(ref) == 2
    for key in ref:
        assert int(got[key].accumulator.count) == sum(lengths)
        assert int(ref[key].accumulator.count) == sum(lengths)
        torch.testing.assert_close(got[key].accumulator.covariance(), ref[key].accumulator.covariance(),
                                   rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------------------- T5
def _t5_kind(name: str) -> str:
    """encoder / decoder_self / cross_q / cross_kv, and which mask its input tokens follow."""
    if name.startswith("encoder."):
        return "encoder"
    if ".EncDecAttention." in name:
        return "cross_q" if name.endswith(".q") else "cross_kv"
    return "decoder_self"


@pytest.mark.parametrize("source_len,target_len", [(9, 6), (6, 6)], ids=["different_lengths", "equal_lengths"])
def test_t5_input_groups_and_token_counts(source_len, target_len):
    model = get_peft_model(tiny_t5(0), peft_inflora.InfLoRAConfig(r=4, target_modules=["q", "k", "v"]))
    inner = model.base_model.model
    layers = model.base_model.inflora_layers()
    assert len(layers) == 3 * 2 + 6 * 2
    batches = seq2seq_batches(seed=3, source_len=source_len, target_len=target_len)
    n_source = sum(int(b["attention_mask"].sum()) for b in batches)
    n_target = sum(int((b["labels"] != -100).sum()) for b in batches)
    assert n_source != n_target

    # reference: every layer's own input, masked with the mask of the sequence it reads
    inputs = {n: [] for n in layers}
    handles = [layer.register_forward_pre_hook(lambda m, a, n=n: inputs[n].append(a[0].detach().clone()))
               for n, layer in layers.items()]
    encoder_outputs = []
    with torch.no_grad():
        for b in batches:
            encoder_outputs.append(inner(**b).encoder_last_hidden_state)
    for h in handles:
        h.remove()

    def masked(tensors, kind):
        rows = []
        for x, b in zip(tensors, batches):
            mask = b["attention_mask"].bool() if kind in ("encoder", "cross_kv") else b["labels"] != -100
            assert x.shape[:2] == mask.shape
            rows.append(x[mask])
        return torch.cat(rows).double()

    groups = collect_statistics(inner, layers, batches, progress=False)
    members = [n for g in groups for n in g.names]
    assert sorted(members) == sorted(layers)  # every layer in exactly one group

    for g in groups:
        kinds = {_t5_kind(n) for n in g.names}
        assert len(kinds) == 1, g.names  # no group mixes encoder / decoder / cross-q / cross-kv inputs
        kind = kinds.pop()
        expected_count = n_source if kind in ("encoder", "cross_kv") else n_target
        assert int(g.accumulator.count) == expected_count, (g.names, kind)
        X = masked(inputs[g.leader], kind)
        torch.testing.assert_close(g.accumulator.covariance(), X.T @ X / X.shape[0], rtol=1e-5, atol=1e-7)
        if kind in ("encoder", "decoder_self"):
            # q, k, v of one self-attention block: one group
            block = {n.rsplit(".", 1)[0] for n in g.names}
            assert len(block) == 1
            assert {n.rsplit(".", 1)[1] for n in g.names} == {"q", "k", "v"}
        if kind == "cross_q":
            assert len(g.names) == 1
        if kind == "cross_kv":
            assert {n.rsplit(".", 1)[1] for n in g.names} == {"k", "v"}
            # they read the encoder's output
            E = masked(encoder_outputs, "encoder")
            torch.testing.assert_close(g.accumulator.covariance(), E.T @ E / E.shape[0], rtol=1e-5, atol=1e-7)
    # k and v of each cross-attention are in one group
    for i in range(2):
        cross = f"decoder.block.{i}.layer.1.EncDecAttention."
        group_of = {n: frozenset(g.names) for g in groups for n in g.names}
        assert group_of[cross + "k"] == group_of[cross + "v"]
        assert group_of[cross + "q"] != group_of[cross + "k"]


def test_t5_default_targets_q_and_v_groups():
    """With the default q / v targets: cross-attention v is grouped apart from decoder q; encoder q and v of a
    block share a design."""
    model = get_peft_model(tiny_t5(0), peft_inflora.InfLoRAConfig(r=4))
    layers = model.base_model.inflora_layers()
    assert {n.rsplit(".", 1)[1] for n in layers} == {"q", "v"}
    assert len(layers) == 2 * 2 + 4 * 2
    batches = seq2seq_batches(seed=5)
    model.begin_task(batches, progress=False)
    B = {n: layer.inflora_B[ADAPTER] for n, layer in layers.items()}
    for i in range(2):
        enc = f"encoder.block.{i}.layer.0.SelfAttention."
        dec = f"decoder.block.{i}.layer.0.SelfAttention."
        cross = f"decoder.block.{i}.layer.1.EncDecAttention."
        assert torch.equal(B[enc + "q"], B[enc + "v"])
        assert torch.equal(B[dec + "q"], B[dec + "v"])
        assert not torch.equal(B[cross + "q"], B[cross + "v"])
