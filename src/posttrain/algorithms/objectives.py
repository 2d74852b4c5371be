"""The offline families' parts: what the training loop computes on a micro-batch (no algorithm names here).

The Family records of posttrain.algorithms.families put these together (``prepare``, ``objective``,
``updates_per_batch``, ``step_hook``); the online families' parts are in posttrain.algorithms.online.

Each objective is ``fn(policy, reference, batch, algo, hparams, ctx) -> (loss, stats)``. ``loss`` is already
scaled for gradient accumulation: per-example losses are summed and divided by the example count of the whole
accumulated step (``ctx.examples``), token losses by its token count (``ctx.tokens``), so the result does not
depend on how a step is split into micro-batches. Log-probs are computed in float32 from the logits over the full
vocabulary, prompt and padding masked (docs/algorithms.md 0 and 6).

A statistic of the whole step (KTO's reference point z0; BCO's first-step delta) is computed before the step's
first backward by the family's ``prepare``, from examples the family's ``step_hook`` annotated on the whole step,
and reaches every micro-batch's objective with its batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from posttrain import losses
from posttrain.algorithms.hparams import PAIRWISE_OPTIONS
from posttrain.algorithms.memory import LoopMemory, RunningMean
from posttrain.losses._common import check_hparams
from posttrain.data.collate import collate, mismatched_partners, mismatched_rows
from posttrain.models.engine import PROCESS_GROUP
from posttrain.models.logps import logps_from_logits, sequence_logps, shared_token_logps, shifted_logits


@dataclass(frozen=True)
class StepContext:
    examples: int  # examples in the whole accumulated optimizer step (over all ranks)
    tokens: int  # completion tokens in the whole accumulated optimizer step (over all ranks)
    memory: LoopMemory | None = None  # state carried across steps (running statistics, PPO's value head)
    shared_prompt: bool = False  # rows sharing a prompt run behind one copy of it (models/shared_prompt.py)


def _running(spec, hparams: dict, memory: LoopMemory | None) -> tuple[dict, list]:
    """The loss spec's running hyperparameters (beta-DPO's margin mean, BCO's delta) that the run left None, filled
    from the loop memory's running means; returns ``(hparams, [(key, statistic, Running)])`` to observe after the
    loss."""
    hp, observers = dict(hparams), []
    if memory is None:
        return hp, observers
    for key, running in getattr(spec, "running", {}).items():  # policy-gradient specs keep no running values
        if hp.get(key, spec.defaults.get(key)) is None:
            stat = memory.get(f"running/{key}", lambda r=running: RunningMean(r.momentum))
            hp[key] = stat.value  # None before the first step's commit: the batch's own mean
            observers.append((key, stat, running))
    return hp, observers


def prime_memory(algo, hparams: dict, memory: LoopMemory) -> None:
    """Create the loss's running statistics before the first step, so that every rank holds the same ones (a rank
    that saw no batch of its own in a step still joins their end-of-step all-reduce)."""
    spec = algo.loss_spec
    if spec is not None:
        _running(spec, hparams, memory)


def _observe(observers: list, inputs, fn_hparams: dict, stats: dict) -> None:
    """Feed this micro-batch to the running statistics (committed by the loop after the optimizer step)."""
    for key, stat, running in observers:
        stat.observe(running.observe(inputs, fn_hparams))
        if stat.value is not None:
            stats[f"running/{key}"] = stat.value


def _reference_logps(reference, batch: dict) -> torch.Tensor:
    with reference.active() as ref_model:
        return sequence_logps(ref_model, batch)[0]


def supervised(policy, reference, batch, algo, hparams, ctx):
    """SFT: token NLL over completion tokens, normalised by the accumulated step's token count."""
    mask = batch["completion_mask"][:, 1:]
    lp = shared_token_logps(policy, batch["input_ids"], batch["attention_mask"], batch["completion_mask"],
                            shared_prompt=ctx.shared_prompt)  # self-play samples of one prompt: one prompt copy
    loss = losses.token_nll(lp, mask, num_items=ctx.tokens)
    nll = -(lp * mask).sum() / mask.sum().clamp_min(1)
    return loss, {"nll": nll.item(), "logps/completion": ((lp * mask).sum(-1)).mean().item()}


def _pair_logps(token_lp: torch.Tensor, mask: torch.Tensor, n: int, ld_alpha) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) sequence log-probs: plain sums, or LD-DPO's shared-prefix + alpha * tail recombination."""
    if ld_alpha is None:
        seq = (token_lp * mask).sum(-1)
        return seq[:n], seq[n:]
    return losses.options.ld_dpo_logps(token_lp[:n], mask[:n], token_lp[n:], mask[n:], alpha=float(ld_alpha))


def pairwise(policy, reference, batch, algo, hparams, ctx):
    """DPO family: chosen and rejected in one forward; reference forward only when the loss needs one.

    Options that combine with every pairwise loss: ``wpo`` (WPO, Zhou et al. 2024, arXiv 2406.11827: each pair's
    loss times the detached weights w(y_w) w(y_l), as TRL's ``use_weighting``) and ``ld_alpha`` (LD-DPO, Liu et al.
    2024, arXiv 2409.06411: the tail past the shorter completion counts ``ld_alpha`` times, for policy and reference
    alike, as TRL's ``ld_alpha``).
    """
    n = batch["pairs"]
    wpo, ld_alpha = bool(hparams.get("wpo", False)), hparams.get("ld_alpha")
    loss_hp = {k: v for k, v in hparams.items() if k not in PAIRWISE_OPTIONS}
    mask = batch["completion_mask"][:, 1:].float()
    if wpo:  # WPO weighs by each position's whole next-token distribution: full-vocabulary logits, two rows per
        # pair (and so its in-loop reference too: the same layout, so that the first step's margin is exactly 0)
        logits = shifted_logits(policy, batch["input_ids"], batch["attention_mask"])
        token_lp = logps_from_logits(logits, batch["input_ids"])
    else:  # the LM head on completion positions only, pairs behind one prompt copy where allowed (models/logps.py)
        token_lp = shared_token_logps(policy, batch["input_ids"], batch["attention_mask"], batch["completion_mask"],
                                      shared_prompt=ctx.shared_prompt)
    chosen, rejected = _pair_logps(token_lp, mask, n, ld_alpha)
    lengths = mask.sum(-1)
    ref_chosen = ref_rejected = None
    cached = batch.get("ref_seq_logps")  # per-scale cache (algorithms/reference_cache): no reference forward
    if reference.enabled and cached is not None and ld_alpha is None:
        ref_chosen, ref_rejected = cached[:n], cached[n:]
    elif reference.enabled:
        ref_tok = batch.get("ref_token_logps")  # online pairs: computed in the rollout phase
        if ref_tok is None:
            with reference.active() as ref_model:
                ref_tok = shared_token_logps(ref_model, batch["input_ids"], batch["attention_mask"],
                                             batch["completion_mask"], shared_prompt=ctx.shared_prompt and not wpo)
        ref_chosen, ref_rejected = _pair_logps(ref_tok, mask, n, ld_alpha)
    spec = algo.loss_spec
    loss_hp, observers = _running(spec, loss_hp, ctx.memory)
    inputs, fn_hp = losses.pairwise_inputs(algo.loss, chosen, rejected, ref_chosen, ref_rejected,
                                           chosen_len=lengths[:n], rejected_len=lengths[n:], **loss_hp)
    per_example = spec.fn(inputs, **fn_hp)
    stats = {"logps/chosen": chosen.mean().item(), "logps/rejected": rejected.mean().item()}
    _observe(observers, inputs, fn_hp, stats)
    if wpo:
        sq = losses.options.log_sum_sq_probs(logits)
        weights = (losses.options.wpo_weights(token_lp[:n], sq[:n], mask[:n])
                   * losses.options.wpo_weights(token_lp[n:], sq[n:], mask[n:]))
        per_example = per_example * weights
        stats["wpo/weight"] = weights.mean().item()
    if ref_chosen is not None:
        beta = float(loss_hp.get("beta", 0.1))
        rc, rr = beta * (chosen - ref_chosen).detach(), beta * (rejected - ref_rejected).detach()
        stats.update({"rewards/chosen": rc.mean().item(), "rewards/rejected": rr.mean().item(),
                      "rewards/margins": (rc - rr).mean().item(),
                      "rewards/accuracies": (rc > rr).float().mean().item()})
    return per_example.sum() / ctx.examples, stats


def token_pairwise(policy, reference, batch, algo, hparams, ctx):
    """TDPO (Zeng et al., ICML 2024, arXiv 2404.11999): the pairwise margin plus each side's sequential forward KL
    between reference and policy over the full vocabulary, so the reference's logits are kept, not just log-probs."""
    n = batch["pairs"]
    spec = algo.loss_spec
    check_hparams(spec, algo.loss, "token_pairwise", hparams)  # the losses' own guard, as pairwise_inputs
    mask = batch["completion_mask"][:, 1:].float()
    logits = shifted_logits(policy, batch["input_ids"], batch["attention_mask"])
    with reference.active() as ref_model:
        ref_logits = shifted_logits(ref_model, batch["input_ids"], batch["attention_mask"])
    seq = (logps_from_logits(logits, batch["input_ids"]) * mask).sum(-1)
    ref = (logps_from_logits(ref_logits, batch["input_ids"]) * mask).sum(-1)
    kl = losses.options.sequential_kl(logits, ref_logits, mask)
    per_example = spec.fn(seq[:n], seq[n:], ref[:n], ref[n:], kl[:n], kl[n:], **hparams)
    return per_example.sum() / ctx.examples, {"kl/chosen": kl[:n].mean().item(), "kl/rejected": kl[n:].mean().item(),
                                              "logps/chosen": seq[:n].mean().item()}


def unpaired(policy, reference, batch, algo, hparams, ctx):
    """KTO family: the examples' own rows, one policy forward with gradient.

    What the whole step shares comes with the batch from the step's no-grad pass (``unpaired_batches``): KTO's
    reference point ``kl_anchor`` (z0 over the step's mismatched pairs on all micro-batches and ranks), the own rows'
    reference log-probs ``ref_logps`` (computed there in the same reference forward), and at the first step the step
    means that stand in for running statistics not yet committed (``step_means``: BCO's delta). Without them (a batch
    from ``collate`` alone) the reference runs here, and a running statistic's first value is the batch's own mean.
    """
    spec = algo.loss_spec
    anchor = batch.get("kl_anchor")
    if spec.needs_kl_anchor and anchor is None:
        raise ValueError(f"unpaired loss {algo.loss!r} needs the step's kl_anchor (z0): prepare the step's batches "
                         "with the unpaired Family's prepare (unpaired_batches), not with collate alone")
    seq, lengths = sequence_logps(policy, batch)
    ref = batch.get("ref_logps")
    if ref is None:
        ref = _reference_logps(reference, batch) if reference.enabled else torch.zeros_like(seq)
    hp, observers = _running(spec, hparams, ctx.memory)
    for key, value in batch.get("step_means", {}).items():
        if hp.get(key) is None:
            hp[key] = value
    inputs, fn_hp = losses.unpaired_inputs(algo.loss, seq, ref, batch["desirable"], kl_anchor=anchor,
                                           lengths=lengths, **hp)
    stats = {"logps/completion": seq.mean().item()}
    if anchor is not None:
        stats["kl_anchor"] = float(anchor)
    _observe(observers, inputs, fn_hp, stats)
    return spec.fn(inputs, **fn_hp).sum() / ctx.examples, stats


def offline_batches(policy, reference, tokenizer, algo, hparams, micro_batches, *, max_length, seed, step,
                    memory=None, pool=None, collectives=PROCESS_GROUP, shared_prompt=False):
    """Offline families: tokenise each micro-batch of examples into ONE optimizer update; no rollout statistics."""
    batches = []
    for mb in micro_batches:
        batch = collate(algo.data, tokenizer, mb, max_length)
        batch["examples"] = len(mb)
        batches.append(batch)
    return [batches], {}


def unpaired_batches(policy, reference, tokenizer, algo, hparams, micro_batches, *, max_length, seed, step,
                     memory=None, pool=None, collectives=PROCESS_GROUP, shared_prompt=False):
    """The unpaired Family's ``prepare``: tokenise as ``offline_batches``, then run the step's no-grad pass where the
    loss needs a statistic of the whole step, and hand its results to every micro-batch (see ``unpaired``).

    KTO's reference point (``needs_kl_anchor``): ``z0 = max(0, sum / count)`` of ``S_theta(y'|x) - S_ref(y'|x)`` over
    the step's mismatched pairs (partners from :func:`~posttrain.data.collate.mismatched_partners`, annotated by the
    family's ``step_hook``), the sum and count all-reduced over the ranks, clamped after averaging
    (``losses.kto_kl_anchor``), the same detached value in every micro-batch's loss. This is the paper's estimate
    over the step's batch; TRL averages per-device means of one micro-batch each (its ``gather_for_metrics(kl)``),
    so its z0 changes with the accumulation split and the device count, and ours does not.

    A running statistic not yet committed (BCO's delta at the first step): its per-example values on the step's own
    rows, averaged over micro-batches and ranks, stand in for it (``step_means``), instead of each micro-batch's own
    mean; from the second step on the loop's running mean is used, as before.

    Runs before the step's first backward, as every collective of the step must (``train._padding_passes``). Every
    rank runs as many forwards as the busiest one (ZeRO-3 gathers inside each forward, the LoRA reference's
    included): a rank with fewer micro-batches runs one-token forwards. The pass's reference forward covers the own
    rows too, so a KTO step still makes one reference forward per micro-batch (``train.reference_forwards``).
    Losses that need neither (apo_zero_unpaired; BCO after its first step) cost nothing extra.
    """
    updates, stats = offline_batches(policy, reference, tokenizer, algo, hparams, micro_batches,
                                     max_length=max_length, seed=seed, step=step)
    spec = algo.loss_spec
    hp, observers = _running(spec, hparams, memory)
    first = [(key, running) for key, stat, running in observers if stat.value is None]
    if spec.needs_kl_anchor or first:
        _step_pass(policy, reference, tokenizer, algo, hp, micro_batches, updates[0], first, max_length, collectives)
    return updates, stats


def _rows(batch: dict, rows: slice, device) -> dict:
    """Rows of a padded batch, cut to their own width, on ``device``."""
    width = max(int(batch["attention_mask"][rows].sum(-1).max()), 2)
    return {k: batch[k][rows, :width].to(device) for k in ("input_ids", "attention_mask", "completion_mask")}


def _one_token_forward(model, device) -> None:
    model(input_ids=torch.zeros((1, 1), dtype=torch.long, device=device))


@torch.no_grad()
def _step_pass(policy, reference, tokenizer, algo, hp, micro_batches, batches, first, max_length,
               collectives) -> None:
    spec = algo.loss_spec
    anchor = spec.needs_kl_anchor
    device = next(policy.parameters()).device
    passes = int(collectives.all_reduce_max([len(micro_batches)])[0])
    kl_sum, kl_count, own = 0.0, 0, []
    for mb, batch in zip(micro_batches, batches):
        n = len(mb)
        rows = mismatched_rows(tokenizer, mb, max_length, matched=True) if anchor else batch
        n_rows = rows["input_ids"].shape[0]
        ref = torch.zeros(n_rows)
        if not anchor and "ref_logps" in batch:  # the own rows' cached reference log-probs (reference_cache)
            ref = batch["ref_logps"].float().cpu()
        elif reference.enabled:
            with reference.active() as ref_model:
                ref = sequence_logps(ref_model, _rows(rows, slice(0, n_rows), device))[0].float().cpu()
        start = 0 if first else n  # the own rows' policy log-probs only for a first step's running statistics
        seq = torch.zeros(n_rows)
        seq[start:] = sequence_logps(policy, _rows(rows, slice(start, n_rows), device))[0].float().cpu()
        if anchor:
            kl_sum += float((seq[n:].double() - ref[n:].double()).sum())
            kl_count += n
        if reference.enabled:
            batch["ref_logps"] = ref[:n]
        own.append((seq[:n], ref[:n], batch["desirable"], batch["completion_mask"][:, 1:].sum(-1)))
    for _ in range(passes - len(micro_batches)):  # as many forwards as the busiest rank (ZeRO-3)
        if reference.has_model:
            with reference.active() as ref_model:
                _one_token_forward(ref_model, device)
        _one_token_forward(policy, device)
    z0 = None
    if anchor:
        total, count = collectives.all_reduce_sum([kl_sum, kl_count])
        z0 = losses.kto_kl_anchor(torch.tensor(total / max(count, 1.0), dtype=torch.float64), torch.tensor(0.0))
        z0 = z0.float()
        for batch in batches:
            batch["kl_anchor"] = z0
    if first:
        sums = [0.0, 0.0] * len(first)
        for seq, ref, desirable, lengths in own:
            inputs, fn_hp = losses.unpaired_inputs(algo.loss, seq, ref, desirable, kl_anchor=z0, lengths=lengths,
                                                   **hp)
            for k, (_, running) in enumerate(first):
                values = running.observe(inputs, fn_hp).detach().double()
                sums[2 * k] += float(values.sum())
                sums[2 * k + 1] += values.numel()
        sums = collectives.all_reduce_sum(sums)
        means = {key: sums[2 * k] / sums[2 * k + 1] for k, (key, _) in enumerate(first) if sums[2 * k + 1]}
        for batch in batches:
            batch["step_means"] = means


def kto_partners(algo, hparams, *, pool: list, seed: int):
    """The unpaired Family's ``step_hook``: for a loss that needs KTO's z0, ``fn(step's examples, step) -> examples``
    annotated with their mismatched partners (:func:`~posttrain.data.collate.mismatched_partners`); None otherwise."""
    if not algo.loss_spec.needs_kl_anchor:
        return None
    return lambda examples, step: mismatched_partners(examples, pool, seed=seed, step=step)


def no_step_hook(algo, hparams, *, pool: list, seed: int):
    return None


def one_update(algo, hparams, micro_batches_per_rank: int | None = None) -> int:
    return 1
