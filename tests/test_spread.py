"""Sweeps in pieces (headcircuits.spread): a two-worker Dask LocalCluster on 127.0.0.1 gives exactly the serial
results, a killed worker loses nothing, a second run computes nothing, and every bad input gets a clear error."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import cloudpickle
import pytest
import torch

import pandas as pd

from headcircuits import channels, inhibition, path_patching, repair, scoring, spread, traversal, weights
from headcircuits.errors import ClusterError, SweepError
from headcircuits.models import load_model
from headcircuits.tasks import colored_objects, ioi, laundry_list

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import the tests


def _square(model, piece, *, delay=0.0, fail=None, die=None):
    """A piece: ``piece`` squared plus the model's layer count (so a worker must have loaded the same model)."""
    if piece == fail:
        raise ValueError(f"piece {piece} is broken")
    if piece == die:
        os._exit(1)  # the worker process dies
    time.sleep(delay)
    return torch.tensor(float(piece)) ** 2 + model.facts.n_layers


@pytest.fixture(scope="module")
def cluster():
    """A LocalCluster of two single-threaded worker processes on 127.0.0.1 (the one `reproduce` starts)."""
    with spread.local_cluster(2) as address:
        yield address


@pytest.fixture(scope="module")
def model():
    return load_model("tiny-llama")


def test_a_two_worker_cluster_gives_the_serial_results_bit_for_bit(cluster, model, monkeypatch):
    """Path patching (prompts in pieces of 3, k receivers: the worker builds the ungrouped copy itself), the
    traversal (points in pieces of 2) and component effects (components in pieces of 8) on two worker processes
    equal the serial run exactly: the same pieces, batched the same way."""
    monkeypatch.setenv("HEADCIRCUITS_NO_CACHE", "1")  # every sweep computed, none read from the results cache
    data = ioi.generate(model, 7, seed=0, counterfactual="abc")
    receivers = path_patching.Receivers("k", heads=((2, 0), (2, 3)), position="END")
    w = weights.from_model(model)
    ll = laundry_list.generate(model, 4, seed=0, lengths=[3, 4])
    channel = channels.Channel.pick(w, {(0, 1): [0], (1, 2): [1]}, offsets=weights.value_offsets(model))
    points = torch.tensor([[0.0, 0.0], [2.0, -1.0], [-3.0, 1.5]])

    co = colored_objects.generate(model, 7, seed=0)
    monkeypatch.setattr(scoring, "PROMPTS_PER_PIECE", 3)  # scoring and the repair in pieces of 3 prompts

    def sweeps():
        repaired = repair.repair(model, co, {"two": ((1, 0), (2, 1))}, n_controls=2, exclude=set(), per_prompt=True)
        return (path_patching.path_patch(model, data, receivers, prompts_per_piece=3, progress=False),
                traversal.traverse(model, ll, channel, points, (2, 0), ["ITEM_0", "ITEM_1"], points_per_run=2,
                                   progress=False),
                inhibition.component_effects(model, data, w, (1, 0), (2, 1), components=list(range(10))),
                torch.tensor(scoring.evaluate(model, ll).margin.to_numpy()),
                torch.tensor(pd.concat(repaired[1].values()).margin.to_numpy()))

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as a worker (Dask starts them with OMP_NUM_THREADS=1): the same order of float sums
    try:
        serial = sweeps()
    finally:
        torch.set_num_threads(threads)
    spread.history.clear()
    with spread.use(cluster):
        spread_ = sweeps()
    assert [(r.name, r.pieces, r.computed, r.scheduler) for r in spread.history] == [
        ("repair", 3, 3, cluster), ("path_patch", 3, 3, cluster), ("traversal", 2, 2, cluster),
        ("component_effects", 2, 2, cluster), ("evaluate", 3, 3, cluster)]
    for a, b in zip(serial, spread_):
        assert torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0))
    # another cut into pieces batches the sums differently: equal within float rounding, not bit for bit. The
    # normalised effect divides by the random model's small clean-vs-counterfactual gap, which magnifies ~1e-7
    # differences of the logit differences to ~1e-6 here (0.5 % of the largest effect); prompts gathered in the
    # wrong order would change the effects by about their own size
    whole = path_patching.path_patch(model, data, receivers, progress=False)
    size = serial[0].nan_to_num().abs().max()
    assert size > 1e-4 and (whole - serial[0]).nan_to_num().abs().max() < 2e-2 * size, (whole, serial[0])
    monkeypatch.setattr(scoring, "PROMPTS_PER_PIECE", 500)  # scored as one piece: the same margins to 1e-5
    one = torch.tensor(scoring.evaluate(model, ll).margin.to_numpy())
    assert (one - serial[3]).abs().max() < 1e-5 < one.abs().max()
    assert list(scoring.evaluate(model, ll).index) == list(range(len(ll)))


def test_a_worker_killed_mid_sweep_loses_nothing_and_a_second_run_computes_nothing(model, tmp_path):
    serial = spread.sweep("squares", _square, model, list(range(8)))
    with spread.local_cluster(2) as address:
        pids = list(spread.client(address).run(os.getpid).values())
        killer = threading.Timer(1.2, os.kill, (pids[0], signal.SIGKILL))
        killer.start()
        with spread.use(address, tmp_path):
            got = spread.sweep("squares", _square, model, list(range(8)), delay=0.5)
        killer.join()
        assert spread.history[-1].computed == 8
        with spread.use(address, tmp_path):
            again = spread.sweep("squares", _square, model, list(range(8)), delay=0.5)
        ours = spread.client(address)
    # the cluster closed its client with it (left open, the client logs an error when it cannot reconnect)
    assert ours.status == "closed" and address not in spread._clients
    assert all(torch.equal(a, b) for a, b in zip(serial, got)) and all(torch.equal(a, b) for a, b in zip(got, again))
    assert (spread.history[-1].computed, spread.history[-1].stored) == (0, 8)
    assert len(list((tmp_path / "squares").glob("*.pt"))) == 8
    # the serial path reads the same store: a third run, without a cluster, computes nothing either
    with spread.use(None, tmp_path):
        spread.sweep("squares", _square, model, list(range(8)), delay=0.5)
    assert spread.history[-1].computed == 0
    # another shared argument, another key: computed again
    with spread.use(None, tmp_path):
        spread.sweep("squares", _square, model, list(range(2)), delay=0.0)
    assert spread.history[-1].computed == 2


def test_a_failing_piece_stops_the_sweep_naming_it_and_the_finished_ones_are_kept(cluster, model, tmp_path):
    with spread.use(cluster, tmp_path), pytest.raises(SweepError, match=r"squares: piece 3 of 6 \(3\).*ValueError: "
                                                                        r"piece 3 is broken"):
        spread.sweep("squares", _square, model, list(range(6)), fail=3)
    with spread.use(None, tmp_path), pytest.raises(ValueError, match="piece 3 is broken"):
        spread.sweep("squares", _square, model, list(range(6)), fail=3)
    # every other piece finished and is kept: only the broken one is computed again (and fails again)
    assert len(list((tmp_path / "squares").glob("*.pt"))) == 5


def test_a_piece_whose_worker_keeps_dying_stops_the_run_after_the_retries(model, tmp_path):
    with spread.local_cluster(2) as address, spread.use(address, tmp_path):
        start = time.perf_counter()
        # the scheduler counts the pieces queued on a dying worker too, so the piece named may be another one
        with pytest.raises(SweepError, match=r"squares: piece \d of 3 \(\d\) failed on the cluster.*KilledWorker: "
                                             r".*on 4 different workers"):
            spread.sweep("squares", _square, model, [0, 1, 2], die=1)
        assert time.perf_counter() - start < 120


def test_an_unreachable_scheduler_fails_within_seconds_naming_the_address():
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.perf_counter()
    with pytest.raises(ClusterError, match=f"tcp://127.0.0.1:{port}.*dask scheduler"):
        with spread.use(f"tcp://127.0.0.1:{port}"):
            pass
    assert time.perf_counter() - start < 5
    with pytest.raises(ClusterError, match="tcp://HOST:PORT"):
        spread.check_reachable("127.0.0.1:8786")


def test_a_model_no_worker_can_load_is_refused_on_a_cluster(cluster, model):
    import dataclasses

    by_hand = dataclasses.replace(model, recipe=())
    with spread.use(cluster), pytest.raises(SweepError, match="not made by models.load_model"):
        spread.sweep("squares", _square, by_hand, [0, 1])
    assert len(spread.sweep("squares", _square, by_hand, [0, 1])) == 2  # here it runs
    with pytest.raises(ValueError, match="at least one"):
        spread.ranges(5, 0)
    assert spread.ranges(7, 3) == [range(0, 3), range(3, 6), range(6, 7)]


FAULTS = """
import resource, torch
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(100):
    x = torch.ones(2**18)  # 1 MiB, freed at once
    del x
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(model, piece):
    """Page faults of allocating and freeing 100 tensors of 1 MiB in this process (a worker's)."""
    scope: dict = {}
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        exec(FAULTS, scope)
    return int(printed.getvalue()), os.environ.get("MALLOC_TRIM_THRESHOLD_")


def test_a_worker_reuses_freed_memory_despite_the_nannys_malloc_setting(cluster, model):
    """Dask's nanny starts workers with MALLOC_TRIM_THRESHOLD_=65536, which makes glibc map (and zero) every
    tensor over 128 KiB anew: a process started that way faults 256 pages per 1 MiB tensor; a worker that has
    run a piece (spread.reuse_freed_memory) reuses its heap."""
    plain = subprocess.run([sys.executable, "-c", FAULTS], capture_output=True, text=True, check=True,
                           env={**os.environ, "MALLOC_TRIM_THRESHOLD_": "65536"})
    assert int(plain.stdout) > 100 * 200  # the setting's cost, without the fix: ~256 faults per tensor
    with spread.use(cluster):
        results = spread.sweep("faults", _faults, model, [0, 1, 2, 3])
    assert all(setting == "65536" for _, setting in results)  # the nanny did set it on these workers
    assert all(faults < 1000 for faults, _ in results), results


def test_a_chapters_kernel_started_by_a_worker_gets_the_workers_allocator_setting(monkeypatch, tmp_path):
    """A job on a worker starts the chapter's notebook kernel; the kernel does model work of its own, so it must
    not inherit the nanny's setting. A fresh process faults ~2,350 times on the loop (torch's first tensor included);
    with the inherited setting ~25,700; with the environment reproduce._job gives the kernel, no more than unset."""
    from headcircuits import execution, reproduce

    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "65536")  # as on a worker that Dask's nanny started
    given = {}
    monkeypatch.setattr(execution, "execute", lambda src, dst, parameters, env, **_: given.update(env))
    reproduce._job("src.ipynb", str(tmp_path / "dst.ipynb"), {}, {"HEADCIRCUITS_RESULTS": "r"}, str(tmp_path / "log"))
    assert given["HEADCIRCUITS_RESULTS"] == "r"  # the job's own variables kept

    def faults(env):
        run = subprocess.run([sys.executable, "-c", FAULTS], capture_output=True, text=True, check=True, env=env)
        return int(run.stdout)

    unset = faults({k: v for k, v in os.environ.items() if k != "MALLOC_TRIM_THRESHOLD_"})  # ~2,350: torch's start
    assert faults(dict(os.environ)) > 10 * unset  # inherited: ~25,700
    assert faults({**os.environ, **given}) <= 1.2 * unset  # given: ~2,100
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_")
    assert spread.allocator_env() == {}  # a process the nanny did not start passes nothing on
