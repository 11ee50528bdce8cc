"""Configuration of InfLoRA adapters: :class:`InfLoRAConfig` and the default target modules per model type."""

from __future__ import annotations

import functools
import math
import numbers
import os
import re
from dataclasses import dataclass, field, fields
from typing import Any, Optional, Union

from peft.config import PeftConfig
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

from . import registry
from .errors import AdapterFileError, UnknownConfigFieldError
from .subspace import sketch_size


registry.ensure_peft_type()  # PeftType.INFLORA exists from here on


# model_type -> default `target_modules` when the config leaves them unset. LoRA's table, except that InfLoRA's paper
# adapts the key and value projections of ViTs. transformers 5.x names them `k_proj` / `v_proj` (older releases:
# `key` / `value`); both are listed, PEFT only needs one name of a list to match.
INFLORA_TARGET_MODULES_MAPPING: dict[str, list[str]] = {
    model_type: list(modules) for model_type, modules in TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.items()
}
INFLORA_TARGET_MODULES_MAPPING.update(
    {
        "vit": ["k_proj", "v_proj", "key", "value"],
        "deit": ["k_proj", "v_proj", "key", "value"],
        "dinov2": ["k_proj", "v_proj", "key", "value"],
        "bert": ["query", "value"],
        "roberta": ["query", "value"],
        "gpt2": ["c_attn"],
        "t5": ["q", "v"],
        "mt5": ["q", "v"],
        "llama": ["q_proj", "v_proj"],
        "mistral": ["q_proj", "v_proj"],
        "qwen2": ["q_proj", "v_proj"],
        "qwen3": ["q_proj", "v_proj"],
    }
)

DESIGNS = ("eigen", "random")
MEMORIES = ("dualgpm", "gpm")
ENERGIES = ("squared", "linear")
FOLDS = ("adapter", "base")
STATISTICS_DTYPES = ("float32", "float64")
SOLVERS = ("auto", "exact", "randomized")


@dataclass
class InfLoRAConfig(PeftConfig):
    """
    Configuration of an [`InfLoRAModel`]: interference-free low-rank adaptation for continual learning.

    Paper: Liang & Li, "InfLoRA: Interference-Free Low-Rank Adaptation for Continual Learning", CVPR 2024,
    https://arxiv.org/abs/2404.00228.

    Task t adds a branch `y = W x + A_t B_t x` to each targeted layer. The design `B_t` (r x in_features, frozen) is
    chosen from the task's input statistics so that its rows are orthogonal to the input subspace of earlier tasks
    (the memory); only `A_t` (out_features x r, zero at the start of the task) is trained. Call `begin_task` before
    and `end_task` after training on each task.

    Args:
        r (`int`, *optional*, defaults to `10`):
            Rank of each task's branch (`B_t` has r rows, `A_t` has r columns). The paper uses 10.
        target_modules (`Optional[Union[list[str], str]]`):
            Names of the modules to adapt, or a regex on the full module names. Linear layers and GPT-2 style
            `Conv1D` are supported. If unset, taken from `INFLORA_TARGET_MODULES_MAPPING` by `model_type`.
        exclude_modules (`Optional[Union[list[str], str]]`):
            Names of modules, or a regex, not to adapt even though `target_modules` matches them.
        fan_in_fan_out (`bool`, *optional*, defaults to `False`):
            Set to True if the layers to replace store their weight as (fan_in, fan_out), like GPT-2's `Conv1D`.
        modules_to_save (`Optional[list[str]]`):
            Modules apart from InfLoRA layers to train fully and save, e.g. a classifier head. They are shared by all
            tasks: they are not protected from forgetting by the memory.
        layers_to_transform (`Optional[Union[list[int], int]]`):
            Indices of the layers to adapt (all if unset). Needs `target_modules` as a list, not a regex.
        layers_pattern (`Optional[Union[list[str], str]]`):
            Name of the `nn.ModuleList` that `layers_to_transform` indexes (often `"layers"` or `"h"`). Only used
            together with `layers_to_transform`.
        rank_pattern (`dict[str, int]`):
            Per-module ranks overriding `r`: keys are module names or regexes (matched like LoRA's `rank_pattern`),
            values positive ints, e.g. `{"^model.decoder.layers.0.encoder_attn.k_proj": 16}`.
        design (`str`, *optional*, defaults to `"eigen"`):
            How `B_t` is built. `"eigen"`: the paper's ViT design, the top-r eigenvectors of the task's input
            covariance projected out of the memory. `"random"`: a random Gaussian matrix projected out of the memory
            (the follow-up work on language models), which needs no eigendecomposition.
        design_scale (`float`, *optional*, defaults to `1/sqrt(3)`):
            Scale applied to the normalised design `B_t`. The default matches the authors' code.
        memory (`str`, *optional*, defaults to `"dualgpm"`):
            How the subspace of past tasks is kept. `"dualgpm"` (the paper): a basis of the memory or of its
            orthogonal complement, whichever is smaller. `"gpm"`: always a basis of the memory.
        energy_threshold (`float`, *optional*, defaults to `0.95`):
            The paper's lambda in (0, 1]: the fraction of a task's input energy that the memory keeps after the task.
            Larger protects old tasks more and leaves less room for new ones.
        energy (`str`, *optional*, defaults to `"squared"`):
            What "energy" measures. `"squared"`: squared singular values of the input covariance, which is what the
            published thresholds were tuned with. `"linear"`: its eigenvalues.
        total_tasks (`Optional[int]`):
            Number of tasks T in the sequence. When set, the threshold grows per task as
            `eps_t = lambda + (1 - lambda) * t / T` (authors' code); when unset it stays `energy_threshold`.
        adaptive_threshold (`bool`, *optional*, defaults to `False`):
            Capacity planning for long sequences (needs `total_tasks`). After task t (0-based) each layer's memory
            may span at most `d_in - r * (T - t - 1)` dimensions, so every remaining task still finds r free
            directions: where the scheduled `eps_t` would need more, the memory keeps only its leading directions up
            to that cap, and the energy they keep is recorded as the task's threshold (`capacity_report()`).
        fold (`str`, *optional*, defaults to `"adapter"`):
            Where a finished task's branch goes at `end_task`. `"adapter"`: folded into frozen factors kept (and
            saved) with the adapter, so the base weights stay untouched and the adapter can be disabled. `"base"`:
            merged into the base weights, which keeps inference cost at zero but changes the base model.
        cache_past_weight (`bool`, *optional*, defaults to `True`):
            With `fold="adapter"`: run the base weight and all finished tasks as one cached weight
            `W + past_A past_B` (not saved), so a training or inference step costs the same after any number of
            tasks. Costs one more `d_out x d_in` weight per adapted layer in memory; set `False` on large models to
            compute the finished tasks from their factors instead (two extra matmuls of rank `sum_j r_j`).
        statistics_max_batches (`Optional[int]`):
            Upper bound on the number of batches read by a statistics pass (`begin_task` / `end_task`). Unset: the
            whole iterable. The authors' language-model code uses about 1000.
        statistics_max_tokens (`Optional[Union[int, str]]`, *optional*, defaults to `"auto"`):
            Token budget of a statistics pass: it stops after the batch that gives every input group at least this
            many non-padding tokens (counted per process). `"auto"`: 16 tokens per input feature (6144 for a width
            of 384, 65536 for 4096), and at most an eighth of the batches (`ceil(n / 8)`, when the batches have a
            length), which keeps both passes of a task under a quarter of a training epoch; the sample then changes
            the design a little (a budget cannot reproduce the full-data design exactly: see benchmarks/RESULTS.md).
            `None`: read every batch (the paper).
            Lists of batches are then read in a seeded random order; other iterables (e.g. a shuffled DataLoader)
            in their own order.
        statistics_dtype (`str`, *optional*, defaults to `"float64"`):
            Precision of the covariance accumulators, whatever the model's dtype: `"float64"` or `"float32"`.
        statistics_sketch (`Optional[Union[int, str]]`):
            Bounded-memory statistics for wide layers. Unset (None): each input group accumulates its exact
            `d_in x d_in` covariance (128 MiB in float64 at d_in = 4096). An int `ell`: groups with
            `d_in > 2 * ell` keep instead a Frequent Directions sketch of their inputs (`2 * ell x d_in` numbers),
            exact products with the memory's stored basis (`e x d_in` more for e stored columns, e <= d_in / 2 with
            DualGPM) and the exact trace; narrower groups stay exact. The design and memory update work from these
            without a `d_in x d_in` matrix; data of rank <= ell gives exactly the design and memory of the exact
            mode, and a `SketchWarning` says when ell is too small for the memory update. `"auto"`: ell = 256
            (16 MiB per group at d_in = 4096). Must be at least `r` (and every `rank_pattern` rank). The
            interference report keeps the exact statistics. Accuracy against the exact mode:
            `peft_inflora.subspace.sketch`.
        share_input_statistics (`bool`, *optional*, defaults to `True`):
            Compute one covariance (and design) for targeted layers that read the same input tensor, e.g. the key and
            value projections of one attention block. Saves memory and time; results are the same.
        solver (`str`, *optional*, defaults to `"auto"`):
            How the leading directions of the design and of the memory update are computed. `"exact"`: dense SVD /
            eigh of the projected covariance, O(d_in^3). `"randomized"`: block subspace iteration for the leading
            directions only, O(d_in^2 r) per iteration (seeded, so every process gets the same result); the memory
            update falls back to a dense eigh when it needs more than 1/16 of the free directions. `"auto"`:
            exact up to 1024 input features, randomized above (at 4096 it is tens of times faster than eigh).
        random_seed (`int`, *optional*, defaults to `0`):
            Seed of the random design (`design="random"`); combined with the task index and layer so each is
            reproducible.
        init_weights (`bool`, *optional*, defaults to `True`):
            True: each task's `A_t` starts at zero, so the model's outputs are unchanged when a task begins (the
            paper). False: small random `A_t`, so that a fresh adapter is not the identity; meant for tests.
    """

    r: int = field(default=10, metadata={"help": "Rank of each task's branch (rows of A_t, columns of B_t)."})
    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={
            "help": (
                "List of module names or a regex of the module names to adapt, e.g. ['k_proj', 'v_proj'] or "
                "'.*attention.*(k_proj|v_proj)$'. Linear and Conv1D layers are supported. If unset, the default of "
                "the model type is used (INFLORA_TARGET_MODULES_MAPPING)."
            )
        },
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={"help": "List of module names or a regex of the module names to exclude from adaptation."},
    )
    fan_in_fan_out: bool = field(
        default=False,
        metadata={"help": "Set to True if the layers to replace store their weight like (fan_in, fan_out)."},
    )
    modules_to_save: Optional[list[str]] = field(
        default=None,
        metadata={
            "help": (
                "Modules apart from InfLoRA layers to set trainable and save, e.g. a classifier head. They are shared "
                "by all tasks and not protected by the memory."
            )
        },
    )
    layers_to_transform: Optional[Union[list[int], int]] = field(
        default=None,
        metadata={
            "help": (
                "Layer indices to adapt; if a single int, only that layer. Needs `target_modules` as a list, not a "
                "regex."
            )
        },
    )
    layers_pattern: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={
            "help": (
                "Name of the nn.ModuleList that `layers_to_transform` indexes, often 'layers' or 'h'. Only used "
                "with `layers_to_transform`."
            )
        },
    )
    rank_pattern: Optional[dict[str, int]] = field(
        default_factory=dict,
        metadata={
            "help": (
                "Per-module ranks overriding `r`: module name or regex -> positive int, e.g. "
                "{'^model.decoder.layers.0.encoder_attn.k_proj': 16}."
            )
        },
    )
    design: str = field(
        default="eigen",
        metadata={
            "help": (
                "How each task's frozen B_t is built: 'eigen' (paper, ViT: top eigenvectors of the input covariance "
                "outside the memory) or 'random' (language-model follow-up: random matrix projected out of the "
                "memory)."
            )
        },
    )
    design_scale: float = field(
        default=1 / math.sqrt(3),
        metadata={"help": "Scale of the normalised design B_t; the default 1/sqrt(3) matches the authors' code."},
    )
    memory: str = field(
        default="dualgpm",
        metadata={
            "help": (
                "How the subspace of past tasks is stored: 'dualgpm' (paper: the memory or its complement, "
                "whichever is smaller) or 'gpm' (always the memory)."
            )
        },
    )
    energy_threshold: float = field(
        default=0.95,
        metadata={
            "help": (
                "lambda in (0, 1]: fraction of a task's input energy the memory keeps. Larger protects old tasks "
                "more and leaves less room to new ones."
            )
        },
    )
    energy: str = field(
        default="squared",
        metadata={
            "help": (
                "'squared': energy = squared singular values of the input covariance (what published thresholds "
                "were tuned with); 'linear': its eigenvalues."
            )
        },
    )
    total_tasks: Optional[int] = field(
        default=None,
        metadata={
            "help": (
                "Number of tasks T. If set, the threshold grows per task: eps_t = lambda + (1 - lambda) * t / T. "
                "If unset it stays energy_threshold."
            )
        },
    )
    adaptive_threshold: bool = field(
        default=False,
        metadata={
            "help": (
                "Needs total_tasks. Cap each layer's memory at d_in - r * (tasks left) dimensions after every task, "
                "lowering that task's energy threshold where needed, so every remaining task gets r free directions."
            )
        },
    )
    fold: str = field(
        default="adapter",
        metadata={
            "help": (
                "Where a finished task's branch goes: 'adapter' (frozen factors saved with the adapter, base weights "
                "untouched) or 'base' (merged into the base weights)."
            )
        },
    )
    cache_past_weight: bool = field(
        default=True,
        metadata={
            "help": (
                "With fold='adapter': run W + past_A past_B as one cached weight (one more weight per adapted layer "
                "in memory, constant step cost); False computes the finished tasks from their factors."
            )
        },
    )
    statistics_max_batches: Optional[int] = field(
        default=None,
        metadata={
            "help": (
                "Maximum number of batches per statistics pass (begin_task / end_task); unset reads everything. "
                "The authors' language-model code uses about 1000."
            )
        },
    )
    statistics_max_tokens: Optional[Union[int, str]] = field(
        default="auto",
        metadata={
            "help": (
                "Token budget per statistics pass: stop once every input group has seen this many non-padding "
                "tokens. 'auto': 16 tokens per input feature and at most an eighth of the batches; None: read every "
                "batch (the paper)."
            )
        },
    )
    statistics_dtype: str = field(
        default="float64",
        metadata={"help": "Precision of the covariance accumulators, any model dtype: 'float64' or 'float32'."},
    )
    statistics_sketch: Optional[Union[int, str]] = field(
        default=None,
        metadata={
            "help": (
                "Bounded-memory statistics: an int ell keeps a Frequent Directions sketch (2 ell x d_in) per input "
                "group wider than 2 ell instead of the d_in x d_in covariance; 'auto': ell = 256; None: exact."
            )
        },
    )
    share_input_statistics: bool = field(
        default=True,
        metadata={
            "help": (
                "Compute one covariance and design for targeted layers that read the same input tensor (e.g. k_proj "
                "and v_proj of one block)."
            )
        },
    )
    solver: str = field(
        default="auto",
        metadata={
            "help": (
                "Solver of the design and memory update: 'exact' (dense SVD / eigh), 'randomized' (block subspace "
                "iteration, leading directions only) or 'auto' (exact up to 1024 input features)."
            )
        },
    )
    random_seed: int = field(default=0, metadata={"help": "Seed of the random design (design='random')."})
    init_weights: bool = field(
        default=True,
        metadata={
            "help": (
                "True: each task's A_t starts at zero so outputs are unchanged when a task begins (paper). False: "
                "small random A_t so a fresh adapter is not the identity; meant for tests."
            )
        },
    )

    def __post_init__(self):
        super().__post_init__()
        if self.peft_type not in (None, registry.PEFT_TYPE_NAME):
            raise ValueError(
                f"peft_type must be {registry.PEFT_TYPE_NAME!r} for InfLoRAConfig, got {self.peft_type!r}: leave it "
                "unset, InfLoRAConfig fills it in."
            )
        self.peft_type = registry.ensure_peft_type()
        self._validate()

    # ------------------------------------------------------------------------------------------------ validation
    def _validate(self) -> None:
        self.r = _positive_int("r", self.r, "use e.g. 10 (paper) or 8")
        self.target_modules = _module_names("target_modules", self.target_modules)
        self.exclude_modules = _module_names("exclude_modules", self.exclude_modules)
        self.fan_in_fan_out = _boolean("fan_in_fan_out", self.fan_in_fan_out)

        if self.modules_to_save is not None:
            if isinstance(self.modules_to_save, str) or not isinstance(self.modules_to_save, (list, tuple, set)):
                raise ValueError(
                    f"modules_to_save must be a list of module names or None, got {self.modules_to_save!r}: "
                    "e.g. ['classifier']."
                )
            _all_strings("modules_to_save", self.modules_to_save)
            self.modules_to_save = list(self.modules_to_save)

        if self.layers_to_transform is not None:
            if isinstance(self.layers_to_transform, (list, tuple)):
                self.layers_to_transform = [
                    _non_negative_int("layers_to_transform", i, "use layer indices like [0, 1, 2]")
                    for i in self.layers_to_transform
                ]
            else:
                self.layers_to_transform = _non_negative_int(
                    "layers_to_transform", self.layers_to_transform, "use a layer index or a list of them"
                )
            if isinstance(self.target_modules, str):
                raise ValueError(
                    f"layers_to_transform={self.layers_to_transform!r} cannot be used with target_modules given as a "
                    f"regex ({self.target_modules!r}): pass target_modules as a list of names, or put the layer "
                    "indices into the regex and drop layers_to_transform."
                )
        if self.layers_pattern is not None:
            if self.layers_to_transform is None:
                raise ValueError(
                    f"layers_pattern={self.layers_pattern!r} is set but layers_to_transform is not: set "
                    "layers_to_transform to the layer indices to adapt, or drop layers_pattern."
                )
            if isinstance(self.layers_pattern, (list, tuple)):
                _all_strings("layers_pattern", self.layers_pattern)
                self.layers_pattern = list(self.layers_pattern)
            elif not isinstance(self.layers_pattern, str) or not self.layers_pattern:
                raise ValueError(
                    f"layers_pattern must be a module-list name like 'layers' or 'h' (or a list of them), got "
                    f"{self.layers_pattern!r}."
                )

        if self.rank_pattern is None:
            self.rank_pattern = {}
        if not isinstance(self.rank_pattern, dict):
            raise ValueError(
                f"rank_pattern must be a dict of module name or regex -> rank, got {self.rank_pattern!r}: e.g. "
                "{'k_proj': 16}."
            )
        for key, value in self.rank_pattern.items():
            if not isinstance(key, str) or not key:
                raise ValueError(f"rank_pattern keys must be non-empty module names or regexes, got {key!r}.")
            _regex("rank_pattern", key)
            self.rank_pattern[key] = _positive_int(f"rank_pattern[{key!r}]", value, "use a rank >= 1")

        self.design = _choice("design", self.design, DESIGNS, "'eigen' for the paper's ViT design")
        self.design_scale = _real("design_scale", self.design_scale)
        if not (math.isfinite(self.design_scale) and self.design_scale > 0):
            raise ValueError(
                f"design_scale must be a finite number > 0, got {self.design_scale!r}: use the default "
                f"1/sqrt(3) = {1 / math.sqrt(3):.6f} (authors' code)."
            )
        self.memory = _choice("memory", self.memory, MEMORIES, "'dualgpm' as in the paper")
        self.energy_threshold = _real("energy_threshold", self.energy_threshold)
        if not (0.0 < self.energy_threshold <= 1.0):  # also False for NaN
            raise ValueError(
                f"energy_threshold must be in (0, 1], got {self.energy_threshold!r}: use e.g. 0.95 (paper's lambda "
                "for ViTs); it is a fraction of energy, not a percentage."
            )
        self.energy = _choice("energy", self.energy, ENERGIES, "'squared', what published thresholds assume")
        if self.total_tasks is not None:
            self.total_tasks = _positive_int(
                "total_tasks", self.total_tasks, "set it to the number of tasks in the sequence, or None"
            )
        self.adaptive_threshold = _boolean("adaptive_threshold", self.adaptive_threshold)
        if self.adaptive_threshold and self.total_tasks is None:
            raise ValueError(
                "adaptive_threshold=True plans each layer's capacity for the tasks still to come, so it needs "
                "total_tasks: set total_tasks to the number of tasks in the sequence, or adaptive_threshold=False."
            )
        self.fold = _choice("fold", self.fold, FOLDS, "'adapter' to keep the base weights untouched")
        self.cache_past_weight = _boolean("cache_past_weight", self.cache_past_weight)
        if self.statistics_max_batches is not None:
            self.statistics_max_batches = _positive_int(
                "statistics_max_batches", self.statistics_max_batches, "use None to read all batches, or e.g. 1000"
            )
        if self.statistics_max_tokens is not None and self.statistics_max_tokens != "auto":
            self.statistics_max_tokens = _positive_int(
                "statistics_max_tokens", self.statistics_max_tokens, "use 'auto', None to read all batches, or e.g. "
                "65536"
            )
        self.statistics_dtype = _choice(
            "statistics_dtype", self.statistics_dtype, STATISTICS_DTYPES, "'float64' unless memory is tight"
        )
        if self.statistics_sketch is not None and self.statistics_sketch != "auto":
            self.statistics_sketch = _positive_int(
                "statistics_sketch", self.statistics_sketch, "use 'auto' (256 rows), an int like 512, or None for the "
                "exact covariance"
            )
        if self.statistics_sketch is not None:
            ell, rank = sketch_size(self.statistics_sketch), max([self.r, *self.rank_pattern.values()])
            if ell < rank:
                raise ValueError(
                    f"statistics_sketch={self.statistics_sketch!r} keeps {ell} directions per input group, fewer than "
                    f"the rank {rank} a task's B_t needs: use statistics_sketch >= {rank} ('auto' = 256 rows, "
                    "ideally several times the rank), or None for the exact covariance."
                )
        self.share_input_statistics = _boolean("share_input_statistics", self.share_input_statistics)
        self.solver = _choice("solver", self.solver, SOLVERS, "'auto' (exact up to 1024 input features)")
        self.random_seed = _non_negative_int("random_seed", self.random_seed, "use e.g. 0")
        if self.random_seed >= 2**63:
            raise ValueError(f"random_seed must be < 2**63, got {self.random_seed!r}: use e.g. 0.")
        self.init_weights = _boolean("init_weights", self.init_weights)

    # ------------------------------------------------------------------------------------------------ loading
    @classmethod
    def check_kwargs(cls, **kwargs):
        """Check the fields read from an ``adapter_config.json`` before the config is built.

        * ``peft_type`` other than ``"INFLORA"``: ``ValueError`` (that file belongs to another method);
        * fields this version does not know (the file was written by a newer peft-inflora):
          :class:`UnknownConfigFieldError` naming them and saying to upgrade peft-inflora.

        Unknown fields are refused, not dropped with a warning as PEFT does for its own configs: a field added by a
        later release may change how the next task's ``B_t`` is designed or how the memory is kept, and continuing a
        task sequence with it silently ignored would protect old tasks less without any visible sign. Whoever is sure
        a field can be ignored may delete it from ``adapter_config.json``.
        """
        kwargs = super().check_kwargs(**kwargs)
        peft_type = kwargs.get("peft_type")
        if peft_type is not None and peft_type != registry.PEFT_TYPE_NAME:
            raise ValueError(
                f"This adapter config has peft_type={peft_type!r}, not {registry.PEFT_TYPE_NAME!r}: it is not an "
                "InfLoRA adapter. Load it with peft.PeftConfig.from_pretrained / peft.PeftModel.from_pretrained."
            )
        _check_known_fields(cls, kwargs)
        return kwargs

    @classmethod
    def from_peft_type(cls, **kwargs):
        """Build an :class:`InfLoRAConfig` from saved fields.

        Unlike ``PeftConfig.from_peft_type`` this does not look the class up in PEFT's registry, so
        ``InfLoRAConfig.from_pretrained`` works before the method is registered with PEFT.
        """
        return cls(**cls.check_kwargs(**kwargs))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: Optional[str] = None, **kwargs):
        """Load the config of a saved adapter, checking the adapter folder before anything else is touched.

        ``PeftModel.from_pretrained`` / ``load_adapter`` read the config through this method *before* they inject
        layers into the base model, so problems found here leave the base model exactly as it was. For a local
        folder the weights file is checked too (see :func:`check_adapter_weights`): a truncated or corrupted
        ``adapter_model.safetensors``, or a folder holding only a pickle ``adapter_model.bin``, raises
        :class:`AdapterFileError` naming the file and what to do. Unknown fields raise
        :class:`UnknownConfigFieldError` (see :meth:`check_kwargs`).
        """
        config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        folder = os.path.join(str(pretrained_model_name_or_path), subfolder) if subfolder else str(
            pretrained_model_name_or_path)
        # not dataclass fields (never saved): load errors name the source, and a load that fails before any weight is
        # set takes the freshly injected adapter out again (InfLoRAModel._remap_adapter_state_dict_for_load)
        config._loaded_from = folder
        config._undo_if_load_fails = True
        if os.path.isdir(folder):
            check_adapter_weights(folder)
        return config


# ---------------------------------------------------------------------------------------------- loading helpers
def _check_known_fields(cls: type, kwargs: dict) -> None:
    known = {f.name for f in fields(cls) if f.init}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        # the wording must not contain "got an unexpected keyword argument": PEFT's PeftConfig.from_peft_type catches
        # TypeErrors with that text and retries without the fields (with a warning to upgrade PEFT, the wrong package)
        raise UnknownConfigFieldError(
            f"{cls.__name__} of peft-inflora {_package_version()} has no field(s) {unknown}. If they come from an "
            "adapter_config.json saved by a newer peft-inflora, upgrade it: pip install -U peft-inflora (they are not "
            "ignored because they may change how later tasks are designed or protected; delete them from "
            "adapter_config.json only if you are sure they do not matter). If they are typos, the known fields are: "
            f"{sorted(known)}."
        )


def _refuse_unknown_fields(init):
    """Wrap the dataclass ``__init__`` so unknown keywords raise :class:`UnknownConfigFieldError` (also when PEFT's
    ``PeftConfig.from_pretrained`` builds the config, which bypasses :meth:`InfLoRAConfig.check_kwargs`)."""

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        _check_known_fields(type(self), kwargs)
        init(self, *args, **kwargs)

    return __init__


InfLoRAConfig.__init__ = _refuse_unknown_fields(InfLoRAConfig.__init__)


def check_adapter_weights(folder: Union[str, os.PathLike]) -> None:
    """Check the weights file of a local adapter folder without loading any tensor (nothing is unpickled).

    * ``adapter_model.safetensors`` present: its header must parse and cover the file (catches truncated and
      corrupted files; NaN / inf values and shapes are checked when the weights are loaded into the model);
    * only ``adapter_model.bin`` present: refused. It is a pickle file, and unpickling can run arbitrary code;
      peft-inflora only loads safetensors;
    * neither: nothing to check here (a config-only folder is fine for reading the config).

    Raises:
        AdapterFileError: naming the file and what to do.
    """
    from peft.utils.constants import SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME

    folder = str(folder)
    safetensors_file = os.path.join(folder, SAFETENSORS_WEIGHTS_NAME)
    pickle_file = os.path.join(folder, WEIGHTS_NAME)
    if os.path.isfile(safetensors_file):
        from safetensors import safe_open

        try:
            with safe_open(safetensors_file, framework="pt") as handle:
                list(handle.keys())
        except Exception as exc:  # SafetensorError, OSError, ...
            raise AdapterFileError(
                f"The adapter weights file {safetensors_file} cannot be read ({type(exc).__name__}: {exc}): it is "
                "truncated or corrupted, e.g. by an interrupted download or copy. Download or copy the adapter again "
                "(for the Hub: delete it from the Hugging Face cache first), or save it again with "
                "model.save_pretrained(folder)."
            ) from exc
    elif os.path.isfile(pickle_file):
        raise AdapterFileError(
            f"{folder} holds the adapter weights only as {WEIGHTS_NAME}, a pickle file, and no "
            f"{SAFETENSORS_WEIGHTS_NAME}: peft-inflora loads adapter weights only from safetensors, because "
            "unpickling a file can run arbitrary code. Save the adapter again with model.save_pretrained(folder) "
            "(safetensors is the default; do not pass safe_serialization=False), or, if you trust the file, "
            f"convert it once: safetensors.torch.save_file(torch.load('{pickle_file}', weights_only=True), "
            f"'{safetensors_file}')."
        )


def _package_version() -> str:
    try:
        from importlib.metadata import PackageNotFoundError, version

        return version("peft-inflora")
    except PackageNotFoundError:
        return "(not installed)"


# ---------------------------------------------------------------------------------------------- validation helpers
def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _positive_int(name: str, value: Any, hint: str) -> int:
    if not _is_int(value) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}: {hint}.")
    return int(value)


def _non_negative_int(name: str, value: Any, hint: str) -> int:
    if not _is_int(value) or value < 0:
        raise ValueError(f"{name} must be an int >= 0, got {value!r}: {hint}.")
    return int(value)


def _real(name: str, value: Any) -> float:
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise ValueError(f"{name} must be a number, got {value!r} of type {type(value).__name__}.")
    return float(value)


def _boolean(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r} of type {type(value).__name__}.")
    return value


def _choice(name: str, value: Any, choices: tuple[str, ...], hint: str) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}: use {hint}.")
    return value


def _regex(name: str, pattern: str) -> None:
    try:
        re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"{name}: {pattern!r} is not a valid regular expression ({exc}); fix or escape it.") from exc


def _all_strings(name: str, values) -> None:
    bad = [value for value in values if not isinstance(value, str) or not value]
    if bad:
        raise ValueError(f"{name} must contain only non-empty module names, got {bad!r} in {values!r}.")


def _module_names(name: str, value: Any) -> Optional[Union[set[str], str]]:
    """``None``, a regex string, or a set of names (lists are turned into sets, as PEFT's configs do)."""
    if value is None:
        return None
    if isinstance(value, str):
        if not value:
            raise ValueError(f"{name} must not be an empty string: give module names like ['k_proj'] or a regex.")
        _regex(name, value)
        return value
    if isinstance(value, (list, tuple, set, frozenset)):
        _all_strings(name, value)
        return set(value)
    raise ValueError(
        f"{name} must be a list of module names or a regex string, got {value!r} of type {type(value).__name__}: "
        "e.g. ['k_proj', 'v_proj']."
    )


__all__ = [
    "INFLORA_TARGET_MODULES_MAPPING",
    "AdapterFileError",
    "InfLoRAConfig",
    "UnknownConfigFieldError",
    "check_adapter_weights",
]
