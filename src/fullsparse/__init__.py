"""fullsparse: fully sparse training with 2:4 structured sparsity on all three GEMMs.

The public face::

    import fullsparse
    cfg = fullsparse.recipe("fst")               # frozen SparsityConfig
    report = fullsparse.sparsify_(model, cfg)    # swap Conv2d/Linear for sparse twins
    print(report)

See ``docs/spec.md`` (the contract) and README.md.
"""

from fullsparse.config import SparsityConfig
from fullsparse.nn import (
    SparseConv2d,
    SparseLinear,
    SparsifyReport,
    count_optimizer_steps,
    densify_,
    end_optimizer_step,
    sparsify_,
)
from fullsparse.recipes import RECIPES, recipe

#: The release, kept equal to ``version`` in pyproject.toml (a test checks it).
__version__ = "0.2.0.dev0"

__all__ = [
    "RECIPES",
    "SparsityConfig",
    "recipe",
    "sparsify_",
    "densify_",
    "count_optimizer_steps",
    "end_optimizer_step",
    "SparsifyReport",
    "SparseConv2d",
    "SparseLinear",
    "__version__",
]
