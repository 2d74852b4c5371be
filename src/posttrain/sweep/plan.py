"""``python -m posttrain.sweep plan [sweep=NAME] [OVERRIDES...] [--mfu F] ...``: what a launch costs, before it runs.

The launch's cells come from the sweep's own expansion (posttrain.sweep.files ``expand``/``grid``, the same cells
``python launch.py -m`` runs); each cell's scale (conf/scale/*.yaml: model, prompts, generation length, batch),
trainer (conf/trainer/default.yaml: epochs, ``trainer.max_steps``), data (conf/data/selfplay.yaml: samples per
prompt) and algorithm (the registry: family, data kind, reference need; conf/algo/*.yaml: online samples) give its
tokens, by kind:

- trained tokens (forward + backward, 6N FLOPs each): every training sequence of every epoch (a pair's prompt,
  and an online group's, once per packed row with ``trainer.shared_prompt``; not for WPO, TDPO or KTO:
  posttrain.models.shared_prompt);
- forward-only tokens (2N): reference forwards (offline data: per run and epoch; with the shared cache once per
  scale over the self-play sequences, issue 14), KTO's no-grad anchor pass, online reference / old-policy forwards;
- generation tokens (2N, prompt prefill + sampled tokens): self-play data (per run without the cache, once per scale
  with it) and online rollouts (per run: on-policy);
- evaluation tokens (2N): lm-eval of every trained run, plus the base's scores (per run / once per scale).

GPU-hours = FLOPs / (peak x MFU): trained and forward tokens at ``--mfu``, generated tokens at ``--gen-mfu``
(decoding is memory-bound); the assumptions (peak, MFU, token lengths, pair yield) are printed with the table and
each is an option. N = the model's parameter count (published Qwen2.5 counts; embedded tiny bases from their build
block). A design estimate for docs/design.md's compute budget, not a measurement.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path

import yaml

#: Published parameter counts of the study's models (config.json on the hub, embeddings included).
PARAMS = {"Qwen/Qwen2.5-0.5B-Instruct": 494_032_768, "Qwen/Qwen2.5-1.5B-Instruct": 1_543_714_304,
          "Qwen/Qwen2.5-3B-Instruct": 3_085_938_688, "Qwen/Qwen2.5-7B-Instruct": 7_615_616_512}
#: Vocabulary of the embedded tiny bases (posttrain.data.tokenizer: pad, eos, unk, newline + printable ASCII).
TINY_VOCAB = 99
#: lm-eval work per evaluation, by profile: task -> (documents, context tokens per document, generated tokens per
#: document or None for the --completion-tokens assumption). Loglikelihood tasks: every choice's context + choice.
EVAL_WORK = {
    "study": {"gsm8k": (1319, 1500, None), "minerva_math": (5000, 1200, None), "arc_challenge": (1172, 4 * 70, 0),
              "hellaswag": (10042, 4 * 100, 0), "winogrande": (1267, 2 * 30, 0)},
    "embedded": {"synth_gsm8k": (200, 130, None), "synth_math": (200, 130, None), "synth_mc": (200, 4 * 40, 0)},
}


@dataclass(frozen=True)
class Assumptions:
    tflops: float = 989.0  # H100 SXM bf16 dense peak
    mfu: float = 0.40  # training and forward-only passes
    gen_mfu: float = 0.10  # autoregressive generation
    prompt_tokens: dict = field(default_factory=lambda: {"fewshot": 1500, "raw": 130})
    completion_tokens: int = 200  # mean sampled / trained completion (capped at the scale's max_new_tokens)
    pair_yield: float = 0.5  # share of self-play prompts with both a correct and an incorrect sample
    gold_prompts: bool = True  # gold SFT trains on every prompt
    params: dict = field(default_factory=dict)  # scale -> N override

    def lines(self) -> list[str]:
        prompts = ", ".join(f"{k} {v}" for k, v in self.prompt_tokens.items())
        return [f"GPU: {self.tflops:g} TFLOP/s peak (H100 bf16 dense), MFU {self.mfu:g} for training/forwards, "
                f"{self.gen_mfu:g} for generation; FLOPs 6N per trained token (LoRA runs too: an upper bound), "
                f"2N per forward or generated token",
                f"tokens: prompt {prompts}; completion {self.completion_tokens} (at most max_new_tokens); pair "
                f"yield {self.pair_yield:g} of self-play prompts; eval work per lm-eval task as in plan.EVAL_WORK"]


@dataclass
class Cost:
    """Tokens of one cell (``shared``: the per-scale work the caches make once per scale)."""
    trained: float = 0.0
    forward: float = 0.0
    generated_selfplay: float = 0.0
    generated_online: float = 0.0
    eval_forward: float = 0.0
    eval_generated: float = 0.0


@dataclass
class CellPlan:
    scale: str
    params: float
    cost: Cost  # the run's own work (always per run)
    ref_per_run: float  # reference-forward tokens on offline data, per run (what the cache removes)
    ref_key: tuple | None  # the cached reference's identity (scale, data kind): shared by every run with it
    ref_once: float  # tokens of that shared reference pass
    selfplay: float  # self-play generation tokens (per run without the cache, once per scale with it)
    base_eval: tuple[float, float]  # (forward, generated) tokens of the base's scores


def _overrides(cell) -> dict:
    out = {}
    for line in cell.overrides:
        key, _, value = line.partition("=")
        out[key.lstrip("+~")] = value
    return out


@lru_cache(maxsize=64)
def _yaml(path: str) -> dict:
    return yaml.safe_load(Path(path).read_text()) or {}


def _int(value, fallback):
    """An int from a YAML value that may be an interpolation (``${scale.max_new_tokens}``): the fallback then."""
    try:
        return int(value)
    except (TypeError, ValueError):
        return fallback


def tiny_params(build: dict, vocab: int = TINY_VOCAB) -> int:
    """Parameters of an embedded Qwen2 base from its build block (tied head, q/k/v biases, RMSNorm weights)."""
    h, layers, mlp = int(build["hidden"]), int(build["layers"]), int(build["mlp"])
    kv = h // int(build["heads"]) * int(build["kv_heads"])
    per_layer = (h * h + h) + 2 * (h * kv + kv) + h * h + 3 * h * mlp + 2 * h
    return vocab * h + layers * per_layer + h


def scale_params(name: str, scale: dict, assume: Assumptions) -> float:
    if name in assume.params:
        return float(assume.params[name])
    if scale.get("model") in PARAMS:
        return float(PARAMS[scale["model"]])
    if scale.get("embedded") and scale.get("build"):
        return float(tiny_params(scale["build"]))
    raise SystemExit(f"scale {name}: no parameter count for model {scale.get('model')!r}; give --params {name}=N")


def cell_plan(cell, conf_dir: Path, assume: Assumptions) -> CellPlan:
    """The tokens of one cell (see the module docstring)."""
    from posttrain.algorithms.registry import get
    from posttrain.models.shared_prompt import algorithm_packs
    from posttrain.sweep.files import _defaults

    ov = {**{k: str(v) for k, v in _defaults(str(conf_dir)).items()}, **_overrides(cell)}
    scale_name, algo = ov["scale"], get(ov["algo"])
    scale = _yaml(str(conf_dir / "scale" / f"{scale_name}.yaml"))
    trainer = _yaml(str(conf_dir / "trainer" / "default.yaml"))
    data = _yaml(str(conf_dir / "data" / "selfplay.yaml"))
    algo_yaml = _yaml(str(conf_dir / "algo" / f"{ov['algo']}.yaml"))
    n_params = scale_params(scale_name, scale, assume)
    prompts = _int(ov.get("data.num_prompts", scale.get("num_prompts")), 7473)  # null: all of GSM8K train
    max_new = _int(ov.get("scale.max_new_tokens", scale.get("max_new_tokens")), 512)
    epochs = _int(ov.get("trainer.epochs", trainer.get("epochs")), 3)
    max_steps = _int(ov.get("trainer.max_steps", trainer.get("max_steps")), None)
    batch = _int(scale.get("micro_batch_size"), 1) * _int(scale.get("grad_accum"), 1)
    prompt = assume.prompt_tokens[str(ov.get("scale.prompt_format", scale.get("prompt_format", "raw")))]
    completion = min(assume.completion_tokens, max_new)
    seq = prompt + completion
    pairs = assume.pair_yield * prompts
    spp = _int(ov.get("data.samples_per_prompt", data.get("samples_per_prompt")), 16)
    selfplay = prompts * (prompt + spp * completion)

    hp = {k.partition(".")[2]: v for k, v in ov.items() if k.startswith("algo.")}
    needs_ref = algo.needs_reference(hp)
    examples, rows = {"pairs": (pairs, 2), "unpaired": (2 * pairs, 1), "selfplay_chosen": (pairs, 1),
                      "gold": (prompts if assume.gold_prompts else pairs, 1), "prompts": (prompts, 1)}[algo.data]
    passes = epochs if max_steps is None else min(epochs, max_steps * batch / max(examples, 1))
    cost, ref_per_run, ref_key, ref_once = Cost(), 0.0, None, 0.0
    packs = (str(ov.get("trainer.shared_prompt", trainer.get("shared_prompt", "auto"))).lower() != "false"
             and algorithm_packs(algo, hp))  # auto: Qwen2.5's sdpa attention packs
    if algo.data == "prompts":  # online: the family generates its own samples from prompts
        samples = _int(ov.get("algo.num_samples", algo_yaml.get("num_samples")), 4)
        iters = _int(ov.get("algo.num_iterations", algo_yaml.get("num_iterations")), 1)
        minib = _int(ov.get("algo.num_minibatches", algo_yaml.get("num_minibatches")), 1)
        per_row = max(1, (2 * seq - prompt) // max(completion, 1))  # samples behind one prompt copy (twice a row)
        sampled = passes * examples * (math.ceil(samples / per_row) * prompt + samples * completion if packs
                                       else samples * seq)
        cost.generated_online = passes * examples * (prompt + samples * completion)
        cost.trained = sampled * iters
        cost.forward = sampled * (int(needs_ref) + int(iters * minib > 1))  # reference; old-policy log-probs
    else:
        # pairs behind one prompt copy (trainer.shared_prompt; WPO keeps two rows): prompt + chosen + rejected
        cost.trained = passes * examples * (prompt + rows * completion if packs and algo.data == "pairs"
                                            else rows * seq)
        if needs_ref and algo.reference_cacheable(hp):  # posttrain.algorithms.reference_cache
            ref_per_run = cost.trained
            ref_key, ref_once = (scale_name, "selfplay"), 2 * pairs * seq  # pairs and unpaired rows: same sequences
            if algo.data == "gold":
                ref_key, ref_once = (scale_name, "gold"), prompts * seq
        elif needs_ref:  # a reference forward in every step, cache or not (KTO's z0, LD-DPO, TR-DPO, TDPO)
            cost.forward = cost.trained
        spec = algo.loss_spec
        if getattr(spec, "needs_kl_anchor", False):  # KTO's z0: mismatched rows, policy + reference, no grad
            cost.forward += passes * examples * seq * 2
    uses_selfplay = algo.data in ("pairs", "unpaired", "selfplay_chosen")
    profile = str(ov.get("eval.profile", scale.get("eval_profile", "embedded")))
    eval_fwd = eval_gen = 0.0
    for docs, ctx, gen in EVAL_WORK.get(profile, {}).values():
        eval_fwd += docs * ctx
        eval_gen += docs * (min(assume.completion_tokens, max_new) if gen is None else gen)
    cost.eval_forward, cost.eval_generated = eval_fwd, eval_gen
    return CellPlan(scale_name, n_params, cost, ref_per_run, ref_key, ref_once,
                    selfplay if uses_selfplay else 0.0, (eval_fwd, eval_gen))


def totals(plans: list[CellPlan], assume: Assumptions, shared: bool, share_reference: bool = True) -> dict[str, dict]:
    """Per scale (and "total"): runs, token counts by kind and GPU-hours, with or without the shared caches
    (``share_reference=False``: self-play data and base scores shared, reference log-probs computed by every run)."""
    out: dict[str, dict] = {}
    seen_ref, seen_selfplay, seen_base = set(), set(), set()
    train_rate = assume.tflops * 1e12 * assume.mfu
    gen_rate = assume.tflops * 1e12 * assume.gen_mfu
    for p in plans:
        row = out.setdefault(p.scale, dict(runs=0, trained=0.0, ref_forward=0.0, forward=0.0, selfplay=0.0,
                                           online=0.0, eval=0.0, gpu_hours=0.0))
        c = p.cost
        ref = p.ref_per_run
        selfplay, base = p.selfplay, p.base_eval
        if shared and share_reference:
            ref = 0.0 if p.ref_key is None or p.ref_key in seen_ref else p.ref_once
            if p.ref_key is not None:
                seen_ref.add(p.ref_key)
        if shared:
            selfplay = 0.0 if p.scale in seen_selfplay or not p.selfplay else p.selfplay
            if p.selfplay:
                seen_selfplay.add(p.scale)
            base = (0.0, 0.0) if p.scale in seen_base else p.base_eval
            seen_base.add(p.scale)
        eval_fwd, eval_gen = c.eval_forward + base[0], c.eval_generated + base[1]
        flops_train = 6 * p.params * c.trained + 2 * p.params * (ref + c.forward + eval_fwd)
        flops_gen = 2 * p.params * (selfplay + c.generated_online + eval_gen)
        row["runs"] += 1
        row["trained"] += c.trained
        row["ref_forward"] += ref
        row["forward"] += c.forward
        row["selfplay"] += selfplay
        row["online"] += c.generated_online
        row["eval"] += eval_fwd + eval_gen
        row["gpu_hours"] += (flops_train / train_rate + flops_gen / gen_rate) / 3600
    total = {k: sum(r[k] for r in out.values()) for k in ("runs", "trained", "ref_forward", "forward", "selfplay",
                                                           "online", "eval", "gpu_hours")}
    out["total"] = total
    return out


COLUMNS = (("runs", "runs"), ("trained", "trained tok"), ("ref_forward", "ref fwd tok"),
           ("forward", "other fwd tok"), ("selfplay", "self-play gen tok"), ("online", "online gen tok"),
           ("eval", "eval tok"), ("gpu_hours", "GPU-h"))


def _fmt(key: str, value: float) -> str:
    if key == "runs":
        return str(int(value))
    if key == "gpu_hours":
        return f"{value:,.1f}"
    return f"{value / 1e9:,.3f}B" if value >= 1e7 else f"{value / 1e6:,.2f}M"


def table(rows: dict[str, dict]) -> list[str]:
    widths = [max(len(title), 12) for _, title in COLUMNS]
    lines = ["scale".ljust(8) + "  ".join(t.rjust(w) for (_, t), w in zip(COLUMNS, widths))]
    for name, row in rows.items():
        lines.append(name.ljust(8) + "  ".join(_fmt(k, row[k]).rjust(w) for (k, _), w in zip(COLUMNS, widths)))
    return lines


def _mapping(text: str, what: str) -> dict:
    out = {}
    for item in filter(None, text.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"{what} {text!r}: give key=value[,key=value]")
        try:
            out[key] = float(value)
        except ValueError:
            raise SystemExit(f"{what} {text!r}: {value!r} is not a number") from None
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m posttrain.sweep plan",
                                     description="Tokens and estimated GPU-hours of a launch, with and without the "
                                                 "shared per-scale caches.")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="as for `python launch.py -m`")
    defaults = Assumptions()
    parser.add_argument("--tflops", type=float, default=defaults.tflops, help="GPU peak TFLOP/s (989: H100 bf16)")
    parser.add_argument("--mfu", type=float, default=defaults.mfu, help="MFU of training and forwards (0.4)")
    parser.add_argument("--gen-mfu", type=float, default=defaults.gen_mfu, help="MFU of generation (0.1)")
    parser.add_argument("--prompt-tokens", default="fewshot=1500,raw=130", help="per prompt format")
    parser.add_argument("--completion-tokens", type=int, default=defaults.completion_tokens)
    parser.add_argument("--pair-yield", type=float, default=defaults.pair_yield)
    parser.add_argument("--params", default="", help="scale=N overrides of the parameter count")
    args = parser.parse_intermixed_args(argv)
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        raise SystemExit(f"{bad[0]!r}: plan takes key=value overrides and sweep=NAME")
    if not 0 < args.mfu <= 1 or not 0 < args.gen_mfu <= 1:
        raise SystemExit("--mfu and --gen-mfu are fractions in (0, 1]")
    prompt_tokens = {k: int(v) for k, v in _mapping(args.prompt_tokens, "--prompt-tokens").items()}
    assume = replace(defaults, tflops=args.tflops, mfu=args.mfu, gen_mfu=args.gen_mfu, prompt_tokens=prompt_tokens,
                     completion_tokens=args.completion_tokens, pair_yield=args.pair_yield,
                     params=_mapping(args.params, "--params"))
    from posttrain.sweep.prefetch import PrefetchUsage, cells
    from posttrain.sweep.files import default_conf_dir

    conf_dir = default_conf_dir()
    try:
        launch_cells = cells(args.overrides, conf_dir, conf_dir.parent / "sweeps")
    except PrefetchUsage as exc:
        raise SystemExit(str(exc).replace("prefetch", "plan")) from None
    try:
        plans = [cell_plan(c, conf_dir, assume) for c in launch_cells]
    except KeyError as exc:
        raise SystemExit(f"no --prompt-tokens for prompt format {exc}") from None
    for shared in (False, True):
        print("with the shared per-scale caches (self-play data, base scores, reference log-probs once per scale):"
              if shared else "without shared caches (every run builds its self-play data, base scores and "
                             "reference log-probs, once per epoch):")
        print("\n".join(table(totals(plans, assume, shared))))
        print()
    print("\n".join(assume.lines()))
    before, after = (totals(plans, assume, s)["total"]["gpu_hours"] for s in (False, True))
    middle = totals(plans, assume, True, share_reference=False)["total"]["gpu_hours"]
    print(f"{len(plans)} run{'' if len(plans) == 1 else 's'}: {before:,.1f} GPU-h without the caches, {after:,.1f} with them "
          f"({before / after if after else math.inf:.2f}x); {middle:,.1f} with self-play data and base scores shared "
          "but reference log-probs computed in every run")
    return 0
