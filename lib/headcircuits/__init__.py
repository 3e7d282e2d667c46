"""headcircuits: a companion library to Merullo, Eickhoff & Pavlick's

* "Circuit Component Reuse Across Tasks in Transformer Language Models" (ICLR 2024), and
* "Talking Heads: Understanding Inter-layer Communication in Transformer Language Models" (NeurIPS 2024).

Modules named after what the papers do, over a neutral core (an import only goes downwards):

* core: ``models`` (the zoo; ``models.architecture``: every per-family difference and the hook names), ``tasks``,
  ``passes`` / ``store`` (the clean passes the engine starts from, kept), ``edits`` (the one edit protocol),
  ``engine`` (the one way the model runs), ``scoring`` (logit differences, accuracy, attention), ``cache``
  (results on disk);
* Circuit Component Reuse: ``path_patching`` (the papers' loop and the fast path), ``circuits`` (discovery,
  overlap), ``head_classes`` (what each head does, the IOI roles), ``repair`` (its section 5);
* Talking Heads: ``weights`` (the heads' factored OV and QK, their SVD), ``composition`` (composition scores),
  ``channels``, ``inhibition`` (the score and the weight edit), ``traversal`` (the grid, its regions and the oracle
  fix);
* the book: ``stats``, ``report``, ``plots``, ``exercises``, ``execution``, ``book``, ``cli``, ``standalone``,
  ``progress``.
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
