"""Formatting helpers, constants and the user-error type shared by the report modules (docs/design.md, "Report")."""

from __future__ import annotations

import math
import re
from typing import Iterable, Sequence

import numpy as np

from posttrain import results as _results

#: Runs stopped by Ctrl-C / SIGTERM (docs/design.md "result.json"): listed with the failed runs, never a result.
CANCELLED = getattr(_results, "CANCELLED", "cancelled")

DEFAULT_METRICS = ("gsm8k/exact_match,strict-match", "synth_gsm8k/exact_match,strict-match")
KNOWN_SCALES = ("tiny-s", "tiny-m", "tiny-l", "0.5b", "1.5b", "3b", "7b")
#: The metric that stands for a task in the cross-domain spread when --metric names none of that task's.
TASK_METRIC_PRIORITY = (
    "exact_match,strict-match", "acc_norm,none", "acc,none", "exact_match,none", "exact_match,flexible-extract",
    "math_verify,none",
)
#: lm-eval metrics where lower is better (everything else: higher is better).
LOWER_IS_BETTER = ("perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte")
LORA_ORDER = ("off", "on")
PLOTS_DIR = "plots"
TRAIN_FIELDS = ("tokens", "seconds", "steps", "tokens_per_s", "final_loss")
MAX_INVERSION_ROWS = 40


class UserError(Exception):
    """A problem with the user's input: printed as one line, exit status 2."""


# ------------------------------------------------------------------------------------------------ helpers


def scale_key(scale: str) -> tuple:
    """Order scales: the named ones in docs/design.md's order, then others by parameter count, then by name."""
    if scale in KNOWN_SCALES:
        return (0, KNOWN_SCALES.index(scale), 0.0, scale)
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([mb])", str(scale).lower())
    if m:
        return (1, 0, float(m.group(1)) * (1e-3 if m.group(2) == "m" else 1.0), scale)
    return (2, 0, 0.0, str(scale))


def is_stderr(metric: str) -> bool:
    """lm-eval's standard-error entries (``exact_match_stderr,strict-match``) are never compared."""
    name = metric.split("/", 1)[-1]
    return name.split(",", 1)[0].endswith("_stderr")


def lower_is_better(metric: str) -> bool:
    return metric.split("/", 1)[-1].split(",", 1)[0] in LOWER_IS_BETTER


def _lora(value: object) -> str:
    if isinstance(value, str):
        return "on" if value.strip().lower() in ("on", "true", "1", "yes") else "off"
    return "on" if bool(value) else "off"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")


def _num(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return math.nan
    return float(value)


def _curve(points: object) -> list[tuple[float, float]]:
    out = []
    for point in points or []:
        if isinstance(point, (list, tuple)) and len(point) == 2:
            step, val = _num(point[0]), _num(point[1])
            if math.isfinite(step) and math.isfinite(val):
                out.append((step, val))
    return out


def f4(x: float) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.4f}"


def fp(p: float) -> str:
    if p is None or not math.isfinite(p):
        return "n/a"
    return f"{p:.2e}" if p < 1e-3 else f"{p:.4f}"


def f2(x: float) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.2f}"


def f3(x: float) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.3f}"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _mean_sd(x: np.ndarray) -> str:
    if x.size == 0:
        return "—"
    return f"{x.mean():.4f} ± {x.std(ddof=1):.4f} (n={x.size})" if x.size > 1 else f"{x.mean():.4f} (n=1)"


def md_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> list[str]:
    def cell(v: object) -> str:
        return str(v).replace("|", "\\|").replace("\n", " ")
    lines = ["| " + " | ".join(cell(h) for h in headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return lines



def plots():
    """:mod:`posttrain.report_plots`, imported only when a report is drawn (matplotlib is slow to import)."""
    from posttrain import report_plots
    return report_plots
