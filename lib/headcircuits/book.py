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
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterable

from headcircuits.errors import ParameterError

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


def execute_notebooks(
    notebooks: Iterable[Path], out_dir: Path, parameters: dict | None = None, *, log=print
) -> list[Path]:
    """Run each notebook once with papermill (its ``parameters`` cell overridden by the ``parameters`` it declares;
    one that no notebook declares is an error, see :func:`check_parameters`). Cached results go to
    ``$HEADCIRCUITS_RESULTS`` when set, else to ``<out_dir>/../results`` (the book's own folder)."""
    import papermill

    notebooks = list(notebooks)
    per_notebook = check_parameters(notebooks, parameters or {})
    out_dir.mkdir(parents=True, exist_ok=True)
    env = {**NOTEBOOK_ENV, "HEADCIRCUITS_RESULTS": os.environ.get("HEADCIRCUITS_RESULTS") or str(out_dir.parent / "results")}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    executed = []
    try:
        for src in notebooks:
            dst = out_dir / src.name
            start = time.perf_counter()
            papermill.execute_notebook(
                str(src), str(dst), parameters=per_notebook[src], cwd=str(src.parent), progress_bar=False,
                kernel_name="python3", request_save_on_cell_execute=False,
            )
            log(f"executed {src.name} in {time.perf_counter() - start:.1f} s")
            executed.append(dst)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return executed


def stage_sources(root: Path, executed: Iterable[Path], stage: Path) -> None:
    """Lay out what Sphinx reads: config, pages, executed notebooks, vendored JS."""
    if stage.exists():
        shutil.rmtree(stage)
    shutil.copytree(root / "book", stage / "book", ignore=shutil.ignore_patterns("notebooks", "_build"))
    shutil.copy2(root / "_config.yml", stage / "_config.yml")
    (stage / "book" / "notebooks").mkdir(parents=True, exist_ok=True)
    for nb in executed:
        shutil.copy2(nb, stage / "book" / "notebooks" / nb.name)
    # not "_static": Jupyter Book 1 would add every .js under it to every page (all of MathJax's extensions)
    vendor_assets(stage / "_vendor")


def render(stage: Path, html_parent: Path) -> None:
    """Jupyter Book 1, execution off, strict. Raises if Sphinx reports any warning."""
    cmd = [
        str(Path(sys.executable).with_name("jupyter-book")), "build", str(stage),
        "--config", str(stage / "_config.yml"), "--toc", str(stage / "book" / "_toc.yml"),
        "--path-output", str(html_parent), "-W", "-n", "--keep-going", "--all",
    ]
    subprocess.run(cmd, check=True)


def build(root: Path, out: Path, parameters: dict | None = None, *, log=print) -> Path:
    """Execute every notebook of the table of contents and render the book; returns the HTML directory,
    ``out/_build/html`` (executed notebooks in ``out/_build/executed``, staged sources in ``out/_build/source``)."""
    start = time.perf_counter()
    work = out / "_build"
    executed = execute_notebooks(notebooks_in_toc(root), work / "executed", parameters, log=log)
    stage_sources(root, executed, work / "source")
    render(work / "source", out)
    html = work / "html"
    log(f"book built in {time.perf_counter() - start:.1f} s: {html / 'index.html'}")
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
