"""Build the book: execute every notebook once with papermill, then render them with Jupyter Book 1 (execution
off, strict: ``-W -n --keep-going``, so a warning fails the build), offline.

The sources are staged into ``<out>/_build/source`` (``_config.yml``, ``book/`` pages, executed notebooks, vendored
JavaScript) so Sphinx never walks the repository (or its ``.venv``). The rendered site is ``<out>/_build/html``.

Offline pages: MathJax 3 (from the ``django-static-mathjax`` wheel) and circuitsvis' bundle (from its wheel)
are copied once into ``_static/vendor`` (staged as ``_vendor/vendor``, listed in ``html_static_path``, so Jupyter
Book does not inject every script into every page); nothing is fetched from a CDN.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterable

from headcircuits import report
from headcircuits.errors import NotebookError
from headcircuits.execution import (_minutes, execute_notebooks, execution_report, measured_page,
                                    notebooks_in_toc, records_for)

MATHJAX_PARTS = ("tex-chtml.js", "output/chtml/fonts/woff-v2", "input/tex/extensions", "a11y", "ui", "adaptors")


def _package_path(module: str) -> Path:
    import importlib.util

    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"{module} is not installed; run `make book` (it installs requirements.lock)")
    return Path(list(spec.submodule_search_locations)[0])


def vendor_assets(static_dir: Path) -> None:
    """Copy the one shared copy of circuitsvis' and MathJax's JavaScript into ``static_dir/vendor``."""
    vendor = static_dir / "vendor"
    vendor.mkdir(parents=True, exist_ok=True)
    shutil.copy2(_package_path("circuitsvis") / "dist" / "cdn" / "iife.js", vendor / "circuitsvis.js")
    mathjax_src = _package_path("mathjax") / "static" / "mathjax" / "es5"
    for part in MATHJAX_PARTS:
        src, dst = mathjax_src / part, vendor / "mathjax" / part
        if src.is_dir():
            shutil.copytree(src, dst, dirs_exist_ok=True)
        else:
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
    for licence in ("LICENSE",):
        shutil.copy2(mathjax_src.parent / licence, vendor / "mathjax" / licence)


def _runtime_cell(record: dict, launch: str | None = None, built_from: str = "") -> dict:
    """A Markdown cell put under a chapter's title in the book (and in the notebook a reader downloads from it):
    how long it took when the book was built, on what, from which commit, and a link that opens this chapter's
    notebook in Colab (a plain link: the page loads nothing from it)."""
    hw = record["hardware"]
    where = f"{hw['cores']} cores of {hw['cpu']}" + (f" and an {hw['gpu']}" if hw.get("gpu", "none") != "none" else "")
    colab = (f"\n\n[Open this chapter in Colab]({launch}) (the notebook of this page, as built; choose a CPU or GPU "
             "runtime, then run all: its first cell installs the same commit and the pinned versions)." if launch else "")
    text = (f"```{{admonition}} Running time\n:class: note\nWhen this book was built{built_from}, this chapter took "
            f"**{_minutes(record['seconds'])}** on {where} (peak memory {record['peak_rss_mib'] / 1024:.1f} GiB), "
            f"with the parameters of the [execution report](../execution_report.md). The first cell installs what a "
            f"notebook run on its own needs; [Running it yourself](../running.md) says what a laptop, Colab or a lab "
            f"GPU costs.{colab}\n```")
    return {"cell_type": "markdown", "id": "runtime", "metadata": {}, "source": text}


def source_commit(root: Path) -> tuple[str | None, bool]:
    """The commit the book is built from (``git rev-parse HEAD``) and whether the working tree has uncommitted
    changes to tracked files; ``(None, False)`` outside a git checkout."""
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
        status = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None, False
    return commit, bool(status.strip())


INSTALL_TARGET = re.compile(r'^(HEADCIRCUITS = "git\+[^@"]+@)([^"]+)(")$', re.M)


def install_target(notebook: dict) -> str:
    """The git reference the notebook's install cell installs (``HEADCIRCUITS = "git+URL@REF"``)."""
    for cell in notebook["cells"]:
        source = cell["source"] if isinstance(cell["source"], str) else "".join(cell["source"])
        if cell["cell_type"] == "code" and (match := INSTALL_TARGET.search(source)):
            return match.group(2)
    raise NotebookError("the notebook has no install cell (HEADCIRCUITS = \"git+URL@REF\"): "
                        "start it with headcircuits.standalone.INSTALL_CELL")


def pin_install(notebook: dict, commit: str) -> dict:
    """The notebook with its install cell pinned to ``commit``: a chapter downloaded from the book, or opened in
    Colab from it, installs exactly the library the book was built from."""
    install_target(notebook)  # raises without an install cell
    cells, done = [], False
    for cell in notebook["cells"]:
        source = cell["source"] if isinstance(cell["source"], str) else "".join(cell["source"])
        if not done and cell["cell_type"] == "code" and INSTALL_TARGET.search(source):
            cell, done = {**cell, "source": INSTALL_TARGET.sub(rf"\g<1>{commit}\g<3>", source, count=1)}, True
        cells.append(cell)
    return {**notebook, "cells": cells}


PUBLISHED_BRANCH = "gh-pages"  # .github/workflows/book.yml publishes _build/html there


def colab_link(root: Path, stem: str) -> str | None:
    """Colab's address for a chapter's notebook as the published book holds it (the download copy under
    ``_sources/`` on the ``gh-pages`` branch, same deploy as the page: pinned install cell, outputs included);
    None without a GitHub repository in ``_config.yml``."""
    import yaml

    config = yaml.safe_load((root / "_config.yml").read_text())
    url = (config.get("repository") or {}).get("url", "")
    match = re.fullmatch(r"https://github\.com/([^/]+)/([^/]+?)/?", url)
    if not match:
        return None
    owner, repo = match.groups()
    return (f"https://colab.research.google.com/github/{owner}/{repo}/blob/{PUBLISHED_BRANCH}/"
            f"_sources/book/notebooks/{stem}.ipynb")


EDITIONS = ("student", "instructor")
STUDENT_NOTE = ("*Your answer goes here: this is the student edition, whose solutions are left out. Run the checker "
                "cell below to test your function.*")


def edition(notebook: dict, which: str) -> dict:
    """A notebook as one edition of the book shows it. Exercise solutions are cells tagged ``solution``; a
    checker's cell is tagged ``check``.

    * ``student``: a code solution becomes its stub (cell metadata ``headcircuits.stub``, else a comment), without
      outputs; a Markdown solution is left out; checker cells lose their outputs (they were computed with the
      solution).
    * ``instructor``: everything as executed, solutions and checks included.
    """
    if which not in EDITIONS:
        raise ValueError(f"edition must be one of {EDITIONS}, not {which!r}")
    if which == "instructor":
        return notebook
    cells = []
    for cell in notebook["cells"]:
        tags = cell.get("metadata", {}).get("tags", [])
        if "solution" in tags:
            if cell["cell_type"] != "code":
                continue
            stub = cell["metadata"].get("headcircuits", {}).get("stub", "# your code here")
            meta = {k: v for k, v in cell["metadata"].items() if k not in ("headcircuits", "papermill", "execution")}
            meta["tags"] = [t for t in tags if t != "solution"]
            cell = {**cell, "source": stub, "outputs": [], "execution_count": None, "metadata": meta}
        elif "check" in tags and cell["cell_type"] == "code":
            cell = {**cell, "outputs": [], "execution_count": None}
        cells.append(cell)
    return {**notebook, "cells": cells}


FOLD_LINES = 12  # code cells longer than this are folded in the book (their outputs stay visible)


def fold_long_cells(notebook: dict, lines: int = FOLD_LINES) -> dict:
    """Long implementation cells folded away in the book (tag ``hide-input``: a reader opens them with one click;
    their figures and tables stay in view), so the science reads first. The ``parameters`` cell, exercise cells
    and cells tagged ``show-input`` stay open."""
    keep_open = {"parameters", "solution", "check", "show-input", "hide-input", "remove-input"}
    cells = []
    for cell in notebook["cells"]:
        source = cell["source"] if isinstance(cell["source"], str) else "".join(cell["source"])
        tags = cell.get("metadata", {}).get("tags", [])
        if cell["cell_type"] == "code" and len(source.splitlines()) > lines and not keep_open & set(tags):
            cell = {**cell, "metadata": {**cell.get("metadata", {}), "tags": [*tags, "hide-input"]}}
        cells.append(cell)
    return {**notebook, "cells": cells}


INSTRUCTOR_BANNER = ("```{admonition} Instructor edition\n:class: warning\nThis edition shows the exercises' "
                     "solutions and the checkers' outputs. Give students the student edition.\n```\n\n")


def stage_sources(root: Path, executed: Iterable[Path], stage: Path, which: str = "student",
                  run: dict | None = None) -> None:
    """Lay out what Sphinx reads for one edition (see :func:`edition`): config, pages, executed notebooks,
    vendored JS. ``run``: a ``headcircuits reproduce`` scorecard (:func:`headcircuits.scorecard.load`) whose
    verdicts become a column of the book's scorecard."""
    executed = list(executed)
    if stage.exists():
        shutil.rmtree(stage)
    shutil.copytree(root / "book", stage / "book", ignore=shutil.ignore_patterns("notebooks", "_build", "_css"))
    shutil.copy2(root / "_config.yml", stage / "_config.yml")
    intro = stage / "book" / "intro.md"
    if run is not None:
        from headcircuits import scorecard

        text = scorecard.with_run(intro.read_text(), {nb.stem: nb for nb in executed}, run)
        note = (f"The last two columns come from a run of `headcircuits reproduce` ({scorecard.label(run['provenance'])}; "
                f"{scorecard.duration(run['provenance'])}): the same chapters and verdict rule at the "
                "sizes of {ref}`Running it yourself <at-the-papers-scale>`.")
        intro.write_text(text.replace("\n## Scorecard\n", f"\n## Scorecard\n\n{note}\n", 1))
    if which == "instructor":
        title, _, rest = intro.read_text().partition("\n")
        intro.write_text(f"{title}\n\n{INSTRUCTOR_BANNER}{rest}")
    (stage / "book" / "notebooks").mkdir(parents=True, exist_ok=True)
    records = records_for(executed)
    commit, dirty = source_commit(root)
    built_from = "" if commit is None else f" from commit `{commit[:12]}`" + (
        " with uncommitted changes (the install cell installs that commit, without them)" if dirty else "")
    for nb, record in zip(executed, records):
        notebook = fold_long_cells(edition(json.loads(nb.read_text()), which))
        if commit is not None:
            notebook = pin_install(notebook, commit)
        launch = colab_link(root, nb.stem) if which == "student" else None  # the instructor edition is not public
        cells = [notebook["cells"][0], _runtime_cell(record, launch, built_from), *notebook["cells"][1:]]
        with_time = {**notebook, "cells": cells}
        (stage / "book" / "notebooks" / nb.name).write_text(json.dumps(with_time, indent=1, ensure_ascii=False))
    (stage / "book" / "execution_report.md").write_text(execution_report(records))
    running = stage / "book" / "running.md"
    running.write_text(running_page(root, running.read_text(), records))
    # not "_static": Jupyter Book 1 would add every .js under it to every page (all of MathJax's extensions)
    vendor_assets(stage / "_vendor")
    shutil.copy2(root / "book" / "_css" / "headcircuits.css", stage / "_vendor" / "headcircuits.css")


def running_page(root: Path, text: str, records: list[dict]) -> str:
    """*Running it yourself* as built: this build's measurements (:func:`headcircuits.execution.measured_page`) and
    the sizes of ``headcircuits reproduce --scale paper`` with their sources (``{{ paper_scale_table }}``,
    :func:`headcircuits.reproduce.scale_table`), never typed."""
    from headcircuits.reproduce import scale_table

    return measured_page(text, records).replace("{{ paper_scale_table }}", scale_table(root))


def render(*builds: tuple[Path, Path]) -> None:
    """Jupyter Book 1, execution off, strict: one build per ``(stage, html_parent)``, all side by side (Sphinx
    runs on one core; the editions share no file), each one's log printed whole once they are done. Raises if
    Sphinx reports any warning in any of them."""
    cmds = [[
        str(Path(sys.executable).with_name("jupyter-book")), "build", str(stage),
        "--config", str(stage / "_config.yml"), "--toc", str(stage / "book" / "_toc.yml"),
        "--path-output", str(html_parent), "-W", "-n", "--keep-going", "--all",
    ] for stage, html_parent in builds]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for cmd in cmds]
    logs = [proc.communicate()[0] for proc in procs]
    for text in logs:
        print(text, end="", flush=True)
    for proc, cmd in zip(procs, cmds):
        if proc.returncode:
            raise subprocess.CalledProcessError(proc.returncode, cmd)


def build(root: Path, out: Path, parameters: dict | None = None, *, log=print, run: dict | None = None) -> Path:
    """Execute every notebook of the table of contents once and render the book twice: the student edition
    (returned: ``out/_build/html``) and the instructor edition with the exercises' solutions
    (``out/_build/html-instructor``); executed notebooks in ``out/_build/executed``, staged sources in
    ``out/_build/source`` and ``source-instructor``. ``run``: a ``headcircuits reproduce`` scorecard whose
    verdicts become a column of the book's scorecard (see :func:`stage_sources`)."""
    start = time.perf_counter()
    work = out / "_build"
    executed = execute_notebooks(notebooks_in_toc(root), work / "executed", parameters, log=log)
    report.scorecard(executed)  # each claim once per model across the chapters (raises, naming both chapters)
    stage_sources(root, executed, work / "source", "student", run)
    # the instructor edition: the same executed notebooks, solutions shown, into _build/html-instructor
    stage_sources(root, executed, work / "source-instructor", "instructor", run)
    render((work / "source", out), (work / "source-instructor", work / "instructor"))
    instructor = work / "html-instructor"
    shutil.rmtree(instructor, ignore_errors=True)
    shutil.move(work / "instructor" / "_build" / "html", instructor)
    html = work / "html"
    log(f"book built in {time.perf_counter() - start:.1f} s: {html / 'index.html'} (students), "
        f"{instructor / 'index.html'} (instructors)")
    return html


# --- the offline check --------------------------------------------------------------------------------------------

_REMOTE = ("http://", "https://", "//")


def _is_remote(url: str | None) -> bool:
    return bool(url) and url.strip().lower().startswith(_REMOTE)


def scan_offline(html_dir: Path) -> list[str]:
    """Everything in the built site that would load from the network: ``<script src>``, stylesheets, fonts,
    images, iframes, ES-module imports, CSS ``url()`` / ``@import``, and the MathJax path. Links (``<a href>``)
    are not loads and are allowed. Returns one line per problem (empty when the site is fully offline)."""
    import re

    if not Path(html_dir).is_dir() or not any(Path(html_dir).rglob("*.html")):
        raise FileNotFoundError(f"{html_dir} is not a built site (no .html files): build it first with `make book`")

    from bs4 import BeautifulSoup

    problems: list[str] = []
    load_attrs = {"script": "src", "img": "src", "iframe": "src", "source": "src", "video": "src", "audio": "src",
                  "embed": "src", "object": "data", "link": "href"}
    css_url = re.compile(r"(?:url\(\s*['\"]?|@import\s+['\"])\s*((?:https?:)?//[^'\")\s]+)", re.I)
    js_import = re.compile(r"(?:import\s[^;]*?from\s*|import\s*\(\s*)['\"]((?:https?:)?//[^'\"]+)", re.I)
    for page in sorted(html_dir.rglob("*.html")):
        rel = page.relative_to(html_dir)
        soup = BeautifulSoup(page.read_text(encoding="utf-8"), "html.parser")
        for tag, attr in load_attrs.items():
            for el in soup.find_all(tag):
                if tag == "link" and not set(el.get("rel") or []) & {"stylesheet", "preload", "icon", "modulepreload", "prefetch", "manifest"}:
                    continue
                if _is_remote(el.get(attr)):
                    problems.append(f"{rel}: <{tag} {attr}={el.get(attr)!r}>")
        for script in soup.find_all("script"):
            text = script.string or ""
            for url in js_import.findall(text):
                problems.append(f"{rel}: inline script imports {url}")
        for style in soup.find_all("style"):
            for url in css_url.findall(style.string or ""):
                problems.append(f"{rel}: inline style loads {url}")
        for el in soup.find_all(style=True):
            for url in css_url.findall(el["style"]):
                problems.append(f"{rel}: style attribute loads {url}")
    for css in sorted(html_dir.rglob("*.css")):
        for url in css_url.findall(css.read_text(encoding="utf-8", errors="replace")):
            problems.append(f"{css.relative_to(html_dir)}: loads {url}")
    return problems
