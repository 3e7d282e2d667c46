"""`headcircuits reproduce`: its plan, every bad input refused before any work (within seconds), the scorecard as
data, as a page and as the book's column, the dry run's cost model, and (slow) the command line against a real
`dask scheduler` and `dask worker` started as subprocesses."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import psutil  # a dependency of distributed, in the lock
import pytest

from headcircuits import cli, costs, execution, report, reproduce, scorecard, stats

ROOT = Path(__file__).resolve().parents[1]
YES = stats.judge(stats.Estimate(0.9, 0.8, 0.95, 200), null=0.5, paper=0.99)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_plan_runs_the_ioi_circuit_first_at_the_papers_sizes():
    jobs = reproduce.plan(["smollm2-135m", "gemma-3-270m"], "paper")
    names = [j.name for j in jobs]
    for j in jobs:
        if j.after is not None:
            assert j.after.startswith("03_ioi_circuit@") and names.index(j.after) < names.index(j.name)
    ch06 = next(j for j in jobs if j.name == "06_laundry_list@gemma-3-270m")
    assert ch06.parameters["n_per_length"] == 250 and ch06.parameters["model_names"] == ["gemma-3-270m"]
    assert next(j for j in jobs if j.name == "05_inhibition_channels@smollm2-135m").parameters["n_components"] is None
    assert all(j.parameters == {"model_names": [j.model]} for j in reproduce.plan(["smollm2-135m"], "book"))
    # every size the scale sets is a parameter its notebook declares, with a source
    for chapter, sizes in reproduce.SCALES["paper"].items():
        declared = execution.declared_parameters(ROOT / "notebooks" / f"{chapter}.ipynb")
        assert set(sizes) <= set(declared), chapter
        assert all(s.source for s in sizes.values())
    table = reproduce.scale_table(ROOT)
    assert "| 06_laundry_list | `n_per_length` | `50` | `250` | Talking Heads §5.1" in table
    assert "*ours: held-out prompts per N for the fix*" in table


@pytest.mark.parametrize("argv, message", [
    (["--scale", "huge"], "unknown scale 'huge': choose one of book, paper"),
    (["--models", "gpt-5"], r"unknown model\(s\) \['gpt-5'\].*Known models"),
    (["--chapters", "09"], r"unknown chapter\(s\) \['09'\]"),
    (["-p", "n_prompt=3"], r"no notebook declares the parameter\(s\) \['n_prompt'\]"),
    (["--cluster", "local:x"], "--cluster is none, local, local:N or tcp://HOST:PORT, not 'local:x'"),
    (["--cluster", "192.168.0.1:8786"], "--cluster is none, local, local:N or tcp://HOST:PORT"),
])
def test_bad_input_is_refused_before_any_work_naming_the_fix(argv, message, tmp_path, capsys):
    start = time.perf_counter()
    assert cli.main(["reproduce", "--out", str(tmp_path / "out"), *argv]) == 2
    import re

    assert re.search(message, capsys.readouterr().err)
    assert time.perf_counter() - start < 10
    assert not (tmp_path / "out" / "notebooks").exists()


def test_an_unreachable_scheduler_and_an_unwritable_out_fail_within_seconds(tmp_path, capsys):
    port = _free_port()
    start = time.perf_counter()
    assert cli.main(["reproduce", "--out", str(tmp_path), "--cluster", f"tcp://127.0.0.1:{port}"]) == 2
    assert f"tcp://127.0.0.1:{port}" in capsys.readouterr().err and time.perf_counter() - start < 10
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert cli.main(["reproduce", "--out", str(blocker / "out")]) == 2
    assert f"--out {blocker / 'out'} is not a writable folder" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        cli.main(["reproduce", "--frobnicate"])
    assert exit_.value.code == 2 and "unrecognized arguments: --frobnicate" in capsys.readouterr().err


def _executed(path: Path, monkeypatch, rows) -> Path:
    """A notebook holding exactly what report.publish displays (as in test_report)."""
    from myst_nb.ext import glue as glue_module

    shown = []
    monkeypatch.setattr(glue_module, "ipy_display", lambda data, raw, metadata: shown.append((data, metadata)))
    report.publish(report.findings(rows))
    cell = nbformat.v4.new_code_cell("report.publish(...)")
    cell.outputs = [nbformat.v4.new_output("display_data", data=d, metadata=m) for d, m in shown]
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nbformat.v4.new_notebook(cells=[cell]), path)
    return path


def test_the_scorecard_as_data_as_a_page_and_as_the_books_column(tmp_path, monkeypatch):
    no = stats.judge(None, preconditions=[stats.require(False, "a mover", "0.01")])
    run = {"02_tasks_and_baselines@m": _executed(tmp_path / "m" / "02_tasks_and_baselines.ipynb", monkeypatch, [
        report.finding("IOI ranks", "m", "99.3% (GPT-2 small)", "90% [80%, 95%]", YES)]),
        "05_inhibition_channels@m": _executed(tmp_path / "m" / "05_inhibition_channels.ipynb", monkeypatch, [
            report.finding("a channel", "m", "-7 % (GPT-2 small)", "-", no)])}
    claims = scorecard.collect(run)
    record = {"seconds": 12.0, "hardware": {"cores": "2", "cpu": "x", "memory": "1 GiB", "gpu": "none"}}
    prov = scorecard.provenance(ROOT, "paper", "local:2", 3600.0, {k: record for k in run})
    data_path, page_path = scorecard.write(tmp_path, claims, prov)
    data = json.loads(data_path.read_text())
    ours = data["claims"][0]["ours"]["m"]
    assert (data["claims"][0]["chapter"], data["claims"][0]["paper_value"]) == ("02_tasks_and_baselines", 0.99)
    assert (ours["estimate"], ours["low"], ours["high"], ours["n"], ours["null"]) == (0.9, 0.8, 0.95, 200, 0.5)
    assert ours["verdict"].startswith("same direction, smaller")
    assert data["claims"][1]["ours"]["m"]["verdict"].startswith("not testable: needs a mover (here 0.01)")
    assert data["claims"][1]["ours"]["m"]["estimate"] is None
    p = data["provenance"]
    assert len(p["commit"]) == 40 and len(p["lock_sha256"]) == 64 and p["scale"] == "paper"
    assert scorecard.label(p).startswith("paper scale, ")
    small = scorecard.provenance(ROOT, "paper", "none", 1.0, {}, {"n_prompts": 16})
    assert scorecard.label(small).startswith("paper scale but n_prompts=16, ")  # a run made smaller says so
    stopped = scorecard.provenance(ROOT, "paper", "none", 1.0, {"a": record}, of=5)
    assert not stopped["complete"] and scorecard.label(stopped).endswith(", incomplete: 1 of 5 chapters")
    assert scorecard.duration(p) == "1.0 h" and p["reused"] == []
    again = scorecard.provenance(ROOT, "paper", "none", 360.0, {"a": record, "b": {**record, "reused": True}})
    assert scorecard.duration(again) == ("0.1 h in its last invocation, which reused 1 of its chapters from earlier "
                                         "ones (b)")
    page = page_path.read_text()
    assert "http" not in page.replace('name="viewport"', "") and "<script" not in page
    assert "same direction, smaller" in page and "width=device-width" in page
    # the book's scorecard: each chapter's glued table becomes the same rows plus the run's two columns
    intro = (ROOT / "book" / "intro.md").read_text()
    book_rows = {"02_tasks_and_baselines": run["02_tasks_and_baselines@m"]}
    with pytest.raises(ValueError, match="did not execute"):
        scorecard.with_run(intro, book_rows, data)
    executed = {Path(nb).stem: nb for nb in run.values()}
    executed.update({c: _executed(tmp_path / "book" / f"{c}.ipynb", monkeypatch, [])
                     for c in ("03_ioi_circuit", "04_circuit_reuse", "06_laundry_list")})
    merged = scorecard.with_run(intro, executed, data)
    assert "{glue:} findings" not in merged and merged.count("```{raw} html") == 5
    assert "ours at the papers&#x27; scale" in merged or "ours at the papers' scale" in merged
    assert "90% [80%, 95%]" in merged and "outcome" not in merged  # the hidden data column stays hidden


def test_the_cost_model_fits_two_slices_and_bounds_the_wall_time():
    job = reproduce.Job("03_ioi_circuit", "m", {"n_prompts": 1000, "model_names": ["m"]})
    defaults = {"n_prompts": "32", "n_eval": "64", "fraction": "0.02"}
    assert costs.sliced(job.parameters, defaults, 50) == {"n_prompts": 20, "n_eval": 8, "model_names": ["m"]}
    assert costs.sliced(job.parameters, defaults, 25)["n_prompts"] == 40
    # 20 and 40 prompts of 1000: 30 s and 50 s in all, 20 s and 40 s of path patching in 1 piece a call
    pp = lambda s: {"path_patch": [{"name": "path_patch", "pieces": 1, "items": s, "seconds": s}]}  # noqa: E731
    cost = costs._fit(job, [(0.02, 30.0, pp(20)), (0.04, 50.0, pp(40))])
    assert cost.seconds == pytest.approx(50 + 1000 * 0.96) and cost.sweeps["path_patch"][1] == 10
    assert cost.sweeps["path_patch"][0] == pytest.approx(1000) and cost.rest == pytest.approx(10)
    assert cost.on(1) == pytest.approx(cost.seconds) and cost.on(10) == pytest.approx(10 + 100)
    # sweeps over prompts gain pieces with them (85 Laundry List prompts at 1/50: 4,250, 9 pieces of 500); a
    # traversal's pieces are grid points, as many at any number of prompts
    assert costs._pieces("evaluate", [{"items": 85, "pieces": 1}], 0.02) == 9
    assert costs._pieces("traversal", [{"items": 1000, "pieces": 4}], 0.02) == 4
    # the rest and the sweeps add up even when the job's own time is noisier than its sweeps'
    noisy = costs._fit(job, [(0.02, 30.0, pp(20)), (0.04, 31.0, pp(40))])
    assert noisy.seconds == pytest.approx(noisy.rest + noisy.sweeps["path_patch"][0])
    assert noisy.rest == pytest.approx(10)
    after = costs.Cost("05@m", job.name, 500.0, {})
    wall, critical = costs.predict([cost, after], 64)
    assert critical == pytest.approx(110 + 500) and wall == critical  # the chain, not the work / 64
    assert costs.predict([cost, after], 1)[0] == pytest.approx(cost.seconds + 500)


@pytest.mark.slow
def test_the_command_line_on_a_real_dask_scheduler_and_worker(tmp_path):
    """`dask scheduler` and `dask worker` as subprocesses (127.0.0.1), then `headcircuits reproduce` against
    them: the scorecard is written; a second run executes no chapter and no piece again."""
    dask = str(Path(sys.executable).with_name("dask"))
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    procs = [subprocess.Popen([dask, "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        for _ in range(60):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.5)
        procs.append(subprocess.Popen([dask, "worker", address, "--nthreads", "1", "--host", "127.0.0.1",
                                       "--no-dashboard"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        command = [str(Path(sys.executable).with_name("headcircuits")), "reproduce", "--models", "smollm2-135m",
                   "--chapters", "03", "-p", "n_prompts=8", "-p", "n_eval=8", "--out", str(tmp_path),
                   "--cluster", address, "--root", str(ROOT)]
        first = subprocess.run(command, capture_output=True, text=True, timeout=900)
        assert first.returncode == 0, first.stdout + first.stderr
        assert "03_ioi_circuit@smollm2-135m: executed in" in first.stdout
        data = json.loads((tmp_path / "scorecard.json").read_text())
        assert data["provenance"]["cluster"] == address and data["claims"]
        logged = [json.loads(line) for line in (tmp_path / "pieces" / "sweeps.jsonl").read_text().splitlines()]
        assert logged and all(r["scheduler"] == address for r in logged) and sum(r["computed"] for r in logged) > 0
        second = subprocess.run(command, capture_output=True, text=True, timeout=900)
        assert second.returncode == 0 and "reused (nothing it depends on changed)" in second.stdout
        again = (tmp_path / "pieces" / "sweeps.jsonl").read_text().splitlines()
        assert len(again) == len(logged)  # the chapter was not executed again: no sweep ran
    finally:
        for proc in reversed(procs):
            proc.terminate()
            proc.wait(timeout=30)
        shutil.rmtree(tmp_path / "results", ignore_errors=True)


@pytest.mark.slow
def test_a_run_stopped_by_sigterm_keeps_what_finished_and_leaves_no_process(tmp_path):
    """SIGTERM (``kill``, a batch system's time limit) while the second chapter runs on a local cluster: the
    command exits (10 s here, at most 2 min) with 128 + 15, says how to go on, writes the scorecard of the chapter that
    finished (marked incomplete), and leaves none of its processes (cluster workers, notebook kernels) behind."""
    command = [str(Path(sys.executable).with_name("headcircuits")), "reproduce", "--models", "smollm2-135m",
               "--chapters", "02,03", "-p", "n_prompts=8", "-p", "n_eval=8", "-p", "list_lengths=[3]",
               "--out", str(tmp_path), "--cluster", "local:1", "--root", str(ROOT)]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        for line in proc.stdout:  # one worker: 02, then 03
            lines.append(line)
            if "03_ioi_circuit@smollm2-135m: started" in line:
                break
        assert any("02_tasks_and_baselines@smollm2-135m: executed in" in line for line in lines), "".join(lines)
        for _ in range(120):  # 03's kernel up on the worker
            kernels = [p for p in psutil.Process(proc.pid).children(recursive=True) if "ipykernel" in " ".join(
                p.cmdline())]
            if kernels:
                break
            time.sleep(0.5)
        assert kernels, "03's notebook kernel never started"
        family = psutil.Process(proc.pid).children(recursive=True)
        began = time.perf_counter()
        proc.terminate()
        rest, _ = proc.communicate(timeout=120)
        stopped_in = time.perf_counter() - began
    finally:
        if proc.poll() is None:
            proc.kill()
    output = "".join(lines) + rest
    assert proc.returncode == 128 + 15, output
    assert stopped_in < 120, f"{stopped_in:.0f} s to stop"  # 10 s here: the cluster shutting its worker down
    assert "stopped by SIGTERM" in output and "run the same command again" in output
    assert "1 of 2 chapters in the scorecard" in output
    data = json.loads((tmp_path / "scorecard.json").read_text())
    assert data["provenance"]["complete"] is False and data["provenance"]["chapters"] == "1 of 2"
    assert {c["chapter"] for c in data["claims"]} == {"02_tasks_and_baselines"}
    _, alive = psutil.wait_procs(family, timeout=30)
    assert not alive, [" ".join(p.cmdline()) for p in alive]
