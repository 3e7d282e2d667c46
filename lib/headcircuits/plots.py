"""Figures (seaborn) and attention widgets (circuitsvis) that work offline, in Jupyter and in the built book.

circuitsvis normally imports its JavaScript from a CDN. Here a widget either inlines the JS from the installed
wheel (live Jupyter, ``HEADCIRCUITS_BOOK`` unset), or, while the book is being executed (``HEADCIRCUITS_BOOK=1``),
loads the one copy the book ships in ``_static/vendor/circuitsvis.js`` (a relative URL, so pages work from any
host or from the file system).
"""

from __future__ import annotations

import json
import os
import uuid
from typing import Sequence

import matplotlib.pyplot as plt
import seaborn as sns
from jaxtyping import Float
from torch import Tensor

BOOK_ENV = "HEADCIRCUITS_BOOK"
VENDOR_JS = "_static/vendor/circuitsvis.js"


def set_theme() -> None:
    """The house style of every figure in the book."""
    sns.set_theme(context="notebook", style="whitegrid", palette="colorblind")
    plt.rcParams.update({"figure.dpi": 110, "savefig.dpi": 110, "figure.figsize": (7.0, 4.0)})


def _book_mode() -> bool:
    return os.environ.get(BOOK_ENV, "") not in ("", "0")


class Widget:
    """A circuitsvis component with an offline ``_repr_html_``."""

    def __init__(self, component: str, props: dict):
        self.component = component
        self.props = props

    def _repr_html_(self) -> str:
        if not _book_mode():
            from circuitsvis.utils.render import render_local

            return render_local(self.component, **self.props)
        element = "circuits-vis-" + uuid.uuid4().hex[:12]
        props = json.dumps(self.props)
        return f"""<div id="{element}" style="margin: 15px 0;"></div>
<script>
(function () {{
  var root = document.documentElement.dataset.content_root || "";
  window.headcircuitsCircuitsVis = window.headcircuitsCircuitsVis || new Promise(function (resolve, reject) {{
    var script = document.createElement("script");
    script.src = root + "{VENDOR_JS}";
    script.onload = function () {{ resolve(window.CircuitsVis); }};
    script.onerror = reject;
    document.head.appendChild(script);
  }});
  window.headcircuitsCircuitsVis.then(function (cv) {{ cv.render("{element}", cv.{self.component}, {props}); }});
}})();
</script>"""


def attention_patterns(
    str_tokens: Sequence[str],
    patterns: Float[Tensor, "head query key"],
    head_names: Sequence[str],
) -> Widget:
    """circuitsvis' ``AttentionPatterns`` for one prompt: one pattern per head, labelled e.g. ``L9H6``."""
    if patterns.shape[0] != len(head_names):
        raise ValueError(f"{patterns.shape[0]} patterns but {len(head_names)} head names")
    n = len(str_tokens)
    if tuple(patterns.shape[1:]) != (n, n):
        raise ValueError(f"patterns must be [head, {n}, {n}] for {n} tokens, got {tuple(patterns.shape)}")
    return Widget(
        "AttentionPatterns",
        {"tokens": list(str_tokens), "attention": patterns.detach().float().tolist(), "headLabels": list(head_names)},
    )
