"""Moved to :mod:`peft_inflora.subspace.sketch` (and ``LowRankCovariance`` to :mod:`peft_inflora.subspace.covariance`);
this module keeps the old import path working."""
from .subspace import (  # noqa: F401
    SKETCH_AUTO_SIZE,
    FrequentDirections,
    LowRankCovariance,
    SketchAccumulator,
    SketchWarning,
    sketch_size,
    uses_sketch,
)
