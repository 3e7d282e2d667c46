"""Sweeps in independent pieces, run in this process or spread over a Dask cluster.

The big sweeps of both papers are lists of pieces whose results do not depend on each other: path patching's
prompts (Circuit Component Reuse ran 1,000 IOI prompts in batches of 25), the traversal's grid points and an
inhibition head's components (Talking Heads §4-5), the Laundry List's lengths, the random controls.
:func:`sweep` runs ``function(model, piece, **shared)`` for every piece and returns the results **in the pieces'
order**, by one code path wherever it runs:

* **here**, one piece after the other, when no cluster is set (the book's build, a notebook on a laptop);
* **on a Dask cluster** when one is set (:func:`use`, or ``$HEADCIRCUITS_SCHEDULER``, which ``headcircuits
  reproduce`` sets for the chapters it runs): each piece is a Dask task; a worker loads the model once from its
  recipe (:func:`headcircuits.models.reload`: the same zoo name or folder, never the weights over the network),
  checks that its copy is the same (``weights_id``) and keeps it for later pieces.

With a **store** (:func:`use`'s ``store``, or ``$HEADCIRCUITS_PIECES``: a folder every worker can read and write),
each finished piece is written there, keyed by everything it depends on (the function, the model, the piece, the
shared arguments and the library's source: :func:`headcircuits.cache.fingerprint`), before it is reported done; a
piece found there is not computed again, so a re-run, a crashed worker or a stopped run never recomputes a finished
piece. A piece whose worker dies is retried on another worker by Dask (the scheduler's
``distributed.scheduler.allowed-failures``, :data:`RETRIES` on a cluster that :func:`local_cluster` starts);
after that, or when the piece itself raises, the sweep stops with :class:`~headcircuits.errors.SweepError` naming
the piece and the cause, and every finished piece stays in the store.

Pieces give the same numbers wherever they run when they are batched the same way on the same kind of device with
the same number of threads: bit for bit (tested). Dask starts its workers single-threaded (``OMP_NUM_THREADS=1``),
and a process with more threads, or other pieces (prompts in batches of 100 instead of all at once), sums in
another order: equal to float rounding (logit differences within about 1e-7 on the book's models), not bit for bit.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import json
import os
import socket
import time
import warnings
from concurrent.futures import CancelledError
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, TypeVar

from headcircuits import cache
from headcircuits.errors import ClusterError, SweepError
from headcircuits.models.core import Model
from headcircuits.progress import tqdm
from headcircuits.tasks.base import TaskData

T = TypeVar("T")
P = TypeVar("P")

RETRIES = 3  # how often a piece may lose its worker before the run stops (a cluster that local_cluster starts)
CONNECT_SECONDS = 10  # an unreachable scheduler fails after this long, before any work starts
LOG = "sweeps.jsonl"  # in the store: one line per sweep (pieces computed, found in the store, seconds)


@dataclass(frozen=True)
class Settings:
    """Where sweeps run: ``scheduler`` (a Dask scheduler's address; ``None``: here) and ``store`` (the folder of
    finished pieces; ``None``: none kept)."""

    scheduler: str | None = None
    store: Path | None = None


@dataclass(frozen=True)
class Report:
    """What one :func:`sweep` did: its ``name``, how many ``pieces`` (holding ``items``), how many were
    ``computed`` and how many found in the store (``stored``), where (``scheduler`` or ``None``) and how long it
    took."""

    name: str
    pieces: int
    items: int  # what the pieces hold in all (prompts, grid points, components: each piece's len)
    computed: int
    stored: int
    scheduler: str | None
    seconds: float


_override: contextvars.ContextVar[Settings | None] = contextvars.ContextVar("spread_settings", default=None)
_inside_piece: contextvars.ContextVar[bool] = contextvars.ContextVar("spread_inside_piece", default=False)
_clients: dict[str, Any] = {}
_models: dict[tuple, Model] = {}  # a worker's models, loaded once from their recipe
history: list[Report] = []  # this process's sweeps, newest last


def settings() -> Settings:
    """The settings in force: those of the innermost :func:`use`, else ``$HEADCIRCUITS_SCHEDULER`` and
    ``$HEADCIRCUITS_PIECES``. Inside a piece, sweeps always run here (a worker does not spread its own piece)."""
    chosen = _override.get()
    if chosen is None:
        store = os.environ.get("HEADCIRCUITS_PIECES")
        chosen = Settings(os.environ.get("HEADCIRCUITS_SCHEDULER") or None, Path(store) if store else None)
    if _inside_piece.get():
        return Settings(None, chosen.store)
    return chosen


@contextlib.contextmanager
def use(scheduler: str | None = None, store: str | os.PathLike | None = None) -> Iterator[Settings]:
    """Run the sweeps inside the block on the Dask scheduler at ``scheduler`` (``None``: here), keeping finished
    pieces in ``store`` (``None``: none kept). The connection is checked first (:func:`client`)."""
    if scheduler is not None:
        client(scheduler)
    chosen = Settings(scheduler, Path(store) if store is not None else None)
    token = _override.set(chosen)
    try:
        yield chosen
    finally:
        _override.reset(token)


def client(address: str):
    """This process's Dask client of the scheduler at ``address`` (one per address, kept). Raises
    :class:`~headcircuits.errors.ClusterError` naming the address within :data:`CONNECT_SECONDS` when it cannot
    be reached."""
    found = _clients.get(address)
    if found is not None and found.status == "running":
        return found
    check_reachable(address)
    from distributed import Client

    try:
        made = Client(address, timeout=f"{CONNECT_SECONDS}s", set_as_default=False)
    except (OSError, TimeoutError) as exc:
        raise ClusterError(f"cannot connect to the Dask scheduler at {address} ({type(exc).__name__}: {exc}). "
                           "Start one (`dask scheduler`, then `dask worker ADDRESS` on each machine) or check the "
                           "address and the firewall") from None
    _clients[address] = made
    return made


def check_reachable(address: str, seconds: float = CONNECT_SECONDS) -> None:
    """Fail fast (within ``seconds``) when nothing listens at a ``tcp://host:port`` address."""
    if not address.startswith("tcp://"):
        raise ClusterError(f"a Dask scheduler address looks like tcp://HOST:PORT, not {address!r}")
    host, _, port = address.removeprefix("tcp://").rpartition(":")
    if not host or not port.isdigit():
        raise ClusterError(f"a Dask scheduler address looks like tcp://HOST:PORT, not {address!r}")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=seconds).close()
    except OSError as exc:
        raise ClusterError(f"nothing answers at the Dask scheduler address {address} ({exc}). Start the scheduler "
                           "there (`dask scheduler`), or check the address and the firewall") from None


@contextlib.contextmanager
def local_cluster(n_workers: int) -> Iterator[str]:
    """A ``LocalCluster`` of ``n_workers`` single-threaded worker processes, everything bound to 127.0.0.1 (its
    HTTP endpoint on a free port there), a piece retried :data:`RETRIES` times when its worker dies; yields the
    scheduler's address."""
    import logging

    import dask
    from distributed import LocalCluster

    with dask.config.set({"distributed.scheduler.allowed-failures": RETRIES,
                          "distributed.worker.daemon": False}):  # a worker runs a chapter's notebook kernel
        with LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                          dashboard_address="127.0.0.1:0", silence_logs=logging.ERROR) as local:
            try:
                yield local.scheduler_address
            finally:  # our client first: left open, it would log an error trying to reach the closed scheduler
                made = _clients.pop(local.scheduler_address, None)
                if made is not None:
                    made.close()


def sweep(
    name: str, function: Callable[..., T], model: Model, pieces: Sequence[P], *, progress: bool = False,
    **shared: Any,
) -> list[T]:
    """``[function(model, piece, **shared) for piece in pieces]``, run here or on the cluster in force
    (:func:`settings`), each finished piece kept in the store when there is one (see the module docstring).

    Args:
        name: the sweep's name (the store's folder, the progress bar, errors).
        function: a module-level function ``(model, piece, **shared) -> result`` (a worker imports it by name).
        model: the model; a worker loads its own copy from ``model.recipe``.
        pieces: the independent pieces, e.g. ranges of prompts or chunks of grid points.
        progress: show a progress bar over the pieces.
        **shared: arguments every piece gets (sent to a cluster once).

    Returns:
        The results, in the order of ``pieces``.
    """
    start = time.perf_counter()
    where = settings()
    pieces = list(pieces)
    digests = _digests(name, function, model, pieces, shared) if where.store is not None else [None] * len(pieces)
    results: list[Any] = [None] * len(pieces)
    todo = []
    for i, digest in enumerate(digests):
        found, value = cache.read(_path(where.store, name, digest)) if digest else (False, None)
        if found:
            results[i] = value
        else:
            todo.append(i)
    with tqdm(total=len(pieces), initial=len(pieces) - len(todo), desc=name, disable=not progress,
              unit="piece", leave=False) as bar:
        if where.scheduler is None:
            for i in todo:
                results[i] = _compute(function, model, pieces[i], shared, where.store, name, digests[i])
                bar.update()
        else:
            _on_cluster(where, name, function, model, pieces, shared, digests, todo, results, bar)
    items = sum(len(p) if hasattr(p, "__len__") else 1 for p in pieces)
    report = Report(name, len(pieces), items, len(todo), len(pieces) - len(todo), where.scheduler,
                    time.perf_counter() - start)
    history.append(report)
    if where.store is not None:
        with open(Path(where.store) / LOG, "a") as log:
            log.write(json.dumps({**report.__dict__, "host": socket.gethostname(), "pid": os.getpid(),
                                  "at": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n")
    return results


def _digests(name: str, function: Callable, model: Model, pieces: list, shared: dict) -> list[str]:
    base = cache.fingerprint({"sweep": name, "function": f"{function.__module__}.{function.__qualname__}",
                              "model": model, "shared": shared})
    return [cache.fingerprint({"sweep": base, "piece": piece}) for piece in pieces]


def _path(store: Path | None, name: str, digest: str | None) -> Path:
    return Path(store) / name / f"{digest}.pt"


def _compute(function: Callable, model: Model, piece: Any, shared: dict, store: Path | None, name: str,
             digest: str | None) -> Any:
    """One piece, in this process: computed, then written to the store (when there is one) before it is returned."""
    token = _inside_piece.set(True)
    try:
        value = function(model, piece, **shared)
    finally:
        _inside_piece.reset(token)
    if store is not None and digest is not None:
        cache.write(_path(store, name, digest), value)
    return value


def _on_worker(recipe: tuple, weights_id: str, function: Callable, piece: Any, shared: dict, store: Path | None,
               name: str, digest: str | None) -> Any:
    """One piece on a Dask worker: the model from this worker's own copy (loaded once), then :func:`_compute`."""
    from headcircuits.models import reload

    os.environ["TQDM_DISABLE"] = "1"  # a worker's bars would interleave in the log of whoever started it
    model = _models.get(recipe)
    if model is None:
        reuse_freed_memory()
        model = _models[recipe] = reload(recipe)
    if model.weights_id != weights_id:
        raise SweepError(f"this worker's copy of {model.name} is not the one the sweep runs on ({model.weights_id} "
                         f"here, {weights_id} there): give every worker the same model files")
    return _compute(function, model, piece, shared, store, name, digest)


#: glibc's ``mallopt`` parameters (``malloc.h``) and what a worker sets them to: up to 32 MiB (glibc's largest
#: mmap threshold) allocated from the heap, up to 256 MiB of freed heap kept for the next piece
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
WORKER_MALLOC = {_M_MMAP_THRESHOLD: 32 * 2**20, _M_TRIM_THRESHOLD: 256 * 2**20}


def reuse_freed_memory() -> bool:
    """Undo, in a worker process, the allocator setting that Dask's nanny gives it: ``MALLOC_TRIM_THRESHOLD_=65536``
    (``distributed.nanny.pre-spawn-environ``) also turns off glibc's growing mmap threshold, so every tensor over
    128 KiB is mapped from the kernel and zeroed again at each allocation. Measured on SmolLM2 (3 forward passes of
    16 IOI prompts, one thread): 18x the page faults (200,576 against 11,380) and 1.63 s of CPU against 1.14 s
    without the setting; with :data:`WORKER_MALLOC`, 9,649 faults and 1.26 s. Returns whether it applied (only in a
    process started with that variable, on glibc)."""
    if "MALLOC_TRIM_THRESHOLD_" not in os.environ:
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: its allocator does not read the variable either
        return False
    return all(libc.mallopt(option, value) == 1 for option, value in WORKER_MALLOC.items())


def allocator_env() -> dict[str, str]:
    """The environment that gives a process started from this one :data:`WORKER_MALLOC` from its start: a chapter's
    notebook kernel, started by a job on a worker, would otherwise inherit the nanny's ``MALLOC_TRIM_THRESHOLD_``
    (see :func:`reuse_freed_memory`) for the model work it does itself. Empty where this process lacks that
    variable."""
    if "MALLOC_TRIM_THRESHOLD_" not in os.environ:
        return {}
    return {"MALLOC_MMAP_THRESHOLD_": str(WORKER_MALLOC[_M_MMAP_THRESHOLD]),
            "MALLOC_TRIM_THRESHOLD_": str(WORKER_MALLOC[_M_TRIM_THRESHOLD])}


def _on_cluster(where: Settings, name, function, model: Model, pieces, shared, digests, todo, results, bar) -> None:
    if not model.recipe:
        raise SweepError(f"{name}: the model {model.name} was not made by models.load_model, so a worker cannot "
                         "load it; run this sweep without a cluster")
    if not todo:
        return
    from distributed import as_completed

    dask = client(where.scheduler)
    with warnings.catch_warnings():  # the shared arguments travel inside the graph on purpose (see below)
        warnings.filterwarnings("ignore", message="Large object of size", category=UserWarning)
        # a task, not scattered data: if the worker holding it dies, the scheduler makes it again from its spec
        sent = dask.submit(_identity, shared, pure=False, key=f"{name}-shared-{os.urandom(8).hex()}")
    futures = {dask.submit(_on_worker, model.recipe, model.weights_id, function, pieces[i], sent, where.store, name,
                           digests[i], pure=False, key=f"{name}-{i}-{os.urandom(8).hex()}"): i
               for i in todo}
    done, failed = len(pieces) - len(todo), []
    try:
        for future in as_completed(futures, loop=dask.loop):
            i = futures[future]
            try:
                results[i] = future.result()
            except Exception as exc:  # every piece that can still finish does, then the first real cause is named
                failed.append((isinstance(exc, CancelledError), i, exc))
                continue
            done += 1
            bar.update()
    finally:
        for future in futures:
            future.cancel()
        sent.release()
    if failed:
        _, i, exc = min(failed, key=lambda f: (f[0], f[1]))
        kept = f"; the {done} finished pieces are kept in {where.store}" if where.store else ""
        raise SweepError(f"{name}: piece {i} of {len(pieces)} ({_short(pieces[i])}) failed on the cluster at "
                         f"{where.scheduler}: {type(exc).__name__}: {exc}{kept}") from exc


def _identity(value: Any) -> Any:
    return value


def _short(piece: Any) -> str:
    text = repr(piece)
    return text if len(text) <= 80 else text[:77] + "..."


def rows_of(data: TaskData, rows: range) -> TaskData:
    """The prompts of one piece: ``data`` itself when the piece is every prompt (so that the engine's kept passes
    of ``data`` serve it), else :meth:`TaskData.subset`."""
    return data if len(rows) == len(data) else data.subset(list(rows))


def ranges(n: int, size: int) -> list[range]:
    """``range(0, n)`` cut into consecutive pieces of at most ``size`` (e.g. prompts in batches)."""
    if size < 1:
        raise ValueError(f"a piece holds at least one item, not {size}")
    return [range(i, min(i + size, n)) for i in range(0, n, size)]
