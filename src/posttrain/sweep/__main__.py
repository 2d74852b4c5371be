"""``python -m posttrain.sweep status DIR`` / ``python -m posttrain.sweep wait DIR [--interval S] [--timeout S]`` /
``python -m posttrain.sweep prefetch [sweep=NAME] [OVERRIDES...]``.

status: one row per cell of DIR/sweep.json (cell, state, job id, elapsed, main metric), then the line
        ``completed=N failed=N cancelled=N running=N pending=N missing=N``.
wait:   blocks until no cell is pending or running (progress bar on stderr); exit 0 when every cell completed,
        1 otherwise (or on --timeout).
Both exit 2 when DIR has no sweep.json.
prefetch: everything the launch's cells need (models, tokenizers, datasets, lm-eval task data, the MATH scoring
        runtime) in the mirror (``mirror=DIR`` or POSTTRAIN_MIRROR), downloaded where the hub is reachable, else
        listed one line each; exit 0 when all is there, 1 when something is missing, 2 on a usage error
        (posttrain.sweep.prefetch).
plan:   runs, tokens and estimated GPU-hours per scale, with and without the shared per-scale caches
        (posttrain.sweep.plan).
"""

from __future__ import annotations

import argparse
import sys

from posttrain.sweep.status import cmd_status, cmd_wait


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m posttrain.sweep",
                                     description="Inspect a sweep directory; fill the mirror for its cells.")
    sub = parser.add_subparsers(dest="command", required=True)
    p_status = sub.add_parser("status", help="where every cell of the sweep stands")
    p_status.add_argument("dir", help="the sweep directory (holds sweep.json)")
    p_wait = sub.add_parser("wait", help="block until no cell is pending or running")
    p_wait.add_argument("dir", help="the sweep directory (holds sweep.json)")
    p_wait.add_argument("--interval", type=float, default=10.0, metavar="S", help="seconds between polls (10)")
    p_wait.add_argument("--timeout", type=float, default=None, metavar="S", help="give up after S seconds (exit 1)")
    p_prefetch = sub.add_parser("prefetch", help="put everything the cells need into the mirror, or list it")
    p_prefetch.add_argument("overrides", nargs=argparse.REMAINDER, metavar="KEY=VALUE",
                            help="as for `python launch.py -m`: sweep=NAME, algo=dpo,simpo scale=0.5b,7b seed=0-4, "
                                 "mirror=DIR")
    p_plan = sub.add_parser("plan", help="tokens and estimated GPU-hours, with and without the shared caches",
                            add_help=False)
    p_plan.add_argument("overrides", nargs=argparse.REMAINDER, help="sweep=NAME, KEY=VALUE, --mfu F ... (--help)")
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["plan"]:  # its own options (--mfu, --help, ...) may come first
        from posttrain.sweep.plan import main as plan

        return plan(argv[1:])
    args = parser.parse_args(argv)
    if args.command == "prefetch":
        from posttrain.sweep.prefetch import prefetch

        return prefetch(args.overrides)
    if args.command == "status":
        return cmd_status(args.dir)
    return cmd_wait(args.dir, interval=max(0.1, args.interval), timeout=args.timeout)


if __name__ == "__main__":
    sys.exit(main())
