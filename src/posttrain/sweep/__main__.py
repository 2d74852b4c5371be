"""``python -m posttrain.sweep status DIR`` / ``python -m posttrain.sweep wait DIR [--interval S] [--timeout S]``.

status: one row per cell of DIR/sweep.json (cell, state, job id, elapsed, main metric), then the line
        ``completed=N failed=N cancelled=N running=N pending=N missing=N``.
wait:   blocks until no cell is pending or running (progress bar on stderr); exit 0 when every cell completed,
        1 otherwise (or on --timeout).
Both exit 2 when DIR has no sweep.json.
"""

from __future__ import annotations

import argparse
import sys

from posttrain.sweep.status import cmd_status, cmd_wait


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m posttrain.sweep", description="Inspect a sweep directory.")
    sub = parser.add_subparsers(dest="command", required=True)
    p_status = sub.add_parser("status", help="where every cell of the sweep stands")
    p_status.add_argument("dir", help="the sweep directory (holds sweep.json)")
    p_wait = sub.add_parser("wait", help="block until no cell is pending or running")
    p_wait.add_argument("dir", help="the sweep directory (holds sweep.json)")
    p_wait.add_argument("--interval", type=float, default=10.0, metavar="S", help="seconds between polls (10)")
    p_wait.add_argument("--timeout", type=float, default=None, metavar="S", help="give up after S seconds (exit 1)")
    args = parser.parse_args(argv)
    if args.command == "status":
        return cmd_status(args.dir)
    return cmd_wait(args.dir, interval=max(0.1, args.interval), timeout=args.timeout)


if __name__ == "__main__":
    sys.exit(main())
