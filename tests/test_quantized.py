"""InfLoRA on bitsandbytes-quantized bases (4-bit ``Linear4bit``, 8-bit ``Linear8bitLt``), on CPU.

A tiny random Llama (hidden 64, 2 layers) is saved once and loaded with ``BitsAndBytesConfig(load_in_4bit=True)`` /
``load_in_8bit=True``. The reference for the math is the same model with every quantized layer replaced by a float
``nn.Linear`` holding the dequantized weight ``Q(W)``: what the quantized model computes, up to the int8 matmul's
rounding.
"""

from __future__ import annotations

import logging
import re
import warnings

import numpy as np
import pytest
import torch
from peft import PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict
from peft.utils.integrations import dequantize_bnb_weight
from safetensors.torch import load_file
from tiny_models import causal_lm_batches, model_outputs, train_steps
from torch import nn

import peft_inflora  # noqa: F401  (registers "inflora")
from peft_inflora import InfLoRAConfig, InfLoRALayer
from peft_inflora.bnb import Linear4bit, Linear8bitLt, QuantizedMergeWarning
from peft_inflora.statistics import collect_statistics


bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install peft-inflora[bnb])")
transformers = pytest.importorskip("transformers")
BitsAndBytesConfig = transformers.BitsAndBytesConfig
LlamaForCausalLM = transformers.LlamaForCausalLM

TARGETS = ["q_proj", "v_proj"]
KINDS = {"4bit": (dict(load_in_4bit=True), Linear4bit), "8bit": (dict(load_in_8bit=True), Linear8bitLt)}


def _8bit_runs_here() -> bool:
    try:
        layer = bnb.nn.Linear8bitLt(8, 8, bias=False, has_fp16_weights=False).to("cpu")
        return layer(torch.randn(2, 8)).shape == (2, 8)
    except Exception:  # noqa: BLE001 - any failure means: not on this machine
        return False


@pytest.fixture(autouse=True)
def quiet_bitsandbytes():
    """bitsandbytes logs a line per int8 matmul on CPU ("inputs will be cast ... to float16")."""
    logger = logging.getLogger("bitsandbytes")
    level = logger.level
    logger.setLevel(logging.ERROR)
    yield
    logger.setLevel(level)


@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory):
    """A tiny random Llama (hidden 64, 2 layers) saved to a folder, as from_pretrained needs it."""
    config = transformers.LlamaConfig(
        vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, attention_dropout=0.0, pad_token_id=0, bos_token_id=1,
        eos_token_id=2, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny_llama")
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


@pytest.fixture(params=list(KINDS))
def kind(request):
    if request.param == "8bit" and not _8bit_runs_here():
        pytest.skip("bitsandbytes' 8-bit Linear8bitLt does not run on this machine's CPU")
    return request.param


def load_quantized(folder, kind: str) -> nn.Module:
    return LlamaForCausalLM.from_pretrained(folder, quantization_config=BitsAndBytesConfig(**KINDS[kind][0])).eval()


def dequantized_copy(folder, quantized: nn.Module) -> nn.Module:
    """The float model with every bitsandbytes layer's weight replaced by its dequantized ``Q(W)``."""
    model = LlamaForCausalLM.from_pretrained(folder).eval()
    modules = dict(model.named_modules())
    for name, module in quantized.named_modules():
        name = name.replace("base_model.model.", "").replace(".base_layer", "")
        if isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)):
            weight = module.weight
            state = weight.quant_state if isinstance(module, bnb.nn.Linear4bit) else module.state
            modules[name].weight.data = dequantize_bnb_weight(weight, state=state).float()
    return model


def inflora(model: nn.Module, **config) -> PeftModel:
    return get_peft_model(model, InfLoRAConfig(task_type="CAUSAL_LM", r=4, target_modules=TARGETS, **config))


def adapter_state(model: PeftModel) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}


def run_task(model: PeftModel, batches, steps: int = 3) -> None:
    model.begin_task(batches, progress=False)
    train_steps(model, batches, steps=steps, lr=1e-2)
    model.end_task(batches, progress=False)


@pytest.fixture
def batches():
    return causal_lm_batches(seed=0, n_batches=2, batch_size=4, seq_len=8)


@pytest.fixture
def next_batches():
    return causal_lm_batches(seed=1, n_batches=2, batch_size=4, seq_len=8)


# ============================================================================================ wrapping and math
def test_targeted_quantized_layers_get_the_quantized_inflora_class(saved_llama, kind, batches):
    base = load_quantized(saved_llama, kind)
    model = inflora(base)
    layers = model.base_model.inflora_layers()
    assert len(layers) == 4
    for layer in layers.values():
        assert type(layer) is KINDS[kind][1]
        assert type(layer.get_base_layer()) is {"4bit": bnb.nn.Linear4bit, "8bit": bnb.nn.Linear8bitLt}[kind]
        assert (layer.in_features, layer.out_features) in {(64, 64), (64, 32)}
    # no task yet: the adapter adds nothing, and the model computes with Q(W)
    outputs = model_outputs(model, batches)
    with model.disable_adapter():
        assert torch.equal(model_outputs(model, batches), outputs)
    reference = model_outputs(dequantized_copy(saved_llama, model), batches)
    assert float((outputs - reference).norm() / reference.norm()) < {"4bit": 1e-5, "8bit": 2e-2}[kind]


def test_layer_output_is_quantized_base_plus_low_rank_terms(saved_llama, kind, batches):
    """``y = Q(W) x + past_A past_B x + A_t B_t x``, against float64 with the dequantized weight."""
    model = inflora(load_quantized(saved_llama, kind), init_weights=False)
    run_task(model, batches, steps=1)
    model.begin_task(batches, progress=False)  # A_t random (init_weights=False)
    layer = model.base_model.inflora_layers()["model.layers.0.self_attn.q_proj"]
    assert layer.inflora_past_A["default"].shape[1] > 0 and layer.inflora_A["default"].abs().sum() > 0
    x = torch.randn(3, 5, 64)
    with torch.no_grad():
        got = layer(x).double()
        base = layer.get_base_layer()(x).double()
    f64 = lambda t: t.detach().double().numpy()  # noqa: E731
    xs = f64(x).reshape(-1, 64)
    low_rank = (xs @ f64(layer.inflora_past_B["default"]).T @ f64(layer.inflora_past_A["default"]).T
                + xs @ f64(layer.inflora_B["default"]).T @ f64(layer.inflora_A["default"]).T)
    np.testing.assert_allclose(f64(got - base).reshape(-1, 64), low_rank, rtol=1e-4, atol=1e-5)
    weight = f64(layer.dequantized_weight())
    tolerance = {"4bit": 1e-4, "8bit": 5e-2}[kind]  # int8 matmul (inputs cast to fp16) vs x Q(W)^T
    error = np.linalg.norm(f64(got).reshape(-1, 64) - (xs @ weight.T + low_rank)) / np.linalg.norm(xs @ weight.T)
    assert error < tolerance


def test_adapter_stays_float32_in_a_bf16_4bit_model(saved_llama, batches):
    base = LlamaForCausalLM.from_pretrained(
        saved_llama, dtype=torch.bfloat16,
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16))
    model = inflora(base)
    model.begin_task(batches, progress=False)
    layer = model.base_model.inflora_layers()["model.layers.1.self_attn.v_proj"]
    assert layer.inflora_A["default"].dtype == torch.float32 and layer.inflora_B["default"].dtype == torch.float32
    assert model(**batches[0]).logits.dtype == torch.bfloat16
    train_steps(model, batches, steps=2, lr=1e-2)
    assert layer.inflora_A["default"].abs().sum() > 0


def test_training_changes_only_the_current_a_t(saved_llama, kind, batches):
    model = inflora(load_quantized(saved_llama, kind))
    run_task(model, batches)
    model.begin_task(batches, progress=False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".inflora_A." in n for n in trainable)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}  # quantized weights and their states too
    train_steps(model, batches, steps=3, lr=1e-2)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {k for k in before if ".inflora_A." in k}


def test_gradients_through_quantized_layers_match_the_dequantized_model(saved_llama, kind, batches):
    """After begin_task's eval-mode passes, the gradient of A_t is the one of the dequantized float model (on CPU,
    bitsandbytes would otherwise repack Linear4bit weights for inference, and backprop through them goes wrong)."""
    quantized = inflora(load_quantized(saved_llama, kind), init_weights=False)
    reference = inflora(dequantized_copy(saved_llama, quantized), init_weights=False)
    grads = []
    for model in (quantized, reference):
        model.begin_task(batches, progress=False)
        for _ in range(2):  # eval forwards without grad, as evaluation between tasks does
            model_outputs(model, batches)
        model.train()
        model(**batches[0]).loss.backward()
        grads.append(torch.cat([p.grad.reshape(-1) for _, p in sorted(model.named_parameters())
                                if p.grad is not None]))
    # same data, same A_t (seeded), the same base up to rounding, so (nearly) the same design
    tolerance = {"4bit": 1e-3, "8bit": 5e-2}[kind]
    assert grads[0].norm() > 0
    assert float((grads[0] - grads[1]).norm() / grads[1].norm()) < tolerance


# ============================================================================================ statistics
def reference_covariances(model: nn.Module, names: list[str], batches) -> dict[str, np.ndarray]:
    """``X^T X / N`` in float64 of each layer's input (non-padding tokens), from hooks on the float model."""
    sums = {n: np.zeros((64, 64)) for n in names}
    counts = dict.fromkeys(names, 0)
    modules = dict(model.named_modules())
    mask = {}

    def hook(name):
        def fn(module, args):
            x = args[0].detach().double().numpy().reshape(-1, 64)[mask["m"]]
            sums[name] += x.T @ x
            counts[name] += x.shape[0]
        return fn

    handles = [modules[n].register_forward_pre_hook(hook(n)) for n in names]
    try:
        with torch.no_grad():
            for batch in batches:
                mask["m"] = batch["attention_mask"].reshape(-1).bool().numpy()
                model(**batch)
    finally:
        for handle in handles:
            handle.remove()
    return {n: sums[n] / counts[n] for n in names}


def test_statistics_read_the_layer_input_as_on_the_dequantized_model(saved_llama, kind, batches):
    model = inflora(load_quantized(saved_llama, kind))
    layers = model.base_model.inflora_layers()
    groups = collect_statistics(model, layers, batches, progress=False)
    reference = reference_covariances(dequantized_copy(saved_llama, model), list(layers), batches)
    assert {n for g in groups for n in g.names} == set(layers)
    tolerance = {"4bit": 1e-5, "8bit": 2e-2}[kind]
    for group in groups:
        got = group.accumulator.covariance().double().numpy()
        for name in group.names:  # q_proj and v_proj of a block read one input: one group
            expected = reference[name]
            assert np.linalg.norm(got - expected) / np.linalg.norm(expected) < tolerance, name
    layer0 = [g for g in groups if g.leader.startswith("model.layers.0.")][0]  # before any quantized layer
    np.testing.assert_allclose(layer0.accumulator.covariance().double().numpy(), reference[layer0.leader],
                               rtol=1e-9, atol=1e-12)


def test_begin_and_end_task_use_those_statistics(saved_llama, kind, batches):
    """The design and the memory built on the quantized model are those of the dequantized model (projectors,
    to the tolerance of the statistics)."""
    quantized = inflora(load_quantized(saved_llama, kind), energy_threshold=0.9)
    reference = inflora(dequantized_copy(saved_llama, quantized), energy_threshold=0.9)
    for model in (quantized, reference):
        model.begin_task(batches, progress=False)
        model.end_task(batches, progress=False)  # A_t = 0: the same inputs as at begin_task
    tolerance = {"4bit": 1e-3, "8bit": 0.2}[kind]
    for name, layer in quantized.base_model.inflora_layers().items():
        other = reference.base_model.inflora_layers()[name]
        for attr in ("inflora_past_B", "inflora_memory"):
            a, b = getattr(layer, attr)["default"].double(), getattr(other, attr)["default"].double()
            assert a.shape == b.shape, (name, attr)
            if attr == "inflora_memory":
                a, b = a.T, b.T
            pa, pb = a.T @ torch.linalg.pinv(a.T), b.T @ torch.linalg.pinv(b.T)  # projectors onto the row spaces
            assert float(torch.linalg.matrix_norm(pa - pb, ord=2)) < tolerance, (name, attr)


# ============================================================================================ saving and continuing
def test_fold_adapter_save_load_is_bit_identical(saved_llama, kind, batches, next_batches, tmp_path):
    model = inflora(load_quantized(saved_llama, kind))
    run_task(model, batches)
    model.begin_task(next_batches, progress=False)
    train_steps(model, next_batches, steps=2, lr=1e-2)  # a task in progress is saved too
    expected_state, expected_outputs = adapter_state(model), model_outputs(model, batches)
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert saved.keys() == expected_state.keys()
    assert all(torch.equal(saved[k], expected_state[k]) for k in saved)
    loaded = PeftModel.from_pretrained(load_quantized(saved_llama, kind), tmp_path)
    assert all(torch.equal(v, expected_state[k]) for k, v in adapter_state(loaded).items())
    assert torch.equal(model_outputs(loaded, batches), expected_outputs)


def test_continuing_a_sequence_after_reload_is_exact(saved_llama, kind, batches, next_batches, tmp_path):
    uninterrupted = inflora(load_quantized(saved_llama, kind))
    run_task(uninterrupted, batches)
    uninterrupted.save_pretrained(tmp_path)
    run_task(uninterrupted, next_batches)

    resumed = PeftModel.from_pretrained(load_quantized(saved_llama, kind), tmp_path, is_trainable=True)
    run_task(resumed, next_batches)
    expected, got = adapter_state(uninterrupted), adapter_state(resumed)
    assert got.keys() == expected.keys()
    assert [k for k in got if not torch.equal(got[k], expected[k])] == []
    assert resumed.base_model.tasks_done() == 2
    assert torch.equal(model_outputs(resumed, batches), model_outputs(uninterrupted, batches))


# ============================================================================================ fold="base" and merging
def test_fold_base_is_refused_before_anything_changes(saved_llama, kind):
    base = load_quantized(saved_llama, kind)
    classes = {n: type(m) for n, m in base.named_modules()}
    flags = {n: p.requires_grad for n, p in base.named_parameters()}
    with pytest.raises(ValueError, match=r"fold='base' is not supported on the (4|8)-bit quantized layer "
                                         r"'model\.layers\.0\.self_attn\.q_proj'.*fold='adapter'"):
        inflora(base, fold="base")
    assert {n: type(m) for n, m in base.named_modules()} == classes
    assert {n: p.requires_grad for n, p in base.named_parameters()} == flags


def test_a_fold_base_adapter_loads_onto_a_quantized_base_as_fold_adapter(saved_llama, kind, batches, tmp_path):
    """The workaround the error message gives: same saved state, read with fold='adapter'."""
    float_model = inflora(LlamaForCausalLM.from_pretrained(saved_llama).eval(), fold="base")
    run_task(float_model, batches)
    float_model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="fold='base' is not supported"):
        PeftModel.from_pretrained(load_quantized(saved_llama, kind), tmp_path)
    config = InfLoRAConfig.from_pretrained(tmp_path)
    config.fold = "adapter"
    loaded = PeftModel.from_pretrained(load_quantized(saved_llama, kind), tmp_path, config=config)
    assert loaded.peft_config["default"].fold == "adapter"
    saved = adapter_state(float_model)
    assert all(torch.equal(v, saved[k]) for k, v in adapter_state(loaded).items())


def quantized_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The bytes that make up every quantized base weight (packed data and quantization state), by state-dict key."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if ".base_layer." in k}


def test_merge_requantizes_reports_the_rounding_error_and_unmerge_restores_exactly(saved_llama, kind, batches,
                                                                                   next_batches):
    model = inflora(load_quantized(saved_llama, kind))
    run_task(model, batches)
    model.begin_task(next_batches, progress=False)
    train_steps(model, next_batches, steps=2, lr=1e-2)
    layers = model.base_model.inflora_layers()
    unmerged_outputs, weights = model_outputs(model, batches), quantized_weights(model)
    before = {n: layer.dequantized_weight().float() for n, layer in layers.items()}
    deltas = {n: (layer.inflora_past_A["default"] @ layer.inflora_past_B["default"]
                  + layer.inflora_A["default"].detach() @ layer.inflora_B["default"]).float()
              for n, layer in layers.items()}

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.merge_adapter()
    reported = [w for w in caught if issubclass(w.category, QuantizedMergeWarning)]
    assert len(reported) == len(layers)
    for name, layer in layers.items():
        # independent computation of ||Q(W + dW) - (Q(W) + dW)|| / ||dW||
        target = before[name] + deltas[name]
        error = float((layer.dequantized_weight().float() - target).norm() / deltas[name].norm())
        assert layer.rounding_errors["default"] == pytest.approx(error, rel=1e-5)
        assert 0 < error < {"4bit": 2.0, "8bit": 0.2}[kind]
        assert f"{error:.3g}" in " ".join(str(w.message) for w in reported)
    merged_outputs = model_outputs(model, batches)
    assert not torch.equal(merged_outputs, unmerged_outputs)
    assert (merged_outputs - unmerged_outputs).abs().max() < {"4bit": 0.5, "8bit": 0.05}[kind]
    with pytest.raises(peft_inflora.TaskLifecycleError, match="unmerge_adapter"):
        model.end_task(next_batches, progress=False)

    model.unmerge_adapter()
    restored = quantized_weights(model)
    assert [k for k in weights if not torch.equal(restored[k], weights[k])] == []
    assert torch.equal(model_outputs(model, batches), unmerged_outputs)
    model.end_task(next_batches, progress=False)  # the sequence goes on after the round trip
    assert model.base_model.tasks_done() == 2


def test_merge_and_unload_gives_the_quantized_base_with_the_merged_weights(saved_llama, kind, batches):
    model = inflora(load_quantized(saved_llama, kind))
    run_task(model, batches)
    with pytest.warns(QuantizedMergeWarning):
        model.merge_adapter()
    merged_outputs = model_outputs(model, batches)
    model.unmerge_adapter()
    with pytest.warns(QuantizedMergeWarning):
        unloaded = model.merge_and_unload()
    assert not any(isinstance(m, InfLoRALayer) for m in unloaded.modules())
    assert isinstance(unloaded.model.layers[0].self_attn.q_proj, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))
    assert torch.equal(model_outputs(unloaded, batches), merged_outputs)


# ============================================================================================ lookalikes
class ScaledLinear(nn.Linear):
    """A user's Linear subclass: same weight, different forward."""

    def forward(self, x):
        return 2 * super().forward(x)


class TwoLayers(nn.Module):
    def __init__(self, second: nn.Module) -> None:
        super().__init__()
        self.first = nn.Linear(16, 16)
        self.second = second

    def forward(self, x):
        return self.second(self.first(x))


@pytest.mark.parametrize("make, class_name", [
    (lambda: ScaledLinear(16, 16), "test_quantized.ScaledLinear"),
    (lambda: bnb.nn.OutlierAwareLinear(16, 16), "bitsandbytes.nn.modules.OutlierAwareLinear"),
    (lambda: torch.nn.modules.linear.NonDynamicallyQuantizableLinear(16, 16),
     "torch.nn.modules.linear.NonDynamicallyQuantizableLinear"),
])
def test_linear_lookalikes_are_refused_naming_module_and_class(make, class_name):
    model = TwoLayers(make())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    short = class_name.rsplit(".", 1)[1]
    with pytest.raises(TypeError, match=rf"module 'second' of type {short} is not supported by InfLoRA: "
                                        r"only torch\.nn\.Linear.* "
                                        rf"{re.escape(class_name)} is a subclass of torch\.nn\.Linear but not"):
        get_peft_model(model, InfLoRAConfig(r=2, target_modules=["first", "second"]))
    assert type(model.first) is nn.Linear  # refused before the first module was replaced
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_8bit_layers_with_16_bit_weights_are_refused():
    layer = bnb.nn.Linear8bitLt(16, 16, bias=False, has_fp16_weights=True)
    with pytest.raises(TypeError, match=r"module 'second' \(bitsandbytes\.nn\.modules\.Linear8bitLt\).*has_fp16"):
        get_peft_model(TwoLayers(layer), InfLoRAConfig(r=2, target_modules=["first", "second"]))


def test_a_linear_sharded_by_fsdp2_counts_as_linear():
    """``fully_shard`` swaps a module's class for ``FSDP<cls>`` (a subclass adding sharding only): still adapted."""
    from torch.distributed.fsdp import FSDPModule

    model = TwoLayers(nn.Linear(16, 16))
    model.second.__class__ = type("FSDPLinear", (FSDPModule, nn.Linear), {})
    peft_model = get_peft_model(model, InfLoRAConfig(r=2, target_modules=["first", "second"]))
    assert set(peft_model.base_model.inflora_layers()) == {"first", "second"}


# ============================================================================================ the trainer
def test_continual_trainer_learns_generation_tasks_on_a_quantized_base(kind, tmp_path):
    """QLoRA-style continual fine-tuning end to end: ContinualTrainer over two instruction tasks on a quantized tiny
    Llama learns each task's answers exactly (greedy generation)."""
    datasets = pytest.importorskip("datasets")
    from continual_fixtures import training_args
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import DataCollatorForSeq2Seq, PreTrainedTokenizerFast

    from peft_inflora import ContinualTask, ContinualTrainer, tokenize_instruction_dataset

    words = "colour of grass sky animal that barks meows ? green blue dog cat".split()
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["[PAD]", "[BOS]", "[EOS]", "[UNK]"] + words)},
                                         unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", bos_token="[BOS]",
                                        eos_token="[EOS]", unk_token="[UNK]")
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "base")
    model = get_peft_model(load_quantized(tmp_path / "base", kind),
                           InfLoRAConfig(r=4, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"]))

    def instructions(pairs):
        return datasets.Dataset.from_dict({"prompt": [p for p, _ in pairs], "answer": [a for _, a in pairs]})

    tasks = [ContinualTask(name, tokenize_instruction_dataset(instructions(pairs * 8), tokenizer), instructions(pairs))
             for name, pairs in (("colours", [("colour of grass ?", "green"), ("colour of sky ?", "blue")]),
                                 ("animals", [("animal that barks ?", "dog"), ("animal that meows ?", "cat")]))]
    args = training_args(tmp_path / "run", num_train_epochs=40, learning_rate=5e-2, per_device_train_batch_size=16,
                         setting="generation", generation_max_new_tokens=3)
    trainer = ContinualTrainer(model=model, args=args, processing_class=tokenizer,
                               data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True))
    result = trainer.train_continual(tasks)
    assert result.accuracy_matrix[0][0] == 1.0 and result.accuracy_matrix[1][1] == 1.0
    assert all(type(m) in (Linear4bit, Linear8bitLt) for m in model.base_model.inflora_layers().values())


def test_the_method_works_without_bitsandbytes(tmp_path):
    """In a process where bitsandbytes cannot be imported, wrapping and a task on a float model still work."""
    import subprocess
    import sys

    script = """
import sys
sys.modules["bitsandbytes"] = None  # import bitsandbytes -> ImportError, as when it is not installed
import torch
from peft import get_peft_model
import peft_inflora
class MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin0, self.lin1 = torch.nn.Linear(8, 8), torch.nn.Linear(8, 2)

    def forward(self, x):
        return self.lin1(torch.tanh(self.lin0(x)))

torch.manual_seed(0)
model = get_peft_model(MLP(), peft_inflora.InfLoRAConfig(r=2, target_modules=["lin0", "lin1"]))
batches = [{"x": torch.randn(16, 8)}]
model.begin_task(batches, progress=False)
model.end_task(batches, progress=False)
assert model.base_model.tasks_done() == 1 and type(model.base_model.model.lin0) is peft_inflora.Linear
assert sys.modules["bitsandbytes"] is None
print("OK")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip().endswith("OK"), done.stderr[-2000:]
