"""Offline widgets, the offline-HTML scan, and the notebooks executed and rendered as a book."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from headcircuits import book, plots

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


def test_every_notebook_has_a_parameters_cell_and_no_outputs():
    import nbformat

    notebooks = sorted((ROOT / "notebooks").glob("*.ipynb"))
    assert notebooks and set(notebooks) == set(book.notebooks_in_toc(ROOT))
    for path in notebooks:
        nb = nbformat.read(path, as_version=4)
        tagged = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
        assert len(tagged) == 1, f"{path.name}: needs exactly one cell tagged 'parameters'"
        assert "model_name =" in tagged[0].source or "model_names =" in tagged[0].source, f"{path.name}: no model"
        for name in ("seed", "n_prompts"):
            assert f"{name} =" in tagged[0].source, f"{path.name}: parameters cell lacks {name}"
        assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), f"{path.name} has outputs"


@pytest.mark.notebooks
@pytest.mark.slow
def test_notebooks_execute_and_the_book_builds_offline(tmp_path):
    """Every notebook runs with small parameters, the book renders strictly (-W), and no page loads from the net."""
    small = {"n_prompts": 12, "seed": 1, "n_eval": 24, "n_controls": 2, "n_score": 8, "n_fit": 8, "n_per_position": 3,
             "n_fix": 2, "lengths": [2, 3, 5], "n_components": 4}
    html = book.build(ROOT, tmp_path, small)
    assert (html / "book" / "notebooks" / "01_ioi_behaviour.html").is_file()
    assert (html / "_static" / "vendor" / "circuitsvis.js").is_file()
    assert (html / "_static" / "vendor" / "mathjax" / "tex-chtml.js").is_file()
    assert book.scan_offline(html) == []
    page = (html / "book" / "notebooks" / "01_ioi_behaviour.html").read_text()
    assert "circuits-vis-" in page and "on 12 prompts" in page.lower()
    tasks_page = (html / "book" / "notebooks" / "02_tasks_and_baselines.html").read_text()
    assert "gemma-3-270m" in tasks_page and "Laundry List" in tasks_page
    circuit_page = (html / "book" / "notebooks" / "03_ioi_circuit.html").read_text()
    assert "12 ABC prompts" in circuit_page and "circuits-vis-" in circuit_page
    reuse_page = (html / "book" / "notebooks" / "04_circuit_reuse.html").read_text()
    assert "Colored Objects circuit heads are in the IOI circuit" in reuse_page
    channels_page = (html / "book" / "notebooks" / "05_inhibition_channels.html").read_text()
    assert "positional subspace" in channels_page and "gemma-3-270m" in channels_page
    list_page = (html / "book" / "notebooks" / "06_laundry_list.html").read_text()
    assert "3 prompts per cell" in list_page and "held-out accuracy" in list_page.lower()


def test_the_book_environment_silences_progress_bars_even_when_a_caller_asks_for_them(monkeypatch, capsys):
    from headcircuits.progress import tqdm

    monkeypatch.setenv("TQDM_DISABLE", "1")
    assert list(tqdm(range(3), disable=False)) == [0, 1, 2]
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("TQDM_DISABLE", "")
    list(tqdm(range(3), disable=False))
    assert "3/3" in capsys.readouterr().err
