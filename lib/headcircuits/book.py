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
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterable

from headcircuits import report
from headcircuits.errors import NotebookError, ParameterError

NOTEBOOK_ENV = {
    "HEADCIRCUITS_BOOK": "1",  # circuitsvis widgets load the book's vendored copy (plots.Widget)
    "TQDM_DISABLE": "1",  # progress bars go to stderr; the book build treats stderr output as a warning
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "WANDB_MODE": "disabled",
}
# The hub is not forced offline here: `build-book -p model_names=gpt2-medium` must work for a reader with internet.
# `make book` / `make test` set HF_HUB_OFFLINE=1 themselves (the default book uses only offline models).
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


def notebooks_in_toc(root: Path) -> list[Path]:
    """Source notebooks named in ``book/_toc.yml`` (as ``notebooks/<name>``), in reading order."""
    import yaml

    toc = yaml.safe_load((root / "book" / "_toc.yml").read_text())
    files: list[str] = []

    def walk(node):
        if isinstance(node, dict):
            if "file" in node:
                files.append(node["file"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(toc)
    out = []
    for f in files:
        if f.startswith("book/notebooks/"):
            src = root / "notebooks" / (Path(f).name + ".ipynb")
            if not src.is_file():
                raise FileNotFoundError(f"book/_toc.yml names {f} but {src} does not exist")
            out.append(src)
    return out


def declared_parameters(notebook: Path) -> dict[str, str]:
    """The names a notebook's ``parameters`` cell declares, with their default as written (papermill's own
    inspection)."""
    import papermill

    return {name: info["default"] for name, info in papermill.inspect_notebook(str(notebook)).items()}


def check_parameters(notebooks: Iterable[Path], parameters: dict) -> dict[Path, dict]:
    """For each notebook, the overrides it declares. A parameter that *no* notebook declares is refused with the
    list of valid ones (papermill would inject it silently and change nothing). A parameter that only some
    notebooks declare (e.g. ``n_fix``) reaches only those."""
    declared = {nb: declared_parameters(nb) for nb in notebooks}
    valid = sorted({name for names in declared.values() for name in names})
    unknown = sorted(set(parameters) - set(valid))
    if unknown:
        by_notebook = "\n".join(f"  {nb.stem}: {', '.join(sorted(names))}" for nb, names in declared.items())
        raise ParameterError(
            f"no notebook declares the parameter(s) {unknown}. Valid parameters: {', '.join(valid)}.\n"
            f"Per notebook:\n{by_notebook}")
    return {nb: {k: v for k, v in parameters.items() if k in names} for nb, names in declared.items()}


RECORD = ".run.json"  # beside each executed notebook: what ran, how long, on what (the execution report's source)


def execution_key(src: Path, parameters: dict) -> str:
    """What an executed notebook depends on: its source, the parameters it received, the library's source (the
    key of the results cache, see :func:`headcircuits.cache.library_hash`), the pinned packages, the device choice
    and the Python version. Two builds with the same key execute the same code on the same inputs."""
    import hashlib

    from headcircuits.cache import library_hash

    lock = src.parent.parent / "requirements.lock"
    parts = {
        "notebook": hashlib.sha256(src.read_bytes()).hexdigest(),
        "parameters": json.dumps(parameters, sort_keys=True, default=str),
        "library": library_hash(),
        "lock": hashlib.sha256(lock.read_bytes()).hexdigest() if lock.is_file() else _versions(),
        "device": os.environ.get("HEADCIRCUITS_DEVICE", ""),
        "python": sys.version,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": sys.version.split()[0]}
    for dist in ("headcircuits", "torch", "transformers", "transformer-lens", "numpy", "papermill", "jupyter-book"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def _hardware() -> dict[str, str]:
    """The machine a notebook ran on: CPU model and cores, memory, and the GPU when CUDA is available."""
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    out = {"cpu": cpu, "cores": str(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()),
           "system": f"{platform.system()} {platform.release()}"}
    try:
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        out["memory"] = f"{pages * size / 2**30:.0f} GiB"
    except (ValueError, OSError, AttributeError):
        pass
    import torch

    out["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return out


def _execute_child(src: str, dst: str, parameters: str, record: str) -> None:
    """Run in a fresh Python process by :func:`execute_notebooks`: papermill executes the notebook in a kernel that
    is this process's child, so once it has exited ``RUSAGE_CHILDREN`` holds the kernel's peak memory alone."""
    import resource

    import papermill

    start = time.perf_counter()
    papermill.execute_notebook(src, dst, parameters=json.loads(parameters), cwd=str(Path(src).parent),
                               progress_bar=False, kernel_name="python3", request_save_on_cell_execute=False)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB on Linux, bytes on macOS
    peak_mib = peak / 2**20 if sys.platform == "darwin" else peak / 2**10
    Path(record).write_text(json.dumps({"seconds": seconds, "peak_rss_mib": peak_mib, "hardware": _hardware()}))


def execute_notebooks(
    notebooks: Iterable[Path], out_dir: Path, parameters: dict | None = None, *, log=print, reuse: bool = True
) -> list[Path]:
    """Run each notebook once with papermill (its ``parameters`` cell overridden by the ``parameters`` it declares;
    one that no notebook declares is an error, see :func:`check_parameters`). Cached results go to
    ``$HEADCIRCUITS_RESULTS`` when set, else to ``<out_dir>/../results`` (the book's own folder).

    Each notebook runs in its own process; beside its executed copy a ``.run.json`` record keeps its
    :func:`execution_key`, parameters, wall time, the kernel's peak memory, the hardware and the versions (the
    execution report is made from these). With ``reuse``, a notebook whose key equals the one recorded beside its
    executed copy is not run again: nothing it depends on has changed. A failing notebook raises
    :class:`~headcircuits.errors.NotebookError` (its traceback is printed and kept in the executed copy)."""
    from headcircuits.errors import NotebookError

    notebooks = list(notebooks)
    per_notebook = check_parameters(notebooks, parameters or {})
    out_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **NOTEBOOK_ENV,
           "HEADCIRCUITS_RESULTS": os.environ.get("HEADCIRCUITS_RESULTS") or str(out_dir.parent / "results")}
    executed = []
    for src in notebooks:
        dst, record_path = out_dir / src.name, out_dir / (src.stem + RECORD)
        key = execution_key(src, per_notebook[src])
        old = json.loads(record_path.read_text()) if record_path.is_file() else {}
        if reuse and dst.is_file() and old.get("key") == key:
            log(f"{src.name}: unchanged since {old['executed_at']} (source, parameters, library and packages); "
                f"reused its executed copy ({old['seconds']:.0f} s then)")
            record_path.write_text(json.dumps({**old, "reused": True}, indent=1))
            executed.append(dst)
            continue
        record_path.unlink(missing_ok=True)
        usage = out_dir / (src.stem + ".usage.json")
        start = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-c", "import sys; from headcircuits.book import _execute_child; _execute_child(*sys.argv[1:])",
             str(src), str(dst), json.dumps(per_notebook[src]), str(usage)], env=env)
        if proc.returncode != 0:
            raise NotebookError(f"{src.name} failed (exit {proc.returncode}); the traceback is printed above and "
                                f"kept in its executed copy {dst}. Fix the notebook or the library and build again.")
        measured = json.loads(usage.read_text())
        usage.unlink()
        defaults = declared_parameters(src)
        record = {
            "notebook": src.name, "key": key,
            "executed_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "parameters": {**defaults, **{k: json.dumps(v) for k, v in per_notebook[src].items()}},
            "overridden": sorted(per_notebook[src]),
            "seconds": measured["seconds"], "process_seconds": time.perf_counter() - start,
            "peak_rss_mib": measured["peak_rss_mib"], "hardware": measured["hardware"],
            "device": os.environ.get("HEADCIRCUITS_DEVICE") or "default (CUDA when available, else CPU)",
            "versions": _versions(), "reused": False,
        }
        record_path.write_text(json.dumps(record, indent=1))
        log(f"executed {src.name} in {record['seconds']:.1f} s (peak {record['peak_rss_mib']:.0f} MiB)")
        executed.append(dst)
    return executed


def _minutes(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def execution_report(records: list[dict]) -> str:
    """The book's execution report (MyST Markdown): per chapter its parameters, model(s), wall time, the kernel's
    peak memory and when it ran; then the hardware and the versions. Made from the ``.run.json`` records that
    :func:`execute_notebooks` keeps, so it describes this build, not a typed claim."""
    if not records:
        raise ValueError("no execution records: execute the notebooks first (headcircuits.book.execute_notebooks)")
    lines = [
        "# Execution report", "",
        "Computed when this book was built: how each chapter was executed (by papermill, one process per chapter),",
        "with which parameters and models, how long it took and how much memory its kernel used at its peak. A",
        "chapter marked *reused* was not executed again because nothing it depends on changed (its source, its",
        "parameters, the library's source, the pinned packages, the device choice); its figures are from its last",
        "execution.", "",
        "| chapter | models | device | wall time | peak memory | executed |",
        "| --- | --- | --- | ---: | ---: | --- |",
    ]
    total = 0.0
    for r in records:
        models = str(r["parameters"].get("model_names", "")).strip("[]\"'").replace("\"", "").replace("'", "")
        total += r["seconds"]
        lines.append(f"| [{r['notebook'].removesuffix('.ipynb')}](notebooks/{r['notebook']}) | "
                     f"{models} | {r['device'].split(' (')[0]} | {_minutes(r['seconds'])} | "
                     f"{r['peak_rss_mib'] / 1024:.1f} GiB | {r['executed_at']}{' (reused)' if r.get('reused') else ''} |")
    lines += ["", f"All chapters: {_minutes(total)} of execution.", ""]
    hardware, versions = records[-1]["hardware"], records[-1]["versions"]
    lines += ["## Hardware", "", "| | |", "| --- | --- |"]
    lines += [f"| {k} | {v} |" for k, v in hardware.items()]
    lines += ["", "## Versions", "", "| package | version |", "| --- | --- |"]
    lines += [f"| {k} | {v} |" for k, v in versions.items()]
    lines += ["", "## Parameters", "",
              "Each chapter's `parameters` cell as executed; **bold** values were overridden for this build.", ""]
    for r in records:
        lines += [f"### {r['notebook'].removesuffix('.ipynb')}", "", "| parameter | value |", "| --- | --- |"]
        for name, value in r["parameters"].items():
            shown = f"`{value}`".replace("|", "\\|")
            lines.append(f"| `{name}` | {'**' + shown + '**' if name in r['overridden'] else shown} |")
        lines.append("")
    return "\n".join(lines)


MEASURED = ("{{ book_peak_memory }}", "{{ book_heaviest_chapter }}", "{{ book_total_time }}", "{{ book_hardware }}")


def measured_page(text: str, records: list[dict]) -> str:
    """A page with this build's measurements put in (``{{ book_peak_memory }}``: the largest chapter's peak
    memory, rounded up to a whole GiB; ``{{ book_heaviest_chapter }}``, ``{{ book_total_time }}``,
    ``{{ book_hardware }}``): *Running it yourself* states the memory and time a build needs from the execution
    records, never typed."""
    if not records:
        raise ValueError("no execution records: execute the notebooks first (headcircuits.book.execute_notebooks)")
    heaviest = max(records, key=lambda r: r["peak_rss_mib"])
    hw = records[-1]["hardware"]
    values = {
        MEASURED[0]: f"{math.ceil(heaviest['peak_rss_mib'] / 1024)} GB",
        MEASURED[1]: f"{Path(heaviest['notebook']).stem} ({heaviest['peak_rss_mib'] / 1024:.1f} GiB at its peak)",
        MEASURED[2]: _minutes(sum(r["seconds"] for r in records)),
        MEASURED[3]: f"{hw['cores']} cores of {hw['cpu']}",
    }
    for token, value in values.items():
        text = text.replace(token, value)
    return text


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


def records_for(executed: Iterable[Path]) -> list[dict]:
    """The execution records kept beside executed notebooks, in the same order; ``reused`` marks those whose
    record is older than this build (see :func:`execute_notebooks`)."""
    out = []
    for nb in executed:
        path = nb.with_name(nb.stem + RECORD)
        if not path.is_file():
            raise FileNotFoundError(f"{nb} has no execution record {path.name}: execute it with execute_notebooks")
        out.append(json.loads(path.read_text()))
    return out


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


def stage_sources(root: Path, executed: Iterable[Path], stage: Path, which: str = "student") -> None:
    """Lay out what Sphinx reads for one edition (see :func:`edition`): config, pages, executed notebooks,
    vendored JS."""
    if stage.exists():
        shutil.rmtree(stage)
    shutil.copytree(root / "book", stage / "book", ignore=shutil.ignore_patterns("notebooks", "_build", "_css"))
    shutil.copy2(root / "_config.yml", stage / "_config.yml")
    if which == "instructor":
        intro = stage / "book" / "intro.md"
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
    running.write_text(measured_page(running.read_text(), records))
    # not "_static": Jupyter Book 1 would add every .js under it to every page (all of MathJax's extensions)
    vendor_assets(stage / "_vendor")
    shutil.copy2(root / "book" / "_css" / "headcircuits.css", stage / "_vendor" / "headcircuits.css")


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


def build(root: Path, out: Path, parameters: dict | None = None, *, log=print) -> Path:
    """Execute every notebook of the table of contents once and render the book twice: the student edition
    (returned: ``out/_build/html``) and the instructor edition with the exercises' solutions
    (``out/_build/html-instructor``); executed notebooks in ``out/_build/executed``, staged sources in
    ``out/_build/source`` and ``source-instructor``."""
    start = time.perf_counter()
    work = out / "_build"
    executed = execute_notebooks(notebooks_in_toc(root), work / "executed", parameters, log=log)
    report.scorecard(executed)  # each claim once per model across the chapters (raises, naming both chapters)
    stage_sources(root, executed, work / "source", "student")
    # the instructor edition: the same executed notebooks, solutions shown, into _build/html-instructor
    stage_sources(root, executed, work / "source-instructor", "instructor")
    render((work / "source", out), (work / "source-instructor", work / "instructor"))
    instructor = work / "html-instructor"
    shutil.rmtree(instructor, ignore_errors=True)
    shutil.move(work / "instructor" / "_build" / "html", instructor)
    html = work / "html"
    log(f"book built in {time.perf_counter() - start:.1f} s: {html / 'index.html'} (students), "
        f"{instructor / 'index.html'} (instructors)")
    return html


def parse_parameters(pairs: list[str]) -> dict:
    """``key=value`` pairs (values parsed as JSON when possible, e.g. ``n_prompts=50``, ``lengths=[3,5]``; other
    values stay strings: ``model_names=gemma-3-270m``) for papermill."""
    params = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise ParameterError(f"a parameter is written KEY=VALUE (e.g. -p n_prompts=50), not {pair!r}")
        try:
            params[key] = json.loads(value)
        except json.JSONDecodeError:
            params[key] = value
    return params


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
