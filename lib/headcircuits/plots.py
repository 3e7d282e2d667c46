"""Figures (seaborn) and attention widgets (circuitsvis) that work offline, in Jupyter and in the built book.

circuitsvis normally imports its JavaScript from a CDN. Here a widget either inlines the JS from the installed
wheel (live Jupyter, ``HEADCIRCUITS_BOOK`` unset), or, while the book is being executed (``HEADCIRCUITS_BOOK=1``),
loads the one copy the book ships in ``_static/vendor/circuitsvis.js`` (a relative URL, so pages work from any
host or from the file system).
"""

from __future__ import annotations

import json
import os
import textwrap
import uuid
from typing import Sequence

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns
from jaxtyping import Float
from torch import Tensor

BOOK_ENV = "HEADCIRCUITS_BOOK"
VENDOR_JS = "_static/vendor/circuitsvis.js"


def set_theme() -> None:
    """The house style of every figure and table in the book: seaborn's colour-blind palette, and tables that
    show each cell's text in full (pandas cuts text at 50 characters by default, which cut the claims and
    verdicts of the reproduction tables; the book's CSS wraps long cells instead)."""
    sns.set_theme(context="notebook", style="whitegrid", palette="colorblind")
    plt.rcParams.update({"figure.dpi": 110, "savefig.dpi": 110, "figure.figsize": (7.0, 4.0)})
    pd.set_option("display.max_colwidth", None)


#: the book's text column at 1280 px (sphinx-book-theme), in CSS pixels: a wider figure is scaled down to it
COLUMN_PX = 736
#: the smallest text a figure may show, in CSS pixels at the size it is displayed (at 1280 px and on a phone)
MIN_TEXT_PX = 9.0
#: the widest a figure may be (pixels at its own dpi): below 700 px the book shows figures at their own size and
#: scrolls them sideways (book/_css), so this is at most three screens of a 390 px phone
MAX_FIGURE_PX = 1100


def text_sizes(fig: plt.Figure) -> tuple[float, list[tuple[str, float, float]]]:
    """The figure's width as saved for the book (pixels: tight bounding box at the figure's dpi, as the inline
    backend saves it) and, for every visible non-empty text, ``(text, px at 1280, px on a phone)``: its size in
    CSS pixels as the book displays it (scaled to :data:`COLUMN_PX` when wider at 1280 px; its own size on a
    phone)."""
    from matplotlib.text import Text

    renderer = fig.canvas.get_renderer()
    width = (fig.get_tightbbox(renderer).width + 2 * plt.rcParams["savefig.pad_inches"]) * fig.dpi
    scale = min(1.0, COLUMN_PX / width)
    sizes = []
    for t in fig.findobj(Text):
        if t.get_visible() and t.get_text().strip() and (t.axes is None or t.axes.get_visible()):
            own = t.get_fontsize() * fig.dpi / 72
            sizes.append((t.get_text(), own * scale, own))
    return width, sizes


def check_readable(fig: plt.Figure) -> plt.Figure:
    """``fig``, if it reads in the book on a desktop and on a phone: at most :data:`MAX_FIGURE_PX` wide, and every
    text at least :data:`MIN_TEXT_PX` at its displayed size; otherwise a ValueError naming the smallest text and
    the fix (fewer panels per row, a narrower figure, a larger font)."""
    width, sizes = text_sizes(fig)
    if width > MAX_FIGURE_PX + 0.5:
        raise ValueError(f"the figure is {width:.0f} px wide (at most {MAX_FIGURE_PX}, three phone screens): put "
                         "fewer panels in a row (col_wrap=, one figure per model) or make it narrower")
    small = [(text, desk, phone) for text, desk, phone in sizes if min(desk, phone) < MIN_TEXT_PX - 1e-6]
    if small:
        text, desk, phone = min(small, key=lambda s: min(s[1], s[2]))
        raise ValueError(
            f"{len(small)} texts of the figure are smaller than {MIN_TEXT_PX:.0f} px as the book shows them, e.g. "
            f"{text[:40]!r}: {desk:.1f} px at 1280 px, {phone:.1f} px on a phone (the figure is {width:.0f} px wide; "
            f"the column {COLUMN_PX}): use a larger font or a narrower figure")
    return fig


def show(fig: plt.Figure | None = None) -> None:
    """Show a figure in the book (``plt.show()``) after :func:`check_readable`: the book's figures go through here,
    so that none is too small to read on a phone (a failing check fails the build)."""
    check_readable(fig if fig is not None else plt.gcf())
    plt.show()


# One colour per model in every chart of the book (seaborn's colour-blind palette, by index).
MODEL_COLOUR_INDEX = {"smollm2-135m": 0, "gemma-3-270m": 1, "gpt2-small": 2, "gpt2-medium": 3, "pythia-160m": 4}


def model_palette(names) -> dict[str, tuple[float, float, float]]:
    """A fixed colour for each model name (the zoo's models always get the same one; other models, e.g. a local
    folder, the next free colours in the order given): pass as ``palette=`` with ``hue="model"``."""
    colours = sns.color_palette("colorblind", 10)
    free = [i for i in range(len(colours)) if i not in MODEL_COLOUR_INDEX.values()]
    out, extra = {}, 0
    for name in names:
        if name in MODEL_COLOUR_INDEX:
            out[name] = colours[MODEL_COLOUR_INDEX[name]]
        else:
            out[name] = colours[free[extra % len(free)]]
            extra += 1
    return out


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


def effect_heatmaps(
    tables: dict[str, Float[Tensor, "layer head"]],
    marked: dict[str, Sequence[tuple[int, int]]] | None = None,
    *,
    title: str = "",
    min_layer: int = 0,
) -> plt.Figure:
    """One diverging heat map per path-patching stage ([layer, head] normalised effects; NaN = not a sender),
    layers from ``min_layer`` up, each stage's selected heads outlined. Positive: patching the head moves the
    model towards its counterfactual behaviour (the head supports the answer); negative: it works against it."""
    names = list(tables)
    ncols = min(2, max(1, len(names)))  # at most two per row: readable at the text column's width and on a phone
    nrows = -(-len(names) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.6 * ncols + 0.6, 5.2 * nrows), squeeze=False)
    for ax in axes.flat[len(names):]:
        ax.set_visible(False)
    for ax, name in zip(axes.flat, names):
        table = tables[name][min_layer:].float()
        finite = table[~table.isnan()]
        bound = float(finite.abs().max()) if finite.numel() else 1.0
        sns.heatmap(table.numpy(), ax=ax, cmap="RdBu_r", center=0.0, vmin=-bound, vmax=bound,
                    cbar_kws={"shrink": 0.7}, yticklabels=[str(l) for l in range(min_layer, tables[name].shape[0])])
        for layer, head in (marked or {}).get(name, []):
            if layer >= min_layer:
                ax.add_patch(plt.Rectangle((head, layer - min_layer), 1, 1, fill=False, lw=1.6, ec="black"))
        ax.set(title=name, xlabel="head", ylabel="layer" if ax in axes[:, 0] else "")
        ax.set_facecolor("#d9d9d9")  # NaN: not a sender in this stage
        ax.grid(False)
        ax.tick_params(axis="y", labelsize=8, rotation=0)
    if title:  # wrapped to the panels' width: a long title would widen the figure, and the book shrinks it
        fig.suptitle(textwrap.fill(title, width=int(11 * fig.get_figwidth())))
    fig.tight_layout()
    return fig


#: one colour per behavioural head class, the same in every figure of the book (colour-blind palette)
CLASS_ORDER: tuple[str, ...] = ("mover", "negative mover", "inhibition", "induction", "duplicate-token",
                                "previous-token", "other")


def class_colours() -> dict[str, tuple[float, float, float]]:
    """The fixed colour of each head class (:data:`CLASS_ORDER`)."""
    return dict(zip(CLASS_ORDER, sns.color_palette("colorblind", len(CLASS_ORDER))))


def circuit_map(
    classes: dict[tuple[int, int], str], n_layers: int, n_heads: int, *, title: str = "",
    reference: dict[tuple[int, int], str] | None = None,
) -> plt.Figure:
    """The circuit's heads on the layer x head grid, coloured by behavioural class, each class in its fixed colour
    (``reference``: a second set drawn as open circles, e.g. the heads another task's circuit uses)."""
    import pandas as pd
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    frame = pd.DataFrame([{"layer": l, "head": h, "class": c} for (l, h), c in sorted(classes.items())])
    if len(frame):
        colours = class_colours()
        present = [c for c in CLASS_ORDER if c in set(frame["class"])] + sorted(set(frame["class"]) - set(CLASS_ORDER))
        sns.scatterplot(data=frame, x="layer", y="head", hue="class", hue_order=present, s=110, ax=ax, zorder=3,
                        palette={c: colours.get(c, (0.5, 0.5, 0.5)) for c in present})
    if reference:
        ax.scatter([l for l, _ in reference], [h for _, h in reference], s=260, facecolors="none",
                   edgecolors="grey", lw=1.2, label="other circuit", zorder=2)
    ax.set(xlim=(-0.5, n_layers - 0.5), ylim=(-0.5, n_heads - 0.5), title=title)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))  # heads and layers are whole numbers
    ax.legend(fontsize=8, bbox_to_anchor=(1.02, 1), loc="upper left")
    fig.tight_layout()
    return fig


def region_map(points: Float[Tensor, "point dim"], labels: Sequence[int], n: int, ax=None, *, title: str = "",
               axis_labels: Sequence[str] = ()):
    """A traversal's regions (Talking Heads Fig. 5, middle): every grid point coloured by the list index the mover
    attends to most; one colour per index (0 = first item) on every map. 3-D grids are drawn as a 3-D scatter, 2-D
    as a scatter, 1-D as a strip. ``ax`` must be a 3-D axis for 3-D points (``projection="3d"``)."""
    import numpy as np

    pts = np.asarray(points, dtype=float)
    lab = np.asarray(labels, dtype=int)
    palette = sns.color_palette("viridis", n)
    colours = [palette[i] for i in lab]
    dim = pts.shape[1]
    if ax is None:
        fig = plt.figure(figsize=(3.2, 3.2))
        ax = fig.add_subplot(projection="3d" if dim == 3 else None)
    if dim == 3:
        ax.scatter(pts[:, 0], pts[:, 1], pts[:, 2], c=colours, s=6, depthshade=False)
    elif dim == 2:
        ax.scatter(pts[:, 0], pts[:, 1], c=colours, s=18, marker="s")
    elif dim == 1:
        ax.scatter(pts[:, 0], np.zeros(len(pts)), c=colours, s=30, marker="s")
        ax.set_yticks([])
    else:
        raise ValueError(f"a region map draws 1 to 3 dimensions, not {dim}")
    from matplotlib.patches import Patch

    ax.legend(handles=[Patch(color=palette[i], label=str(i)) for i in sorted(set(lab.tolist()))], title="index",
              fontsize=7, title_fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    for setter, label in zip((ax.set_xlabel, ax.set_ylabel, getattr(ax, "set_zlabel", None)), axis_labels):
        if setter is not None:
            setter(label, fontsize=7)
    ax.tick_params(labelsize=7)  # at least 9 px in the book (plots.check_readable) at two maps per row
    ax.set_title(title, fontsize=9)
    return ax
