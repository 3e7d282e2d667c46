"""headcircuits: a companion library to Merullo, Eickhoff & Pavlick's

* "Circuit Component Reuse Across Tasks in Transformer Language Models" (ICLR 2024), and
* "Talking Heads: Understanding Inter-layer Communication in Transformer Language Models" (NeurIPS 2024).

Layers (an import only goes downwards): ``models`` and ``tasks`` -> ``metrics`` -> ``patching`` / ``svd`` ->
``circuits`` / ``interventions`` -> ``plots`` / ``book`` / ``cli``.
"""

import warnings

# tqdm.auto (imported by transformers) warns once in notebooks without ipywidgets, then falls back to text bars.
# The book deliberately has no ipywidgets (their outputs would load require.js from a CDN), so this is expected.
warnings.filterwarnings("ignore", message="IProgress not found", module="tqdm.auto")

from headcircuits.errors import (  # noqa: E402
    HeadcircuitsError,
    HubUnreachableError,
    ModelCacheError,
    ModelUnavailableError,
    UnknownModelError,
    VocabularyError,
)

__version__ = "0.1.0"

__all__ = [
    "HeadcircuitsError",
    "HubUnreachableError",
    "ModelCacheError",
    "ModelUnavailableError",
    "UnknownModelError",
    "VocabularyError",
    "__version__",
]
