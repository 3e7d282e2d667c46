"""Offline widgets, the offline-HTML scan, and the notebooks executed and rendered as a book."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from headcircuits import book, execution, plots, report

ROOT = Path(__file__).resolve().parents[1]


def _widget():
    return plots.attention_patterns([" a", " b"], torch.tensor([[[1.0, 0.0], [0.5, 0.5]]]), ["L0H0"])


def test_widget_in_book_mode_loads_the_vendored_copy(monkeypatch):
    monkeypatch.setenv(plots.BOOK_ENV, "1")
    html = _widget()._repr_html_()
    assert plots.VENDOR_JS in html and "unpkg" not in html and "http" not in html
    assert len(html) < 5_000  # the 1.3 MB bundle is not inlined into every page


def test_widget_in_jupyter_inlines_the_wheels_js(monkeypatch):
    monkeypatch.delenv(plots.BOOK_ENV, raising=False)
    html = _widget()._repr_html_()
    assert "CircuitsVis.render" in html and len(html) > 1_000_000 and "unpkg.com" not in html


def test_widget_checks_shapes():
    with pytest.raises(ValueError, match="head names"):
        plots.attention_patterns([" a", " b"], torch.zeros(2, 2, 2), ["L0H0"])


def test_effect_heatmaps_outline_the_selected_heads_and_grey_out_non_senders():
    import matplotlib.pyplot as plt

    table = torch.tensor([[0.1, -0.3], [float("nan"), 0.5]])
    fig = plots.effect_heatmaps({"movers": table, "inhibition": -table}, {"movers": [(1, 1)], "inhibition": []})
    axes = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in axes] == ["movers", "inhibition"]
    outlined = [p for p in axes[0].patches if isinstance(p, plt.Rectangle) and not p.get_fill()]
    assert [(p.get_x(), p.get_y()) for p in outlined] == [(1, 1)]
    assert not [p for p in axes[1].patches if isinstance(p, plt.Rectangle) and not p.get_fill()]
    plt.close(fig)


def test_circuit_map_draws_every_head_at_its_layer_and_index():
    import matplotlib.pyplot as plt

    classes = {(3, 1): "mover", (2, 0): "inhibition", (0, 2): "previous-token"}
    fig = plots.circuit_map(classes, n_layers=4, n_heads=3, reference={(1, 1): "x"})
    ax = fig.axes[0]
    points = {tuple(map(float, p)) for c in ax.collections for p in c.get_offsets()}
    assert {(3.0, 1.0), (2.0, 0.0), (0.0, 2.0), (1.0, 1.0)} <= points
    plt.close(fig)


def test_a_head_class_has_the_same_colour_in_every_map():
    import matplotlib.pyplot as plt
    from matplotlib.colors import to_rgb

    def colour_of(classes, head):
        fig = plots.circuit_map(classes, n_layers=4, n_heads=3)
        ax = fig.axes[0]
        for c in ax.collections:
            offsets = [tuple(map(float, p)) for p in c.get_offsets()]
            if (float(head[0]), float(head[1])) in offsets:
                colour = to_rgb(c.get_facecolors()[offsets.index((float(head[0]), float(head[1])))][:3])
                plt.close(fig)
                return colour
        raise AssertionError("head not drawn")

    a = colour_of({(3, 1): "inhibition", (2, 0): "mover"}, (3, 1))
    b = colour_of({(1, 1): "induction", (3, 1): "inhibition"}, (3, 1))  # another order of appearance
    assert a == b == tuple(plots.class_colours()["inhibition"])


def test_offline_scan_finds_remote_loads(tmp_path):
    """The scan must be able to fail: plant every kind of network load and expect each to be reported."""
    (tmp_path / "ok.html").write_text(
        '<html><head><script src="_static/x.js"></script><link rel="stylesheet" href="_static/a.css"></head>'
        '<body><a href="https://example.org">a link is not a load</a></body></html>'
    )
    (tmp_path / "bad.html").write_text(
        '<html><head><script src="https://cdn.example/x.js"></script>'
        '<link rel="stylesheet" href="//fonts.example/css"></head><body>'
        '<img src="http://example.org/i.png"><script type="module">import { render } from "https://unpkg.com/x.js";</script>'
        '<div style="background: url(https://example.org/bg.png)"></div></body></html>'
    )
    (tmp_path / "s.css").write_text("@import 'https://fonts.example/f.css'; p { background: url(local.png) }")
    problems = book.scan_offline(tmp_path)
    assert len(problems) == 6, problems
    assert not any(p.startswith("ok.html") for p in problems)


def test_an_unknown_parameter_fails_before_anything_runs_and_lists_the_valid_ones(capsys):
    from headcircuits import cli

    with pytest.raises(execution.ParameterError) as err:
        execution.check_parameters(execution.notebooks_in_toc(ROOT), {"model": "gemma-3-270m"})
    message = str(err.value)
    assert "['model']" in message and "model_names" in message and "n_prompts" in message
    assert cli.main(["build-book", "--root", str(ROOT), "-p", "n_promts=5"]) == 2  # a typo
    err = capsys.readouterr().err
    assert "n_promts" in err and "n_prompts" in err and "Traceback" not in err
    # a parameter that only some notebooks declare reaches only those
    per_notebook = execution.check_parameters(execution.notebooks_in_toc(ROOT), {"n_fix": 4, "seed": 1})
    assert all(p["seed"] == 1 for p in per_notebook.values())
    assert sum("n_fix" in p for p in per_notebook.values()) == 1


def test_parameters_are_key_value_pairs():
    assert execution.parse_parameters(["n_prompts=50", "lengths=[3, 5]", "model_names=gemma-3-270m"]) == {
        "n_prompts": 50, "lengths": [3, 5], "model_names": "gemma-3-270m"}
    for bad in ("n_prompts", "=5", "two words=1"):
        with pytest.raises(execution.ParameterError, match="KEY=VALUE"):
            execution.parse_parameters([bad])


def test_check_offline_on_a_missing_site_fails(tmp_path, capsys):
    from headcircuits import cli

    with pytest.raises(FileNotFoundError, match="make book"):
        book.scan_offline(tmp_path / "nowhere")
    assert cli.main(["check-offline", str(tmp_path / "nowhere")]) == 2
    assert "not a built site" in capsys.readouterr().err


def test_every_notebook_names_its_model_parameter_model_names():
    for path in execution.notebooks_in_toc(ROOT):
        declared = execution.declared_parameters(path)
        assert "model_names" in declared and not {"model", "model_name"} & set(declared), path.name
        assert declared.get("device") == "None", f"{path.name}: a device parameter, CUDA when available by default"


def test_every_notebook_has_a_parameters_cell_and_no_outputs():
    import nbformat

    notebooks = sorted((ROOT / "notebooks").glob("*.ipynb"))
    assert notebooks and set(notebooks) == set(execution.notebooks_in_toc(ROOT))
    for path in notebooks:
        nb = nbformat.read(path, as_version=4)
        tagged = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
        assert len(tagged) == 1, f"{path.name}: needs exactly one cell tagged 'parameters'"
        assert "model_names =" in tagged[0].source, f"{path.name}: no model"
        for name in ("seed", "n_prompts"):
            assert f"{name} =" in tagged[0].source, f"{path.name}: parameters cell lacks {name}"
        assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), f"{path.name} has outputs"


SMALL = {"n_prompts": 12, "seed": 1, "n_eval": 24, "n_paper": 60, "n_controls": 2, "n_inhibition": 24,
         "n_components": 4, "n_alphas": 3, "n_per_length": 6, "lengths": [3, 4, 8], "traverse_lengths": [3, 8],
         "resolution": 3, "n_traverse": 4, "fix_lengths": [3, 8], "n_fix": 8, "n_duplicate": 12}


@pytest.mark.notebooks
@pytest.mark.slow
def test_notebooks_execute_and_the_book_builds_offline(tmp_path):
    """Every notebook runs, the book renders strictly (-W), no page loads from the network, and the pages show what
    the chapters computed. By default every notebook is executed here with small parameters. CI builds the book
    with `make book` first and sets ``HEADCIRCUITS_BUILT_BOOK`` to it: then that build (default parameters) is
    checked, so CI executes each notebook once."""
    built = os.environ.get("HEADCIRCUITS_BUILT_BOOK")
    if built:
        html = Path(built).resolve()
        assert (html / "index.html").is_file(), f"HEADCIRCUITS_BUILT_BOOK={built} is not a built book: run make book"
        used = {}
    else:
        html = book.build(ROOT, tmp_path, SMALL)
        used = SMALL

    def value(notebook: str, name: str):
        if name in used:
            return used[name]
        return json.loads(execution.declared_parameters(ROOT / "notebooks" / f"{notebook}.ipynb")[name])

    assert (html / "book" / "notebooks" / "01_ioi_behaviour.html").is_file()
    assert (html / "_static" / "vendor" / "circuitsvis.js").is_file()
    assert (html / "_static" / "vendor" / "mathjax" / "tex-chtml.js").is_file()
    assert book.scan_offline(html) == []
    page = (html / "book" / "notebooks" / "01_ioi_behaviour.html").read_text()
    assert "circuits-vis-" in page and f"on {value('01_ioi_behaviour', 'n_prompts')} prompts" in page.lower()
    tasks_page = (html / "book" / "notebooks" / "02_tasks_and_baselines.html").read_text()
    assert "gemma-3-270m" in tasks_page and "Laundry List" in tasks_page
    circuit_page = (html / "book" / "notebooks" / "03_ioi_circuit.html").read_text()
    assert f"{value('03_ioi_circuit', 'n_prompts')} ABC prompts" in circuit_page and "circuits-vis-" in circuit_page
    reuse_page = (html / "book" / "notebooks" / "04_circuit_reuse.html").read_text()
    assert "most of the Colored Objects circuit is the IOI circuit" in reuse_page and "layer-matched" in reuse_page
    channels_page = (html / "book" / "notebooks" / "05_inhibition_channels.html").read_text()
    assert "inhibition score" in channels_page and "gemma-3-270m" in channels_page
    list_page = (html / "book" / "notebooks" / "06_laundry_list.html").read_text()
    assert f"{value('06_laundry_list', 'n_per_length')} prompts per N" in list_page
    assert "the oracle fix" in list_page.lower() and "held out" in list_page
    for chapter in execution.notebooks_in_toc(ROOT):  # every cell in full, and no NaN where a word is meant
        shown = (html / "book" / "notebooks" / f"{chapter.stem}.html").read_text()
        assert "...</td>" not in shown and ">NaN<" not in shown, chapter.stem
    own_page = (html / "book" / "notebooks" / "07_your_own_task.html").read_text()
    assert "full names" in own_page and "every effect is exactly 0" in own_page and "VocabularyError" in own_page
    intro = (html / "book" / "intro.html").read_text()
    assert "CC BY 4.0" in intro and "MIT licence" in intro  # the footer states both licences
    for page in ("glossary", "instructors", "running", "execution_report", "references"):
        assert (html / "book" / f"{page}.html").is_file(), page
    for chapter_claim in ("IOI: the model ranks IO above S", "most of the Colored Objects circuit is the IOI circuit",
                          "the IOI circuit has movers", "keeping only the channel components",
                          "setting the subspace to the answer's region"):
        assert chapter_claim in intro, f"scorecard lacks {chapter_claim!r}"  # pasted from the executed chapters
    # the scorecard: every published row of every chapter, each claim once per model, verdicts from the one rule
    executed = [html.parent / "executed" / f"{p.stem}.ipynb" for p in execution.notebooks_in_toc(ROOT)]
    card = report.scorecard(executed)
    assert not card.duplicated(["claim", "model"]).any()
    built_models = set(card.model) - {"gpt2-small (released weights)"}
    for chapter in ("02_tasks_and_baselines", "03_ioi_circuit", "04_circuit_reuse", "05_inhibition_channels",
                    "06_laundry_list"):
        assert set(card[card.chapter == chapter].model) - {"gpt2-small (released weights)"} == built_models, chapter
    assert "Reading the verdicts" in (html / "book" / "verdicts.html").read_text()
    running = _visible((html / "book" / "running.html").read_text())
    assert "{{" not in running and "GB of memory" in running  # this build's measured peak, put in by the build
    # each chapter: a Colab link to its own published notebook, whose install cell names the commit it was built from
    commit, _ = book.source_commit(ROOT)
    for path in execution.notebooks_in_toc(ROOT):
        shown = (html / "book" / "notebooks" / f"{path.stem}.html").read_text()
        assert book.colab_link(ROOT, path.stem) in shown, f"{path.stem}: no Colab link to its notebook"
        published = json.loads((html / "_sources" / "book" / "notebooks" / f"{path.stem}.ipynb").read_text())
        assert "".join(published["cells"][0]["source"]) == "".join(json.loads(path.read_text())["cells"][0]["source"])
        if commit is not None:
            assert book.install_target(published) == commit, path.stem
    for page in html.rglob("*.html"):  # each script once: a repeated `const` declaration is a JavaScript error
        assert page.read_text().count("const THEBE_JS_URL") <= 1, page
    # two editions: the student one without the exercises' solutions, the instructor one with all of them
    instructor = html.parent / "html-instructor"
    assert book.scan_offline(instructor) == []
    import nbformat

    for path in execution.notebooks_in_toc(ROOT):
        name = f"book/notebooks/{path.stem}.html"
        student_page, teacher_page = (html / name).read_text(), (instructor / name).read_text()
        solutions = [c for c in nbformat.read(path, as_version=4).cells if "solution" in c.metadata.get("tags", [])]
        assert solutions, path.name
        for cell in solutions:
            line = max(cell.source.splitlines(), key=len).strip()  # a distinctive line of the solution
            line = line.replace("**Solution.** ", "")[:60]
            assert _visible(line) not in _visible(student_page), f"{path.stem}: the student edition shows {line!r}"
            assert _visible(line) in _visible(teacher_page), f"{path.stem}: the instructor edition lacks {line!r}"
        assert "Instructor edition" in (instructor / "book" / "intro.html").read_text()
        assert "Instructor edition" not in (html / "book" / "intro.html").read_text()


def _visible(page: str) -> str:
    """The text a reader sees (tags and entities gone, spaces collapsed): highlighted code is split into spans."""
    import html as html_lib
    import re

    text = html_lib.unescape(re.sub(r"<[^>]+>", "", page))
    for curly, plain in (("’", "'"), ("‘", "'"), ("“", '"'), ("”", '"')):  # Sphinx's smart quotes
        text = text.replace(curly, plain)
    return re.sub(r"\s+", " ", text.replace("`", "").replace("*", ""))


def test_the_book_environment_silences_progress_bars_even_when_a_caller_asks_for_them(monkeypatch, capsys):
    from headcircuits.progress import tqdm

    monkeypatch.setenv("TQDM_DISABLE", "1")
    assert list(tqdm(range(3), disable=False)) == [0, 1, 2]
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("TQDM_DISABLE", "")
    list(tqdm(range(3), disable=False))
    assert "3/3" in capsys.readouterr().err


def test_region_map_draws_one_colour_per_index_and_names_them():
    import matplotlib.pyplot as plt
    import torch

    from headcircuits import plots

    labels = torch.tensor([0, 0, 2, 2, 1, 2, 0, 1])
    for dim in (1, 2, 3):
        points = torch.randn(8, dim)
        fig = plt.figure()
        ax = fig.add_subplot(projection="3d" if dim == 3 else None)
        plots.region_map(points, labels, 3, ax, title="N = 3")
        assert [t.get_text() for t in ax.get_legend().get_texts()] == ["0", "1", "2"]
        plt.close(fig)
    with pytest.raises(ValueError, match="1 to 3"):
        plots.region_map(torch.randn(8, 4), labels, 3)


def test_papermill_reads_every_parameter_each_notebook_assigns():
    """A parameters-cell line papermill cannot parse (e.g. an '=' inside its comment) silently hides that parameter:
    `-p` would then be refused, and the book would not say which values it ran with."""
    import ast

    import nbformat

    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
        assigned = {t.id for node in ast.parse(cell.source).body if isinstance(node, ast.Assign)
                    for t in node.targets if isinstance(t, ast.Name)}
        assert assigned == set(execution.declared_parameters(path)), f"{path.name}: papermill misses some parameters"


def test_the_house_style_shows_table_cells_in_full():
    import pandas as pd

    with pd.option_context("display.max_colwidth", 50):
        plots.set_theme()
        claim = "forcing inhibition heads and negative movers onto the wrong colours repairs accuracy"
        assert claim in pd.DataFrame({"claim": [claim]})._repr_html_()


def test_each_model_keeps_its_colour_in_every_chart():
    both = plots.model_palette(["smollm2-135m", "gemma-3-270m"])
    alone = plots.model_palette(["gemma-3-270m"])
    papers = plots.model_palette(["gpt2-small", "my-model", "smollm2-135m", "other-model"])
    assert alone["gemma-3-270m"] == both["gemma-3-270m"] != both["smollm2-135m"] == papers["smollm2-135m"]
    assert len(set(papers.values())) == 4  # a local model takes a colour no zoo model uses
    assert papers["my-model"] not in [both["smollm2-135m"], both["gemma-3-270m"], papers["gpt2-small"]]


def test_a_figure_is_readable_as_the_book_shows_it():
    """Text size in CSS pixels at the displayed size: a figure wider than the 736 px column is scaled down to it
    at 1280 px; on a phone it keeps its own size (and scrolls)."""
    import matplotlib.pyplot as plt

    plots.set_theme()  # 110 dpi: a point is 110 / 72 = 1.53 px at the figure's own size
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.plot([0, 1], [0, 1])
    width, sizes = plots.text_sizes(fig)
    assert abs(width - fig.get_tightbbox().width * 110 - 22) < 1  # the tight box and its 0.1-inch pads
    tick = ax.get_xticklabels()[0].get_fontsize() * 110 / 72
    assert width < plots.COLUMN_PX and all(abs(d - p) < 1e-9 for _, d, p in sizes)  # not scaled
    assert min(p for _, _, p in sizes) == pytest.approx(tick)
    assert plots.check_readable(fig) is fig
    ax.set_title("small", fontsize=5)  # 7.6 px at any width
    with pytest.raises(ValueError, match="'small': 7.6 px at 1280 px, 7.6 px on a phone"):
        plots.check_readable(fig)
    plt.close(fig)
    # 8 pt reads at the figure's own size (12.2 px) but not scaled from ~1010 px to the column (8.9 px)
    fig, ax = plt.subplots(figsize=(11, 3))
    ax.set_title("eight points", fontsize=8)
    width, sizes = plots.text_sizes(fig)
    desk, phone = next((d, p) for t, d, p in sizes if t == "eight points")
    assert phone == pytest.approx(8 * 110 / 72) and desk == pytest.approx(phone * plots.COLUMN_PX / width)
    with pytest.raises(ValueError, match="'eight points'"):
        plots.check_readable(fig)
    plt.close(fig)
    fig, axes = plt.subplots(1, 4, figsize=(14, 3))  # four panels in a row: too wide for a phone
    with pytest.raises(ValueError, match="fewer panels in a row"):
        plots.check_readable(fig)
    plt.close(fig)


def test_every_figure_of_the_book_goes_through_the_readability_check():
    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        code = "".join("".join(c["source"]) for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code")
        assert "plt.show(" not in code, f"{path.name}: show figures with plots.show() (it checks they read on a phone)"
        assert "plots.show()" in code or "plt." not in code


@pytest.mark.parametrize("layers, heads", [(30, 9), (18, 4)])  # SmolLM2's and Gemma-3's grids
def test_the_path_patching_maps_read_on_a_phone_with_any_number_of_stages_and_a_long_title(layers, heads):
    import matplotlib.pyplot as plt

    plots.set_theme()
    table = torch.randn(layers, heads)
    for n in range(1, 5):
        tables = {f"stage {i}": table for i in range(n)}
        fig = plots.effect_heatmaps(tables, title="a model: full names, path-patching effect per stage "
                                                  "(selected heads outlined), and a few more words")
        assert plots.check_readable(fig) is fig
        plt.close(fig)
