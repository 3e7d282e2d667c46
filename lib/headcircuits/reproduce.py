"""``headcircuits reproduce``: the chapters' experiments at the book's or the papers' scale, on one or more models,
in this process or on a Dask cluster, with a scorecard (``scorecard.json`` and ``scorecard.html``).

Two levels of work, both on Dask distributed when a cluster is given:

* **jobs**: one per (chapter, model), the chapter's notebook executed with papermill at the chosen
  :data:`SCALES` (the same notebook, library and verdict rule as the book: the scorecard is the chapters' own
  published rows). Jobs are submitted in dependency order: the IOI circuit of "The IOI circuit" first, since the
  chapters after it reuse it from the shared results store, so chapters and models run side by side;
* **pieces**: inside a chapter, the big sweeps (:mod:`headcircuits.spread`) are spread over the same cluster.

Everything goes under ``--out``: ``notebooks/<model>/<chapter>.ipynb`` (each with its ``.run.json`` record),
``results/`` (the results cache the chapters share), ``pieces/`` (every finished piece of a sweep), ``logs/``,
``scorecard.json`` and ``scorecard.html``. A job whose inputs are unchanged since it last finished is not run
again, and a piece already in the store is not computed again: a re-run, a crashed worker or a stopped run loses
nothing. A cluster's workers must see ``--out`` and the repository at the same paths (a shared file system).
"""

from __future__ import annotations

import contextlib
import json
import re
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from headcircuits import execution
from headcircuits.errors import NotebookError, ParameterError

#: the chapters whose claims the scorecard holds, in dependency order (01 introduces IOI with the measurement that
#: 02 makes for every task; 07 is a task of our own, with no paper claim)
CHAPTERS = ("02_tasks_and_baselines", "03_ioi_circuit", "04_circuit_reuse", "05_inhibition_channels",
            "06_laundry_list")
#: a chapter -> the chapter whose cached results it reuses (the IOI circuit), run first
DEPENDS = {"04_circuit_reuse": "03_ioi_circuit", "05_inhibition_channels": "03_ioi_circuit",
           "06_laundry_list": "03_ioi_circuit"}


@dataclass(frozen=True)
class Size:
    """One parameter of one chapter at a scale: its ``value`` and where it comes from (``source``: the paper and
    section, or ``ours`` where the papers are silent)."""

    value: object
    source: str

    @property
    def ours(self) -> bool:
        return self.source.startswith("ours")


_CCR, _TH = "Circuit Component Reuse", "Talking Heads"
#: what differs from the book's defaults at each scale (``book``: nothing); the book's *Running it yourself* shows
#: this table (:func:`scale_table`)
SCALES: dict[str, dict[str, dict[str, Size]]] = {
    "book": {},
    "paper": {
        "02_tasks_and_baselines": {
            # its one claim is IOI's ranking (Colored Objects' and the Laundry List's are judged in 04 and 06)
            "n_prompts": Size(1000, f"{_CCR} §3: 1,000 IOI prompts"),
        },
        "03_ioi_circuit": {
            "n_prompts": Size(1000, f"{_CCR} §3: path patching on 1,000 IOI prompts"),
            "n_eval": Size(500, "ours: head classes and attention statistics (the papers do not state a size)"),
        },
        "04_circuit_reuse": {
            "n_prompts": Size(1000, f"{_CCR} §3: path patching on 1,000 prompts per task"),
            "n_eval": Size(1000, "ours: Colored Objects prompts for accuracy and the repair (the paper's set: 1,000)"),
            "n_paper": Size(1000, f"{_CCR}: every one of its 1,000 released Colored Objects prompts"),
            "n_controls": Size(10, "ours: random head sets for the repair's control"),
        },
        "05_inhibition_channels": {
            "n_prompts": Size(1000, f"{_CCR} §3: the IOI circuit on 1,000 prompts (the one chapter 03 finds)"),
            "n_inhibition": Size(200, f"{_TH} §3: 200 IOI prompts, half with IO first (as the book)"),
            "n_components": Size(None, f"{_TH} §3, Fig. 2: every component of each inhibition head"),
            "n_controls": Size(10, "ours: random heads for the intervention's control"),
        },
        "06_laundry_list": {
            "n_prompts": Size(1000, f"{_CCR} §3: the IOI circuit on 1,000 prompts (the one chapter 03 finds)"),
            "lengths": Size(None, f"{_TH} §5.1: every N from 3 to 20"),
            "n_per_length": Size(250, f"{_TH} §5.1: 250 prompts per N"),
            "n_traverse": Size(250, f"{_TH} §5.2: the whole dataset (250 prompts per N)"),
            "n_fix": Size(250, "ours: held-out prompts per N for the fix"),
            "n_controls": Size(10, "ours: random regions of the same size"),
        },
    },
}


def scale_table(root: Path, scale: str = "paper") -> str:
    """The sizes ``scale`` changes, per chapter: the book's value (the notebook's default), the scale's and its
    source, as a Markdown table (the book's *Running it yourself* shows it)."""
    lines = ["| chapter | parameter | book | papers' scale | source |", "| --- | --- | --- | --- | --- |"]
    for chapter, sizes in SCALES[scale].items():
        defaults = execution.declared_parameters(root / "notebooks" / f"{chapter}.ipynb")
        for name, size in sizes.items():
            book = defaults[name].split("#")[0].strip()
            value = json.dumps(size.value).replace("null", "None")
            source = f"*{size.source}*" if size.ours else size.source
            lines.append(f"| {chapter} | `{name}` | `{book}` | `{value}` | {source} |")
    return "\n".join(lines)


@dataclass(frozen=True)
class Job:
    """One chapter on one model at a scale: its notebook's parameter overrides and the job it waits for."""

    chapter: str
    model: str
    parameters: dict = field(hash=False)
    after: str | None = None  # the name of the job that must finish first

    @property
    def name(self) -> str:
        return f"{self.chapter}@{self.model}"


def slug(model: str) -> str:
    """A folder name for a model (a zoo name as it is; a local folder by its last part and a short hash)."""
    import hashlib

    if re.fullmatch(r"[a-z0-9][a-z0-9._-]*", model):
        return model
    return f"{Path(model).name or 'model'}-{hashlib.sha256(model.encode()).hexdigest()[:8]}"


def plan(models: list[str], scale: str) -> list[Job]:
    """The jobs for ``models`` at ``scale``, in dependency order (every model's chapter 03 before its later
    chapters). Raises :class:`~headcircuits.errors.ParameterError` for an unknown scale or model."""
    from headcircuits.models import MODELS, is_local_model, known_models

    if scale not in SCALES:
        raise ParameterError(f"unknown scale {scale!r}: choose one of {', '.join(SCALES)}")
    if not models:
        raise ParameterError("no model given: --models smollm2-135m (or several, comma-separated)")
    for m in models:
        if m.lower() not in MODELS and not is_local_model(m):
            raise ParameterError(f"unknown model {m!r} (not a zoo name, nor a folder with a config.json). Known "
                                 f"models:\n{known_models()}")
    jobs = []
    for chapter in CHAPTERS:
        for m in models:
            sizes = {k: s.value for k, s in SCALES[scale].get(chapter, {}).items()}
            after = f"{DEPENDS[chapter]}@{m}" if chapter in DEPENDS else None
            jobs.append(Job(chapter, m, {**sizes, "model_names": [m]}, after))
    return jobs


def check_out(out: Path) -> Path:
    """``out`` created and writable, or :class:`~headcircuits.errors.ParameterError` naming it."""
    out = Path(out).expanduser().resolve()
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".writable"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise ParameterError(f"--out {out} is not a writable folder ({exc.strerror or exc}): choose another one") from None
    return out


@contextlib.contextmanager
def cluster(spec: str) -> Iterator[str | None]:
    """The scheduler address for ``--cluster``: ``none`` (``None``: everything in this process), ``local[:N]`` (a
    Dask ``LocalCluster`` of N single-threaded worker processes on 127.0.0.1, default 2, started here and shut
    down at the end) or ``tcp://HOST:PORT`` (an existing scheduler, checked within seconds)."""
    from headcircuits import spread

    if spec == "none":
        yield None
        return
    if spec.startswith("tcp://"):
        spread.client(spec)  # fails within seconds, naming the address
        yield spec
        return
    match = re.fullmatch(r"local(?::(\d+))?", spec)
    if not match:
        raise ParameterError(f"--cluster is none, local, local:N or tcp://HOST:PORT, not {spec!r}")
    n = int(match.group(1) or 2)
    if n < 1:
        raise ParameterError(f"--cluster local:N needs at least one worker, not {n}")
    with spread.local_cluster(n) as address:
        yield address


def run(jobs: list[Job], out: Path, root: Path, address: str | None, *, log: Callable[[str], None] = print) -> dict:
    """Execute ``jobs`` (each a chapter's notebook from ``root/notebooks`` into ``out``), here one after the other
    or as Dask tasks on the scheduler at ``address`` (at most one per worker thread, each after the job it
    reuses). Returns, per job name,
    its record (see :func:`headcircuits.execution.execute`). A job that fails stops the run with its error; every
    finished job and piece stays under ``out``."""
    sources = {c: root / "notebooks" / f"{c}.ipynb" for c in CHAPTERS}
    for chapter, src in sources.items():
        if not src.is_file():
            raise FileNotFoundError(f"{src} is missing: run `headcircuits reproduce` from the repository (--root)")
        execution.check_parameters([src], {k: v for j in jobs if j.chapter == chapter for k, v in j.parameters.items()})
    env = {"HEADCIRCUITS_RESULTS": str(out / "results"), "HEADCIRCUITS_PIECES": str(out / "pieces"),
           "TQDM_DISABLE": "1"}
    if address:
        env["HEADCIRCUITS_SCHEDULER"] = address
    (out / "logs").mkdir(parents=True, exist_ok=True)
    args = {j.name: (str(sources[j.chapter]), str(_executed(out, j)), j.parameters, env, str(_log(out, j))) for j in jobs}
    if address is None:
        for j in jobs:
            log(f"{j.name}: started")
            _job(*args[j.name])
            log(f"{j.name}: {_summary(out, j)}")
        return {j.name: _record(out, j) for j in jobs}
    from distributed import as_completed

    from headcircuits import spread

    dask = spread.client(address)
    limit = max(1, sum(dask.nthreads().values()))  # chapters at once: one per worker thread (each has a kernel)
    pending, running, finished = list(jobs), {}, set()
    names = {j.name for j in jobs}
    done = as_completed(loop=dask.loop)

    def submit_ready() -> None:
        for j in list(pending):
            if len(running) >= limit:
                return
            if j.after is None or j.after in finished or j.after not in names:
                future = dask.submit(_job, *args[j.name], key=f"job-{slug(j.model)}-{j.chapter}-{time.time_ns()}",
                                     pure=False)
                running[future] = j
                pending.remove(j)
                done.add(future)
                log(f"{j.name}: started")

    submit_ready()
    try:
        for future in done:
            j = running.pop(future)
            try:
                future.result()
            except Exception as exc:
                raise NotebookError(f"{j.name} failed on the cluster at {address}: {type(exc).__name__}: {exc}. "
                                    f"Every finished chapter and piece is kept under {out}; run the same command "
                                    "again to go on from there") from exc
            finished.add(j.name)
            log(f"{j.name}: {_summary(out, j)}")
            submit_ready()
    finally:
        for future in running:
            future.cancel()
    return {j.name: _record(out, j) for j in jobs}


def _executed(out: Path, job: Job) -> Path:
    return out / "notebooks" / slug(job.model) / f"{job.chapter}.ipynb"


def _log(out: Path, job: Job) -> Path:
    return out / "logs" / f"{slug(job.model)}-{job.chapter}.log"


def _record(out: Path, job: Job) -> dict:
    return json.loads(_executed(out, job).with_name(job.chapter + execution.RECORD).read_text())


def _summary(out: Path, job: Job) -> str:
    r = _record(out, job)
    return "reused (nothing it depends on changed)" if r.get("reused") else \
        f"executed in {r['seconds']:.0f} s, peak {r['peak_rss_mib']:.0f} MiB"


def _job(src: str, dst: str, parameters: dict, env: dict, output: str) -> str:
    """One chapter on one model (a Dask task, or called here): the notebook executed by
    :func:`headcircuits.execution.execute` (or reused). On a worker the task leaves the worker's thread while the
    notebook runs, so that the worker can run the pieces the notebook spreads. The kernel gets the worker's
    allocator setting (:func:`headcircuits.spread.allocator_env`), not the nanny's."""
    from headcircuits import spread

    try:
        from distributed import secede

        secede()
    except ValueError:  # not on a worker
        pass
    env = {**spread.allocator_env(), **env}  # the kernel's own model work, as fast as the worker's pieces
    execution.execute(Path(src), Path(dst), parameters, env, log=lambda _: None, output=Path(output))
    return dst


def pieces_since(out: Path, began: str) -> tuple[int, int]:
    """Pieces computed and found in the store by the sweeps logged under ``out`` since ``began``."""
    from headcircuits import spread

    path = out / "pieces" / spread.LOG
    lines = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    recent = [r for r in lines if r["at"] >= began]
    return sum(r["computed"] for r in recent), sum(r["stored"] for r in recent)


def main(args) -> int:
    """``headcircuits reproduce`` (see :mod:`headcircuits.cli`): every bad input is refused before any work."""
    from headcircuits import models, scorecard

    root = args.root.resolve()
    jobs = plan(models.model_names(args.models), args.scale)
    if args.chapters:
        wanted = [c.strip() for c in args.chapters.split(",") if c.strip()]
        unknown = [c for c in wanted if not any(ch.startswith(c) for ch in CHAPTERS)]
        if unknown:
            raise ParameterError(f"unknown chapter(s) {unknown}: choose among {', '.join(CHAPTERS)}")
        jobs = [j for j in jobs if any(j.chapter.startswith(c) for c in wanted)]
        jobs = [j if j.after is None or any(j.after == k.name for k in jobs) else
                Job(j.chapter, j.model, j.parameters, None) for j in jobs]
    overrides = execution.parse_parameters(args.parameter)
    if overrides:
        execution.check_parameters([root / "notebooks" / f"{c}.ipynb" for c in CHAPTERS], overrides)
        jobs = [Job(j.chapter, j.model, {**j.parameters, **{k: v for k, v in overrides.items()
                                                             if k in execution.declared_parameters(
                                                                 root / "notebooks" / f"{j.chapter}.ipynb")}},
                    j.after) for j in jobs]
    out = check_out(args.out)
    if args.dry_run:
        from headcircuits import costs

        print(f"reproduce --dry-run: {len(jobs)} jobs ({args.scale} scale); calibrating each on two slices of its "
              f"prompts in {out / 'calibration'} (kept: a second dry run of the same code reuses them)", flush=True)
        print(costs.dry_run(jobs, root, out / "calibration", log=lambda line: print(f"  {line}", flush=True)))
        return 0
    start, began = time.perf_counter(), time.strftime("%Y-%m-%d %H:%M:%S")
    try:
        with stop_on_signals(), cluster(args.cluster) as address:
            print(f"reproduce: {len(jobs)} jobs ({args.scale} scale) on {address or 'this process'}; results in "
                  f"{out}", flush=True)
            run(jobs, out, root, address, log=lambda line: print(f"reproduce: {line}", flush=True))
    except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM: the finally below has written what finished
        signum = exc.signum if isinstance(exc, Stopped) else signal.SIGINT
        print(f"reproduce: stopped by {signal.Signals(signum).name} after {(time.perf_counter() - start) / 60:.1f} "
              f"min; every finished chapter and piece is kept under {out}: run the same command again to go on "
              "from there", flush=True)
        return 128 + signum
    finally:  # also after a failure or a stop: the scorecard of the chapters that finished, marked incomplete
        seconds = time.perf_counter() - start
        computed, stored = pieces_since(out, began)
        print(f"reproduce: sweeps of this run: {computed} pieces computed, {stored} found in the store", flush=True)
        done = [j for j in jobs if finished(out, j, root)]
        if done:
            records = {j.name: _record(out, j) for j in done}
            json_path, page = scorecard.write(out, scorecard.collect({j.name: _executed(out, j) for j in done}),
                                              scorecard.provenance(root, args.scale, args.cluster, seconds, records,
                                                                   overrides, of=len(jobs)))
            print(f"reproduce: {len(done)} of {len(jobs)} chapters in the scorecard {json_path} and {page} "
                  f"({seconds / 60:.1f} min)", flush=True)
    return 0


class Stopped(KeyboardInterrupt):
    """The run was told to stop by a signal (SIGTERM: ``kill``, a batch system's time limit). A
    ``KeyboardInterrupt``, like Ctrl-C, so that no ``except Exception`` on the way swallows it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """While inside: SIGTERM raises :class:`Stopped` in the main thread, as Ctrl-C raises ``KeyboardInterrupt``, so
    that a stopped run goes through its ``finally`` (the scorecard of the chapters that finished, the cluster shut
    down). SIGINT keeps Python's own handler; where it is ignored (a background job of a non-interactive shell),
    it stays ignored, as the shell meant."""

    def stop(signum: int, frame) -> None:
        raise Stopped(signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def finished(out: Path, job: Job, root: Path) -> bool:
    """Whether ``job``'s executed chapter under ``out`` is the one this code, these parameters and these pinned
    versions make (its record's key), i.e. it belongs in this run's scorecard."""
    path = _executed(out, job).with_name(job.chapter + execution.RECORD)
    if not path.is_file():
        return False
    key = execution.execution_key(root / "notebooks" / f"{job.chapter}.ipynb", job.parameters)
    return json.loads(path.read_text()).get("key") == key
