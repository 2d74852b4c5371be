"""The command line: ``python -m posttrain.report DIR [--metric M] [--baseline ALGO] ... [--wandb]``.

User errors print one line to stderr and exit with status 2 (docs/design.md, "Report").
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from posttrain import stats
from posttrain.report.format import UserError
from posttrain.report.output import build, write
from posttrain.report.wandb_report import log_to_wandb


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse's default prints the usage too)
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise SystemExit(2)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m posttrain.report",
                description="Tables, statistics and plots over every result.json under DIR.")
    p.add_argument("dir", metavar="DIR", help="sweep directory (e.g. outputs/paper)")
    p.add_argument("--metric", action="append", default=None, metavar="M",
                   help="task/metric as lm-eval names it, repeatable (default: every task's primary metric, the "
                        "first it reports of exact_match,strict-match, acc_norm,none, acc,none, ...)")
    p.add_argument("--baseline", default=None, metavar="ALGO",
                   help="compare every variant with this one (default: all pairs)")
    p.add_argument("--alpha", type=float, default=0.05, help="significance level (default 0.05)")
    p.add_argument("--correction", choices=stats.CORRECTIONS, default="bonferroni",
                   help="family-wise correction per (metric, scale, lora) (default bonferroni)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    p.add_argument("--resamples", type=int, default=stats.DEFAULT_RESAMPLES,
                   help=f"bootstrap resamples (default {stats.DEFAULT_RESAMPLES})")
    p.add_argument("--effect", type=float, default=stats.DEFAULT_EFFECT, metavar="E",
                   help="power analysis: the difference (in the metric's units) a comparison should detect; reports "
                        f"the seeds needed for it (default {stats.DEFAULT_EFFECT:g}: 2 points of accuracy)")
    p.add_argument("--power", type=float, default=stats.DEFAULT_POWER,
                   help=f"power analysis: the power asked for (default {stats.DEFAULT_POWER:g})")
    p.add_argument("--wandb", action="store_true",
                   help="also log the report to the sweep's W&B report run and build its dashboard view (offline "
                        "unless WANDB_MODE or the sweep's logger.mode says online)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    prog = parser.prog
    try:
        if not (0.0 < args.alpha < 1.0):
            raise UserError(f"--alpha must be between 0 and 1, got {args.alpha:g}")
        if args.seed < 0:
            raise UserError(f"--seed must be a non-negative integer, got {args.seed}")
        if args.resamples < 0:
            raise UserError(f"--resamples must be a non-negative integer, got {args.resamples}")
        if not args.effect > 0:
            raise UserError(f"--effect must be a positive difference in the metric's units, got {args.effect:g}")
        if not (0.0 < args.power < 1.0):
            raise UserError(f"--power must be between 0 and 1, got {args.power:g}")
        root = Path(args.dir)
        try:
            analysis = build(root, metrics=args.metric, baseline=args.baseline, alpha=args.alpha,
                             correction=args.correction, seed=args.seed, n_resamples=args.resamples,
                             effect=args.effect, power=args.power)
            written = write(root, analysis)
        except OSError as exc:  # unreadable result.json, read-only DIR, full disk
            raise UserError(f"{exc}") from None
        if args.wandb:
            log_to_wandb(root, analysis)
    except UserError as exc:
        sys.stderr.write(f"{prog}: error: {' '.join(str(exc).split())}\n")
        raise SystemExit(2) from None
    n_sig = int(analysis.comparisons["significant"].sum()) if not analysis.comparisons.empty else 0
    print(f"wrote {root / 'report.md'} ({len(analysis.summary)} runs, {len(analysis.comparisons)} comparisons, "
          f"{n_sig} significant, {len(analysis.plots)} plots; {len(written)} files)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
