"""Execute the book's notebooks: each chapter once, in a process of its own, with papermill, its ``parameters``
cell overridden; a record beside each executed copy (its key, parameters, wall time, peak memory, hardware and
versions), from which the execution report and *Running it yourself* are made; a chapter whose key is unchanged is
reused (see :func:`execute_notebooks`)."""

from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterable

from headcircuits.errors import NotebookError, ParameterError

NOTEBOOK_ENV = {
    "HEADCIRCUITS_BOOK": "1",  # circuitsvis widgets load the book's vendored copy (plots.Widget)
    "TQDM_DISABLE": "1",  # progress bars go to stderr; the book build treats stderr output as a warning
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "WANDB_MODE": "disabled",
}
# The hub is not forced offline here: `build-book -p model_names=gpt2-medium` must work for a reader with internet.
# `make book` / `make test` set HF_HUB_OFFLINE=1 themselves (the default book uses only offline models).


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

    lock = Path(__file__).resolve().parent / "data" / "requirements.lock"  # the pinned versions the package ships
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

    notebooks = list(notebooks)
    per_notebook = check_parameters(notebooks, parameters or {})
    out_dir.mkdir(parents=True, exist_ok=True)
    env = {"HEADCIRCUITS_RESULTS": os.environ.get("HEADCIRCUITS_RESULTS") or str(out_dir.parent / "results")}
    return [execute(src, out_dir / src.name, per_notebook[src], env, log=log, reuse=reuse) for src in notebooks]


def execute(src: Path, dst: Path, parameters: dict, env: dict[str, str] | None = None, *, log=print,
            reuse: bool = True, output: Path | None = None) -> Path:
    """Execute one notebook with papermill in a process of its own into ``dst`` (its ``parameters`` cell
    overridden by ``parameters``, which it must declare; ``env`` added to this process's environment and
    :data:`NOTEBOOK_ENV`), its ``.run.json`` record beside it; with ``reuse``, not again when its
    :func:`execution_key` is the one recorded (see :func:`execute_notebooks`). ``output``: a file that receives the
    execution's own output (default: this process's). Raises :class:`~headcircuits.errors.NotebookError` when it
    fails."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    record_path = dst.with_name(dst.stem + RECORD)
    key = execution_key(src, parameters)
    old = json.loads(record_path.read_text()) if record_path.is_file() else {}
    if reuse and dst.is_file() and old.get("key") == key:
        log(f"{src.name}: unchanged since {old['executed_at']} (source, parameters, library and packages); "
            f"reused its executed copy ({old['seconds']:.0f} s then)")
        record_path.write_text(json.dumps({**old, "reused": True}, indent=1))
        return dst
    record_path.unlink(missing_ok=True)
    usage = dst.with_name(dst.stem + ".usage.json")
    start = time.perf_counter()
    command = [sys.executable, "-c", "import sys; from headcircuits.execution import _execute_child; "
               "_execute_child(*sys.argv[1:])", str(src), str(dst), json.dumps(parameters), str(usage)]
    with open(output, "a") if output is not None else contextlib.nullcontext() as sink:
        proc = subprocess.run(command, env={**os.environ, **NOTEBOOK_ENV, **(env or {})}, stdout=sink,
                              stderr=subprocess.STDOUT if sink is not None else None)
    if proc.returncode != 0:
        where = f"in {output} and " if output is not None else "above and "
        raise NotebookError(f"{src.name} failed (exit {proc.returncode}); the traceback is printed {where}kept in its "
                            f"executed copy {dst}. Fix the notebook or the library and run again.")
    measured = json.loads(usage.read_text())
    usage.unlink()
    record = {
        "notebook": src.name, "key": key,
        "executed_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "parameters": {**declared_parameters(src), **{k: json.dumps(v) for k, v in parameters.items()}},
        "overridden": sorted(parameters),
        "seconds": measured["seconds"], "process_seconds": time.perf_counter() - start,
        "peak_rss_mib": measured["peak_rss_mib"], "hardware": measured["hardware"],
        "device": os.environ.get("HEADCIRCUITS_DEVICE") or "default (CUDA when available, else CPU)",
        "versions": _versions(), "reused": False,
    }
    record_path.write_text(json.dumps(record, indent=1))
    log(f"executed {src.name} in {record['seconds']:.1f} s (peak {record['peak_rss_mib']:.0f} MiB)")
    return dst


def _minutes(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def execution_report(records: list[dict]) -> str:
    """The book's execution report (MyST Markdown): per chapter its parameters, model(s), wall time, the kernel's
    peak memory and when it ran; then the hardware and the versions. Made from the ``.run.json`` records that
    :func:`execute_notebooks` keeps, so it describes this build, not a typed claim."""
    if not records:
        raise ValueError("no execution records: execute the notebooks first (headcircuits.execution.execute_notebooks)")
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
        raise ValueError("no execution records: execute the notebooks first (headcircuits.execution.execute_notebooks)")
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
