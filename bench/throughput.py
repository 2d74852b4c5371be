"""Training throughput of the project's pairwise objective against TRL's DPOTrainer (issue 14, "Benchmarks").

    python bench/throughput.py --device cpu --scale cpu-s --algo dpo --out bench/results/throughput_cpu.jsonl
    python bench/throughput.py --device cuda --scale 0.5b --algo dpo --out bench/results/throughput_cuda.jsonl

In one process, on the same random-init Qwen2, the same synthetic pairs in the same order, the same batch and
precision, the implementations take turns one optimizer step at a time (the order rotates every round):

- ``posttrain``: the project's own code path: the objective the loop runs for the algorithm (its family record,
  posttrain.algorithms.families), the loop's ``optimizer_update`` (posttrain.train) and the engine of
  models/engine.py, on batches from data/collate.py;
- ``trl``: TRL's ``DPOTrainer`` with its defaults (gradient checkpointing on), driven by its own ``train()``;
- ``trl_no_gc``: the same with ``gradient_checkpointing=False``;
- ``posttrain_masked`` (asked for with ``--impls``): the pairwise objective as it runs once it passes its completion
  mask to ``token_logps`` (policy and reference log-probs on completion positions only), on the same loop and engine
  (throughput_arms.masked_pairwise);
- ``posttrain_study`` (asked for with ``--impls``): posttrain as a study runs it, with the two per-scale savings on
  (docs/training.md): reference log-probs from the per-scale cache (no reference forward and no reference copy in
  the step; the pre-pass that fills the cache is timed apart as ``reference_prepass_s``: a scale pays it once for
  all its algorithms and seeds) and each step's pairs grouped by length (``trainer.group_by_length``).

TRL 1.16 already computes log-probs only on completion positions (its fused LM head, ``add_fused_lm_head``: the
backbone once, the head in tiles over the positions with a label), so ``posttrain`` (full-vocabulary logits for
every position) starts behind it wherever the head is large (``cpu-s-v152k``, the real scales).

Each arm runs in its own thread and only while it holds the baton, so with one torch thread (``--threads``) an
arm's CPU time is its thread's CPU time (``time.thread_time``; on CUDA the wall time between synchronisations).
Tokens per optimizer step are counted once, the same for every arm: the non-pad prompt + completion tokens of the
chosen and rejected sequences. Only optimizer hyperparameters are aligned (lr, constant schedule, AdamW betas/eps,
no weight decay, clipping at 1.0) so that the losses of the first steps can be compared; everything that sets the
speed is each implementation's default. ``--logps fast|plain`` sets posttrain.models.logps.COMPLETION_ONLY
(log-probs only on completion positions where the objective passes its completion mask);
``head_rows_per_step`` records how many positions went through the LM head per step (the fast path's effect).

``mfu`` (CUDA, or with ``--peak-tflops``): model FLOPs utilization, 6 x parameters per trained token per second over
the device's dense peak (989 TFLOP/s for an H100 SXM in bf16 by default), the same definition for every arm.

Peak memory: one extra, untimed step per arm under torch's profiler (CPU) or ``max_memory_allocated`` (CUDA): the
step's peak above what was held before it, plus the arm's resident tensors (weights of policy and reference,
gradients, optimizer states).
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import random
import sys
import threading
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # rehearsal_assets: the published Qwen2.5 architectures

import torch  # noqa: E402
from throughput_arms import (OPTIM, Baton, Record, append_lines, masked_pairwise, posttrain_arm,  # noqa: E402
                             trl_arm)

#: name -> model architecture, data shape, batch and precision. cpu-s / cpu-m: the issue's CPU setup (character
#: vocabulary, so the body, not a 152K-row head, is what is measured); 0.5b / 1.5b: Qwen2.5's published architectures,
#: random-init, bf16 autocast, 8 pairs of about 512 tokens per micro-batch.
SCALES = {
    "cpu-s": dict(hidden=256, layers=4, heads=4, kv_heads=2, mlp=1024, vocab=None, pairs=256, prompt=(40, 160),
                  completion=(24, 320), max_length=512, micro=4, accum=2, precision="fp32"),
    "cpu-m": dict(hidden=512, layers=8, heads=8, kv_heads=4, mlp=1536, vocab=None, pairs=256, prompt=(40, 160),
                  completion=(24, 320), max_length=512, micro=4, accum=2, precision="fp32"),
    # the smoke test's setting (tests/test_bench_throughput.py): seconds, not a measurement
    "cpu-xs": dict(hidden=64, layers=2, heads=2, kv_heads=1, mlp=128, vocab=None, pairs=32, prompt=(10, 40),
                   completion=(8, 40), max_length=128, micro=2, accum=2, precision="fp32"),
    # cpu-s with Qwen's 151,936-row head: where computing the head only on completion positions shows
    "cpu-s-v152k": dict(hidden=256, layers=4, heads=4, kv_heads=2, mlp=1024, vocab=151936, pairs=64,
                        prompt=(40, 160), completion=(24, 320), max_length=512, micro=2, accum=2, precision="fp32"),
    "0.5b": dict(qwen="0.5b", pairs=512, prompt=(128, 256), completion=(192, 384), max_length=512, micro=8, accum=1,
                 precision="bf16-mixed"),
    "1.5b": dict(qwen="1.5b", pairs=512, prompt=(128, 256), completion=(192, 384), max_length=512, micro=8, accum=1,
                 precision="bf16-mixed"),
}
IMPLS = ("posttrain", "trl", "trl_no_gc", "posttrain_masked", "posttrain_study")
WORDS = ("the", "number", "of", "apples", "is", "and", "then", "so", "total", "each", "she", "has", "more", "than")


def build_model(scale: dict, vocab: int, seed: int = 0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    if "qwen" in scale:
        from rehearsal_assets import QWEN25

        arch = QWEN25[scale["qwen"]]
        cfg = Qwen2Config(vocab_size=arch["vocab_size"], hidden_size=arch["hidden_size"],
                          intermediate_size=arch["intermediate_size"], num_hidden_layers=arch["layers"],
                          num_attention_heads=arch["num_attention_heads"], num_key_value_heads=arch["num_key_value_heads"],
                          tie_word_embeddings=arch["tie_word_embeddings"], max_position_embeddings=4096)
    else:
        cfg = Qwen2Config(vocab_size=scale["vocab"] or vocab, hidden_size=scale["hidden"], intermediate_size=scale["mlp"],
                          num_hidden_layers=scale["layers"], num_attention_heads=scale["heads"],
                          num_key_value_heads=scale["kv_heads"], tie_word_embeddings=True,
                          max_position_embeddings=1024)
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(cfg)


def synthetic_pairs(scale: dict, seed: int = 0) -> list[dict]:
    """Pairs of text with a realistic length spread (character tokenizer: one character = one token)."""
    rng = random.Random(seed)

    def text(lo_hi):
        n, out = rng.randint(*lo_hi), ""
        while len(out) < n:
            out += rng.choice(WORDS) + (" " if rng.random() < 0.9 else f" {rng.randint(1, 999)}\n")
        return out[:n]

    return [{"prompt": "Question: " + text(scale["prompt"]) + "\nAnswer:", "chosen": " " + text(scale["completion"]),
             "rejected": " " + text(scale["completion"])} for _ in range(scale["pairs"])]


def step_tokens(pairs, tokenizer, scale, steps) -> list[int]:
    from posttrain.data.collate import collate

    per_step = scale["micro"] * scale["accum"]
    return [int(collate("pairs", tokenizer, pairs[i * per_step:(i + 1) * per_step],
                        scale["max_length"])["attention_mask"].sum()) for i in range(steps)]


def warm_imports(impls) -> None:
    import posttrain.algorithms.objectives  # noqa: F401
    import posttrain.models.engine  # noqa: F401
    import posttrain.train  # noqa: F401

    if any(i.startswith("trl") for i in impls):
        import datasets  # noqa: F401
        from transformers import TrainerCallback  # noqa: F401
        from trl import DPOConfig, DPOTrainer  # noqa: F401


def run_arm(name, fn, baton):
    try:
        fn()
    except BaseException as exc:  # noqa: BLE001 - handed to the controller, which stops the benchmark
        import traceback

        traceback.print_exc()
        baton.error = (name, exc)
        baton.hand_back()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--scale", default="cpu-s", help=f"one of {sorted(SCALES)}")
    parser.add_argument("--algo", default="dpo")
    parser.add_argument("--out", required=True, help="JSON lines, appended: one per implementation")
    parser.add_argument("--steps", type=int, default=30, help="timed optimizer steps per arm (30)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed first steps per arm (1)")
    parser.add_argument("--impls", default=",".join(IMPLS[:3]), help=f"comma-separated subset of {IMPLS}")
    parser.add_argument("--logps", choices=("fast", "plain"), default="fast",
                        help="posttrain.models.logps.COMPLETION_ONLY (fast: log-probs on completion positions only)")
    parser.add_argument("--recompute-head", action="store_true",
                        help="posttrain.models.logps.RECOMPUTE_HEAD: the fast path recomputes the head's logits in "
                             "the backward pass instead of keeping them")
    parser.add_argument("--shared-prompt", choices=("auto", "false"), default="auto",
                        help="trainer.shared_prompt for the posttrain arms (auto: chosen and rejected behind one "
                             "prompt copy where the attention kernel allows, as the loop does)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1)")
    parser.add_argument("--note", default="", help="free text stored with each line (how it was run)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the device's dense peak in TFLOP/s for model FLOPs utilization (default on CUDA: 989, "
                             "H100 SXM bf16; on CPU none is reported unless given)")
    args = parser.parse_args(argv)
    if args.scale not in SCALES:
        raise SystemExit(f"unknown --scale {args.scale!r}; known: {sorted(SCALES)}")
    impls = [i for i in args.impls.split(",") if i]
    if not impls or set(impls) - set(IMPLS):
        raise SystemExit(f"--impls {args.impls!r}: choose from {IMPLS}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here; use --device cpu")
    torch.set_num_threads(args.threads)
    import posttrain.models.logps as logps
    from posttrain.data.tokenizer import build_char_tokenizer

    logps.COMPLETION_ONLY = args.logps == "fast"
    logps.RECOMPUTE_HEAD = args.recompute_head
    scale, device = SCALES[args.scale], torch.device(args.device)
    tokenizer = build_char_tokenizer(Path(os.environ.get("TMPDIR", "/tmp")) / "bench_char_tokenizer")
    tokenizer.padding_side = "right"
    total = args.warmup + args.steps
    pairs = synthetic_pairs(scale)
    if len(pairs) < (total + 1) * scale["micro"] * scale["accum"]:
        raise SystemExit(f"{args.scale} has {len(pairs)} pairs: not enough for {total} + 1 steps of "
                         f"{scale['micro'] * scale['accum']}; lower --steps")
    base = build_model(scale, len(tokenizer))
    if args.device == "cuda":
        base.to(device)
    n_params = sum(p.numel() for p in base.parameters())
    if any(i.startswith("trl") for i in impls):  # TRL builds its reference from the model's path, as by default
        saved = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench_base_{args.scale}"
        base.save_pretrained(saved)
        base.config._name_or_path = str(saved)
    tokens = step_tokens(pairs, tokenizer, scale, total)
    cuda = args.device == "cuda"
    records = {name: Record(cuda) for name in impls}
    baton = Baton(impls)
    arms = {
        "posttrain": lambda: posttrain_arm(copy.deepcopy(base), pairs, tokenizer, scale, args.algo, device, total,
                                           records["posttrain"], baton, shared_prompt=args.shared_prompt),
        "trl": lambda: trl_arm(copy.deepcopy(base), pairs, tokenizer, scale, args.algo, device, total, records["trl"],
                               baton, name="trl", gradient_checkpointing=True),
        "trl_no_gc": lambda: trl_arm(copy.deepcopy(base), pairs, tokenizer, scale, args.algo, device, total,
                                     records["trl_no_gc"], baton, name="trl_no_gc", gradient_checkpointing=False),
        "posttrain_masked": lambda: posttrain_arm(copy.deepcopy(base), pairs, tokenizer, scale, args.algo, device,
                                                  total, records["posttrain_masked"], baton, name="posttrain_masked",
                                                  objective=masked_pairwise, shared_prompt=args.shared_prompt),
        "posttrain_study": lambda: posttrain_arm(copy.deepcopy(base), pairs, tokenizer, scale, args.algo, device,
                                                 total, records["posttrain_study"], baton, name="posttrain_study",
                                                 cached=True, shared_prompt=args.shared_prompt),
    }
    warm_imports(impls)  # module imports are not thread-safe (TRL's lazy modules): all of them here, first
    runs = {n: arms[n]() for n in impls}
    threads = [threading.Thread(target=run_arm, args=(n, runs[n], baton), daemon=True) for n in impls]
    for t in threads:
        t.start()
    for round_ in range(total + 1):  # the last round is the untimed memory step
        for k in range(len(impls)):
            name = impls[(round_ + k) % len(impls)]
            baton.give(name)
            if baton.error is not None:
                failed, exc = baton.error
                raise SystemExit(f"arm {failed} failed: {type(exc).__name__}: {exc}") from exc
    for t in threads:
        t.join(timeout=600)
    timed = tokens[args.warmup:]
    peak = args.peak_tflops if args.peak_tflops is not None else (989.0 if cuda else None)
    lines = []
    for name in impls:
        rec = records[name]
        secs = rec.clock.steps[args.warmup:]
        lines.append({
            "impl": name, "algo": args.algo, "device": args.device, "scale": args.scale,
            "hardware": torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine(),
            "tokens_per_s": round(sum(timed) / sum(secs), 2), "step_s": round(sum(secs) / len(secs), 5),
            "step_wall_s": round(sum(rec.clock.wall[args.warmup:]) / len(secs), 5),
            "timed_steps": len(secs), "tokens_per_step": round(sum(timed) / len(timed), 1),
            "peak_mem_bytes": int(rec.peak + rec.resident), "step_peak_bytes": int(rec.peak),
            "resident_bytes": int(rec.resident), "head_rows_per_step": (round(sum(rec.head_rows) / len(rec.head_rows))
                                   if name.startswith("posttrain") else None),  # TRL's fused head: F.linear
            "losses": [round(x, 7) for x in rec.losses[:8]], "logps": args.logps if name.startswith("posttrain") else None,
            "recompute_head": args.recompute_head if name.startswith("posttrain") else None,
            "logps_chunk": logps.CHUNK if name.startswith("posttrain") else None,
            "shared_prompt": rec.shared_prompt,
            "params": n_params, "lr": OPTIM["lr"], "precision": scale["precision"], "micro_batch": scale["micro"],
            "grad_accum": scale["accum"], "threads": args.threads, "note": args.note,
            "reference_prepass_s": None if rec.prepass_s is None else round(rec.prepass_s, 3),
            "seconds_measure": "thread CPU time" if not cuda else "wall time (synchronised)",
            # model FLOPs utilization of the policy's training FLOPs (6 x parameters per trained token, the common
            # definition, the same for every arm: a reference forward, checkpointing's recompute count as overhead)
            "mfu": (None if peak is None else round(6 * n_params * sum(timed) / sum(secs) / (peak * 1e12), 4)),
            "peak_tflops": peak,
        })
    report(lines)
    append_lines(Path(args.out), lines)
    return 0


def report(lines: list[dict]) -> None:
    """The table with the ratios of tokens per second to each TRL arm, and the first losses' agreement."""
    by = {line["impl"]: line for line in lines}
    trls = [o for o in by if o.startswith("trl")]
    print(f"{'impl':<17} {'tokens/s':>9} {'step s':>8} {'peak MiB':>9} {'head rows':>9}  "
          + "  ".join(f"x {o}" for o in trls))
    for line in lines:
        ratios = "  ".join(f"{line['tokens_per_s'] / by[o]['tokens_per_s']:>{len(o) + 2}.3f}" for o in trls)
        rows = "-" if line["head_rows_per_step"] is None else line["head_rows_per_step"]
        print(f"{line['impl']:<17} {line['tokens_per_s']:>9.1f} {line['step_s']:>8.3f} "
              f"{line['peak_mem_bytes'] / 2 ** 20:>9.1f} {rows:>9}  {ratios}")
    for ours in (o for o in by if o.startswith("posttrain")):
        for o in trls:
            pairs = list(zip(by[ours]["losses"], by[o]["losses"]))
            diff = max(abs(a - b) for a, b in pairs)
            print(f"first {len(pairs)} step losses, {ours} vs {o}: max |diff| = {diff:.1e}")


if __name__ == "__main__":
    sys.exit(main())
