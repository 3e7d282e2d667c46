"""Command line: ``headcircuits prepare-models | build-book | reproduce | check-offline``."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="headcircuits", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare-models", help="dequantise and cache the offline models")
    prep.add_argument("names", nargs="*", help="offline model names (default: all)")
    prep.add_argument("--force", action="store_true", help="rebuild even if the cache is intact")
    prep.add_argument("--quick", action="store_true",
                      help="trust files whose size and time match the manifest (loading does this); default: sha256")
    bk = sub.add_parser("build-book", help="execute every notebook with papermill and render the book")
    bk.add_argument("--root", type=Path, default=Path.cwd(), help="repository root (default: .)")
    bk.add_argument("--out", type=Path, default=Path("."),
                    help="directory that receives _build/ (default: .; the site is then _build/html)")
    bk.add_argument("-p", "--parameter", action="append", default=[], metavar="KEY=VALUE",
                    help="notebook parameter override, e.g. -p model_names=gemma-3-270m -p n_prompts=50 "
                         "(a parameter that no notebook declares is an error that lists the valid ones)")
    bk.add_argument("--scorecard", type=Path, default=None, metavar="DIR",
                    help="the --out folder of a `headcircuits reproduce` run: its verdicts become a column of the "
                         "book's scorecard, labelled with its provenance")
    rep = sub.add_parser("reproduce", help="the chapters' experiments at the book's or the papers' scale, with a "
                                           "scorecard, here or on a Dask cluster")
    rep.add_argument("--models", default="smollm2-135m",
                     help="zoo names or local model folders, comma-separated (default: smollm2-135m)")
    rep.add_argument("--scale", default="book", help="book (the book's sizes) or paper (every size the papers "
                                                     "state; ours where they are silent)")
    rep.add_argument("--out", type=Path, default=Path("reproduction"),
                     help="results, logs, executed chapters and the scorecard (default: ./reproduction)")
    rep.add_argument("--cluster", default="none",
                     help="none (this process), local[:N] (a Dask LocalCluster of N workers on 127.0.0.1) or "
                          "tcp://HOST:PORT (an existing Dask scheduler)")
    rep.add_argument("--chapters", default=None, help="only these chapters, comma-separated (e.g. 02,03)")
    rep.add_argument("-p", "--parameter", action="append", default=[], metavar="KEY=VALUE",
                     help="a notebook parameter for every chapter that declares it, over the scale's")
    rep.add_argument("--dry-run", action="store_true",
                     help="list the jobs and their measured cost, predict the wall time; run nothing")
    rep.add_argument("--root", type=Path, default=Path.cwd(), help="repository root (default: .)")
    chk = sub.add_parser("check-offline", help="list everything in a built site that would load from the network")
    chk.add_argument("html_dir", type=Path)
    args = parser.parse_args(argv)
    from headcircuits.errors import HeadcircuitsError

    try:
        return _run(args)
    except (HeadcircuitsError, FileNotFoundError) as exc:  # our own errors name the fix: no traceback
        print(f"headcircuits {args.command}: {exc}", file=sys.stderr)
        return 2


def _run(args) -> int:
    if args.command == "prepare-models":
        from headcircuits.models import prepare_offline_models

        start = time.perf_counter()
        for name, path in prepare_offline_models(args.names or None, force=args.force,
                                                 full_check=not args.quick).items():
            print(f"{name}: {path}")
        print(f"offline models ready in {time.perf_counter() - start:.1f} s")
        return 0
    if args.command == "build-book":
        from headcircuits import book, execution

        parameters = execution.parse_parameters(args.parameter)
        execution.check_parameters(execution.notebooks_in_toc(args.root.resolve()), parameters)  # before any slow work
        run = None
        if args.scorecard is not None:
            from headcircuits import scorecard

            run = scorecard.load(args.scorecard)
        html = book.build(args.root.resolve(), args.out.resolve(), parameters, run=run)
        problems = book.scan_offline(html) + book.scan_offline(html.parent / "html-instructor")
        if problems:
            print("pages would load from the network:\n  " + "\n  ".join(problems), file=sys.stderr)
            return 1
        return 0
    if args.command == "reproduce":
        from headcircuits import reproduce

        return reproduce.main(args)
    if args.command == "check-offline":
        from headcircuits import book

        problems = book.scan_offline(args.html_dir)
        print("\n".join(problems) if problems else "offline: no page loads anything from the network")
        return 1 if problems else 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
