"""Configuration of InfLoRA adapters: :class:`InfLoRAConfig` (default target modules per model type: constants.py)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Optional, Union

from peft.config import PeftConfig

from . import registry
from .constants import INFLORA_TARGET_MODULES_MAPPING
from .errors import AdapterFileError, UnknownConfigFieldError  # noqa: F401  (importable from here, as before)
from .loading import check_adapter_weights
from .validation import (  # noqa: F401  (the choice lists stay importable from here)
    DESIGNS,
    ENERGIES,
    FOLDS,
    MEMORIES,
    SOLVERS,
    STATISTICS_DTYPES,
    _check_known_fields,
    _refuse_unknown_fields,
    validate_fields,
)


registry.ensure_peft_type()  # PeftType.INFLORA exists from here on


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
        memory_storage_dtype (`str`, *optional*, defaults to `"float32"`):
            Precision of the memory basis in the saved adapter: `"float32"` (exact), `"bfloat16"` or `"float16"`
            (half the memory's bytes). A 16-bit basis is re-orthonormalised on load (QR in float64, then float32);
            the loaded subspace then differs from the saved one by at most `peft_inflora.storage.
            subspace_error_bound` (about `2^-8 sqrt(k)` for bf16 and k stored columns), which is also the most the
            leakage of the next task's design into old inputs can grow. The model's outputs are unaffected; the
            model in memory keeps its float32 basis until it is reloaded. See docs/adapter-size.md.
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
    memory_storage_dtype: str = field(
        default="float32",
        metadata={
            "help": (
                "Precision the memory basis is saved in: 'float32' (exact), 'bfloat16' or 'float16' (half the bytes; "
                "re-orthonormalised on load, the next designs may then leak slightly into old inputs)."
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
        if self.peft_type not in (None, registry.PEFT_TYPE_NAME):
            raise ValueError(
                f"peft_type must be {registry.PEFT_TYPE_NAME!r} for InfLoRAConfig, got {self.peft_type!r}: leave it "
                "unset, InfLoRAConfig fills it in."
            )
        self._validate()  # before PEFT's own checks (>= 0.22 checks layers_to_transform too, saying less)
        super().__post_init__()
        self.peft_type = registry.ensure_peft_type()

    # ------------------------------------------------------------------------------------------------ validation
    def _validate(self) -> None:
        validate_fields(self)  # the rules: peft_inflora.validation

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


InfLoRAConfig.__init__ = _refuse_unknown_fields(InfLoRAConfig.__init__)


__all__ = [
    "INFLORA_TARGET_MODULES_MAPPING",
    "AdapterFileError",
    "InfLoRAConfig",
    "UnknownConfigFieldError",
    "check_adapter_weights",
]
