"""How far the cached reference log-probs are from the loop's own forward, by precision (issue 14; docs/training.md,
"Shared per-scale work").

    python bench/reference_noise.py --scale cpu-s --out bench/results/reference_noise.jsonl

The per-scale cache scores each (prompt, completion) row in a no-grad pass over rows sorted by length
(posttrain.algorithms.reference_cache); the loop then computes the policy's log-probs on its own micro-batches (chosen
and rejected together, behind one prompt copy with ``trainer.shared_prompt``). At the first step the policy is the
reference, so DPO's implicit rewards would be exactly 0 with an in-loop reference forward on the same batch; with the
cached values they are the rounding difference of two batch compositions. This measures that difference on the
benchmark's random-init Qwen2 and synthetic pairs (bench/throughput.py), per precision and shared-prompt setting:
the sequence log-prob gap |policy - cached| in nats (max, mean) and DPO's first-step margin beta * ((pi_c - ref_c) -
(pi_r - ref_r)) and loss - log 2.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from throughput import SCALES, build_model, synthetic_pairs  # noqa: E402
from throughput_arms import append_lines  # noqa: E402


def measure(model, tokenizer, pairs, scale, precision: str, shared: bool, beta: float) -> dict:
    from posttrain.algorithms import reference_cache
    from posttrain.data.collate import collate
    from posttrain.models.logps import shared_token_logps
    from posttrain.models.precision import Precision

    autocast = lambda: Precision.from_config(precision).autocast("cpu")  # noqa: E731
    micro, max_length = scale["micro"], scale["max_length"]
    table = reference_cache.score_rows(model, tokenizer, reference_cache.rows("pairs", pairs), max_length=max_length,
                                       batch_size=2 * micro, autocast=autocast, progress=False)
    examples = reference_cache.attach("pairs", pairs, table)
    gaps, margins, losses = [], [], []
    with torch.no_grad():
        for start in range(0, len(examples), micro):
            batch = collate("pairs", tokenizer, examples[start:start + micro], max_length)
            with autocast():
                lp = shared_token_logps(model, batch["input_ids"], batch["attention_mask"],
                                        batch["completion_mask"], shared_prompt=shared)
            seq = lp.sum(-1)
            n, cached = batch["pairs"], batch["ref_seq_logps"]
            gap = seq - cached
            margin = beta * (gap[:n] - gap[n:])
            gaps.append(gap.abs()), margins.append(margin.abs())
            losses.append(-torch.nn.functional.logsigmoid(margin) - math.log(2))
    gaps, margins, losses = torch.cat(gaps), torch.cat(margins), torch.cat(losses)
    return {"precision": precision, "shared_prompt": shared, "pairs": len(examples), "beta": beta,
            "seq_gap_max": round(float(gaps.max()), 6), "seq_gap_mean": round(float(gaps.mean()), 6),
            "margin_abs_max": round(float(margins.max()), 6), "margin_abs_mean": round(float(margins.mean()), 6),
            "loss_minus_log2_mean": round(float(losses.mean()), 8)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", default="cpu-s", help=f"one of {sorted(SCALES)}")
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--precisions", default="fp32,bf16-mixed")
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--out", required=True, help="JSON lines, appended: one per precision and setting")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    if args.scale not in SCALES:
        raise SystemExit(f"unknown --scale {args.scale!r}; known: {sorted(SCALES)}")
    torch.set_num_threads(args.threads)
    from posttrain.data.tokenizer import build_char_tokenizer

    scale = SCALES[args.scale]
    tokenizer = build_char_tokenizer(Path(os.environ.get("TMPDIR", "/tmp")) / "bench_char_tokenizer")
    pairs = synthetic_pairs(scale)[:args.pairs]
    model = build_model(scale, len(tokenizer)).eval()
    lines = [{"scale": args.scale, **measure(model, tokenizer, pairs, scale, precision, shared, args.beta)}
             for precision in args.precisions.split(",") for shared in (False, True)]
    print(f"{'precision':<12} {'shared':<7} {'|seq gap| max':>14} {'mean':>10} {'|margin| max':>13} {'mean':>10} "
          f"{'loss-log2':>10}")
    for line in lines:
        print(f"{line['precision']:<12} {str(line['shared_prompt']):<7} {line['seq_gap_max']:>14.6f} "
              f"{line['seq_gap_mean']:>10.6f} {line['margin_abs_max']:>13.6f} {line['margin_abs_mean']:>10.6f} "
              f"{line['loss_minus_log2_mean']:>10.2e}")
    append_lines(Path(args.out), lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
