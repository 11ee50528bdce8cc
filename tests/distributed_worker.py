"""Entry point for the multi-process tests: ``torchrun --nproc_per_node 2 distributed_worker.py OUT``.

Every process runs a ContinualTrainer over the same two tasks (DDP over gloo on CPU, each process sees its shard
of every dataloader) and writes the design of task 1 and the final adapter state of its own replica to OUT.
"""

import os
import sys

from safetensors.torch import save_file


sys.path.insert(0, os.path.dirname(__file__))
from continual_fixtures import inflora_bert, tasks, training_args  # noqa: E402

from peft_inflora import ContinualCallback, ContinualTrainer  # noqa: E402


class DumpDesign(ContinualCallback):
    def __init__(self, out: str) -> None:
        self.out = out

    def on_task_begin(self, args, state, control, task, task_index, model=None, **kwargs):
        rank = int(os.environ.get("RANK", "0"))
        designs = {name: layer.inflora_B["default"].detach().cpu().contiguous()
                   for name, layer in model.base_model.inflora_layers().items()}
        save_file(designs, os.path.join(self.out, f"design-task{task_index}-rank{rank}.safetensors"))


def main(out: str) -> None:
    os.makedirs(out, exist_ok=True)
    distributed = {"ddp_backend": "gloo"} if "WORLD_SIZE" in os.environ else {}
    args = training_args(os.path.join(out, "run"), num_train_epochs=1, **distributed)
    model = inflora_bert(statistics_max_tokens=None)  # two shards must sum to the one-process statistics
    trainer = ContinualTrainer(model=model, args=args, callbacks=[DumpDesign(out)])
    trainer.train_continual(tasks((2, 3)))
    rank = int(os.environ.get("RANK", "0"))
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if "inflora" in k}
    save_file(state, os.path.join(out, f"final-rank{rank}.safetensors"))


if __name__ == "__main__":
    main(sys.argv[1])
