"""The paper's measurements as tools (``fullsparse analyze ...``, ``fullsparse study``).

- :mod:`~fullsparse.analysis.similarity` — spatial entropy H(X), H(X|X') of conv inputs
  (paper §6.1, Fig. 4).
- :mod:`~fullsparse.analysis.neighbors` — adjacent-difference and reconstruction maps
  (§6.2, Fig. 5).
- :mod:`~fullsparse.analysis.fidelity` — per-layer cosine / relative error of each recipe's
  grad_input and grad_weight against the exact gradient, local and accumulated.
- :mod:`~fullsparse.analysis.overhead` — time of S(W), S(Wᵀ), the IR shift and sorting-based
  activation masks per training iteration (Tables 2 and 6).
- :mod:`~fullsparse.analysis.study` — a resumable grid of training runs and its table.
- :mod:`~fullsparse.analysis.plots` — the figures (needs the ``plot`` extra).

Submodules are imported on use; importing this package needs only torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "layer_similarity": "similarity",
    "spatial_entropy": "similarity",
    "quantize": "similarity",
    "format_similarity": "similarity",
    "SimilarityResult": "similarity",
    "neighbor_maps": "neighbors",
    "reconstruction_errors": "neighbors",
    "adjacent_difference": "neighbors",
    "pair_reconstruction": "neighbors",
    "grad_fidelity": "fidelity",
    "format_fidelity": "fidelity",
    "FidelityResult": "fidelity",
    "measure_overhead": "overhead",
    "format_overhead": "overhead",
    "OverheadResult": "overhead",
    "StudySpec": "study",
    "load_study_spec": "study",
    "plan_study": "study",
    "run_study": "study",
    "study_table": "study",
    "load_inputs": "inputs",
    "white_noise": "inputs",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'fullsparse.analysis' has no attribute {name!r}")
    return getattr(importlib.import_module(f"fullsparse.analysis.{module}"), name)
