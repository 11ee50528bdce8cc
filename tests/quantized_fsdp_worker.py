"""Entry point of the 4-bit + FSDP2 test: ``torchrun --nproc_per_node 2 quantized_fsdp_worker.py LLAMA OUT``.

A tiny Llama saved in ``LLAMA`` is loaded with ``BitsAndBytesConfig(load_in_4bit=True)`` on each process, wrapped
with InfLoRA, and sharded by ``peft_inflora.continual.sharding.shard_with_plugin`` with Accelerate's FSDP2 plugin
(the decoder layers from ``_no_split_modules``, then the root). One task: ``begin_task``, three steps with the
gradients of the replicated ``A_t`` averaged (what the trainer does), ``end_task``. Per process ``r`` writes to OUT:
``record-rank{r}.json`` (what stayed whole, the logits' change through the sharding) and ``adapter-rank{r}``
(every InfLoRA tensor after the task).
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist
from accelerate.utils import FullyShardedDataParallelPlugin
from peft import get_peft_model
from safetensors.torch import save_file
from transformers import BitsAndBytesConfig, LlamaForCausalLM

from peft_inflora import InfLoRAConfig
from peft_inflora.continual.sharding import shard_with_plugin
from peft_inflora.distributed import adapter_parameters, all_reduce_gradients


def main(folder: str, out: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = LlamaForCausalLM.from_pretrained(folder, quantization_config=BitsAndBytesConfig(load_in_4bit=True))
    peft_model = get_peft_model(model, InfLoRAConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj", "v_proj"]))
    g = torch.Generator().manual_seed(1 + rank)  # each process: its shard of the task's data
    batches = [dict(input_ids=torch.randint(3, 100, (4, 16), generator=g)) for _ in range(3)]
    peft_model.eval()
    with torch.no_grad():
        before = peft_model(**batches[0]).logits
    shard_with_plugin(peft_model, FullyShardedDataParallelPlugin(fsdp_version=2,
                                                                 auto_wrap_policy="transformer_based_wrap"),
                      torch.device("cpu"))
    with torch.no_grad():
        after = peft_model(**batches[0]).logits
    q_proj = peft_model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    record = {"logits_change": (after - before).abs().max().item(),
              "four_bit_weight": type(q_proj.weight).__name__,
              "units": sorted(n for n, m in peft_model.named_modules() if type(m).__name__.startswith("FSDP"))}
    peft_model.train()
    peft_model.begin_task(batches)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    for batch in batches:
        peft_model(**batch, labels=batch["input_ids"]).loss.backward()
        all_reduce_gradients(adapter_parameters(peft_model))
        optimizer.step()
        optimizer.zero_grad()
    peft_model.end_task(batches)
    record["tasks_done"] = peft_model.tasks_done()
    with open(os.path.join(out, f"record-rank{rank}.json"), "w") as f:
        json.dump(record, f)
    state = {k: v.detach().contiguous() for k, v in peft_model.state_dict().items() if "inflora" in k}
    save_file(state, os.path.join(out, f"adapter-rank{rank}.safetensors"))
    dist.barrier()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
