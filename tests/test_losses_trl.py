"""Our losses equal TRL 1.x's, computed by TRL's OWN code on the same log-probs (tolerance 1e-5).

TRL computes its losses inside trainer methods that run the model forward, so each test builds a real tiny Qwen2
policy and reference (float64, no hub download) and calls the unbound trainer method on a minimal trainer object
holding exactly the attributes that method reads (copied from a real ``*Config`` the way each trainer's
``__init__`` copies them):

- DPO: ``DPOTrainer._compute_loss`` (every ``loss_type``; ``sft`` for RPO; f-divergences; WPO; LD-DPO),
- CPO / SimPO / AlphaPO: ``CPOTrainer.get_batch_loss_metrics`` (``concatenated_forward`` + ``cpo_loss`` + NLL),
- ORPO: ``ORPOTrainer.get_batch_loss_metrics``,
- KTO: ``KTOTrainer._compute_loss`` (``kto`` incl. its KL anchor from mismatched pairs, ``apo_zero_unpaired``).

Forward hooks record the log-probs the trainer computed (fused LM head) or its logits, and our pure functions get
the summed log-probs of exactly those. TRL returns the batch mean, so we compare with ``ours.mean()``.
Allowed differences (see ``posttrain.losses.pairwise``): TRL's NLL terms are token means over the whole batch (we
average per example) -- compared with equal chosen lengths -- and TRL's ORPO NLL also counts prompt tokens --
compared with a one-token prompt, whose only token is never a label.
"""

from __future__ import annotations

import collections
import os
import types
import warnings

import pytest
import torch

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
trl = pytest.importorskip("trl")
transformers = pytest.importorskip("transformers")

from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer  # noqa: E402
from trl.trainer.utils import add_fused_lm_head  # noqa: E402

from posttrain.losses.options import ld_dpo_logps, log_sum_sq_probs, wpo_weights  # noqa: E402
from posttrain.losses.pairwise import pairwise  # noqa: E402
from posttrain.losses.unpaired import kto_kl_anchor, unpaired  # noqa: E402

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from trl.experimental.cpo import CPOConfig, CPOTrainer
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

TOL = 1e-5
VOCAB = 64
PAD = 0


# ------------------------------------------------------------------------------------------------ fixtures


def _tiny_model(seed: int):
    torch.manual_seed(seed)
    cfg = transformers.Qwen2Config(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, intermediate_size=64,
        vocab_size=VOCAB, max_position_embeddings=64,
        initializer_range=0.5,  # peaked distributions: log-ratios of O(10)
    )
    return transformers.Qwen2ForCausalLM(cfg).double().eval()


class _Recorder:
    """Forward hook that records (input_ids, output) of every call."""

    def __init__(self, model):
        self.calls = []
        model.register_forward_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs, out):
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.calls.append((ids, out))

    def find(self, input_ids):
        hits = [
            out for ids, out in self.calls
            if ids is not None and ids.shape == input_ids.shape and torch.equal(ids, input_ids)
        ]
        assert hits, "the trainer did not run the model on these inputs"
        return hits[-1]


@pytest.fixture(scope="module")
def models():
    policy, ref = _tiny_model(0), _tiny_model(1)
    # as DPOTrainer/KTOTrainer.__init__ do, with every optional output (WPO's log_sum_sq_probs; the KTO tests also
    # swap the roles of the two models); without fused_lm_head=True the patched forward is the original one, which
    # the CPO/ORPO trainers use
    for m in (policy, ref):
        add_fused_lm_head(m, outputs=("log_probs", "entropy", "mean_logits", "is_top1", "log_sum_sq_probs"))
    return types.SimpleNamespace(policy=policy, ref=ref, rec_policy=_Recorder(policy), rec_ref=_Recorder(ref))


class _Accelerator:
    device = torch.device("cpu")

    def gather_for_metrics(self, x):
        return x

    def gather(self, x):
        return x

    def unwrap_model(self, m):
        return m


def _metrics():
    return {"train": collections.defaultdict(list), "eval": collections.defaultdict(list)}


def _bare(cls, **attrs):
    """A trainer object without ``__init__`` (no data, no optimizer): its methods, plus the attributes given."""
    obj = cls.__new__(cls)
    for k, v in attrs.items():
        setattr(obj, k, v)
    return obj


def _cfg(cls, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls(output_dir="/tmp/posttrain-test-trl", use_cpu=True, bf16=False, report_to="none", **kw)


def _sequences(prompt_len, lengths, seed):
    """Right-padded rows ``prompt + completion``: input_ids, attention_mask, completion_mask."""
    g = torch.Generator().manual_seed(seed)
    n, width = len(lengths), prompt_len + max(lengths) + 1
    ids = torch.randint(1, VOCAB, (n, width), generator=g)
    attn = torch.zeros(n, width, dtype=torch.long)
    comp = torch.zeros(n, width, dtype=torch.long)
    for i, c in enumerate(lengths):
        attn[i, : prompt_len + c] = 1
        comp[i, prompt_len : prompt_len + c] = 1
    return ids * attn, attn, comp


# ------------------------------------------------------------------------------------------------ DPO

CHOSEN_VARIED = [5, 7, 9, 4, 6]
REJECTED_VARIED = [8, 3, 6, 9, 5]
CHOSEN_EQUAL = [6, 6, 6, 6, 6]


def _dpo_batch(chosen_lens, rejected_lens, seed=0):
    ids, attn, comp = _sequences(3, list(chosen_lens) + list(rejected_lens), seed)
    return dict(input_ids=ids, attention_mask=attn, completion_mask=comp)


def _run_dpo(models, inputs, **cfg_kw):
    """DPOTrainer._compute_loss on a minimal trainer; returns (TRL loss, per-token policy/ref log-probs [2B, T-1])."""
    args = _cfg(DPOConfig, **cfg_kw)
    fake = _bare(
        DPOTrainer, model=models.policy, ref_model=models.ref, accelerator=_Accelerator(), args=args,
        aux_loss_enabled=False,
        # the attributes DPOTrainer.__init__ copies from its config
        beta=args.beta, precompute_ref_logps=args.precompute_ref_log_probs, loss_types=args.loss_type,
        loss_weights=args.loss_weights or [1.0] * len(args.loss_type), ld_alpha=args.ld_alpha,
        f_divergence_type=args.f_divergence_type, f_alpha_divergence_coef=args.f_alpha_divergence_coef,
        label_smoothing=args.label_smoothing, use_weighting=args.use_weighting,
        _metrics=_metrics(), _total_train_tokens=0, _tp_size=1,
    )
    loss = DPOTrainer._compute_loss(fake, models.policy, inputs, False)
    pol = models.rec_policy.find(inputs["input_ids"]).log_probs
    ref = models.rec_ref.find(inputs["input_ids"]).log_probs
    return loss, pol, ref


def _ours_dpo(name, inputs, pol_tok, ref_tok, **hp):
    mask = inputs["completion_mask"][:, 1:].to(pol_tok.dtype)
    s_pol, s_ref, lens = (pol_tok * mask).sum(1), (ref_tok * mask).sum(1), mask.sum(1)
    pc, pr = s_pol.chunk(2)
    rc, rr = s_ref.chunk(2)
    lc, lr = lens.chunk(2)
    return pairwise(name, pc, pr, rc, rr, chosen_len=lc, rejected_len=lr, **hp)


# (our name, our hparams, DPOConfig overrides)
DPO_CASES = [
    ("dpo", dict(beta=0.1), dict(loss_type=["sigmoid"], beta=0.1)),
    ("dpo", dict(beta=0.3), dict(loss_type=["sigmoid"], beta=0.3)),
    ("dpo_norm", dict(beta=2.0), dict(loss_type=["sigmoid_norm"], beta=2.0)),
    ("hinge", dict(beta=0.1), dict(loss_type=["hinge"], beta=0.1)),
    ("ipo", dict(beta=0.1), dict(loss_type=["ipo"], beta=0.1)),
    ("ipo", dict(beta=0.5), dict(loss_type=["ipo"], beta=0.5)),
    ("exo", dict(beta=0.1, eps=1e-3), dict(loss_type=["exo_pair"], beta=0.1, label_smoothing=1e-3)),
    ("exo", dict(beta=0.2, eps=0.2), dict(loss_type=["exo_pair"], beta=0.2, label_smoothing=0.2)),
    ("nca", dict(beta=0.1), dict(loss_type=["nca_pair"], beta=0.1)),
    ("robust_dpo", dict(beta=0.1, eps=0.1), dict(loss_type=["robust"], beta=0.1, label_smoothing=0.1)),
    ("robust_dpo", dict(beta=0.2, eps=0.3), dict(loss_type=["robust"], beta=0.2, label_smoothing=0.3)),
    ("bco", dict(beta=0.1), dict(loss_type=["bco_pair"], beta=0.1)),
    ("sppo", dict(beta=0.1), dict(loss_type=["sppo_hard"], beta=0.1)),
    ("aot", dict(beta=0.1), dict(loss_type=["aot"], beta=0.1)),
    ("aot", dict(beta=0.2, eps=0.1), dict(loss_type=["aot"], beta=0.2, label_smoothing=0.1)),
    ("aot_unpaired", dict(beta=0.1), dict(loss_type=["aot_unpaired"], beta=0.1)),
    ("aot_unpaired", dict(beta=0.2, eps=0.1), dict(loss_type=["aot_unpaired"], beta=0.2, label_smoothing=0.1)),
    ("apo_zero", dict(beta=0.1), dict(loss_type=["apo_zero"], beta=0.1)),
    ("apo_down", dict(beta=0.1), dict(loss_type=["apo_down"], beta=0.1)),
    ("discopop", dict(beta=0.1), dict(loss_type=["discopop"], beta=0.1)),
    ("discopop", dict(beta=0.05, tau=0.5), dict(loss_type=["discopop"], beta=0.05, discopop_tau=0.5)),
    # f-DPO scores on the losses TRL allows them for
    ("dpo", dict(beta=0.1, f_divergence="forward_kl"), dict(loss_type=["sigmoid"], f_divergence_type="forward_kl")),
    ("dpo", dict(beta=0.1, f_divergence="js_divergence"),
     dict(loss_type=["sigmoid"], f_divergence_type="js_divergence")),
    ("dpo", dict(beta=0.1, f_divergence="alpha_divergence"),
     dict(loss_type=["sigmoid"], f_divergence_type="alpha_divergence")),
    ("dpo", dict(beta=0.1, f_divergence="alpha_divergence", f_alpha=0.8),
     dict(loss_type=["sigmoid"], f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.8)),
    ("ipo", dict(beta=0.1, f_divergence="js_divergence"), dict(loss_type=["ipo"], f_divergence_type="js_divergence")),
    ("dpo_norm", dict(beta=1.0, f_divergence="alpha_divergence", f_alpha=0.9),
     dict(loss_type=["sigmoid_norm"], beta=1.0, f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.9)),
    ("hinge", dict(beta=0.1, f_divergence="forward_kl"), dict(loss_type=["hinge"], f_divergence_type="forward_kl")),
    ("exo", dict(beta=0.1, f_divergence="js_divergence"),
     dict(loss_type=["exo_pair"], label_smoothing=1e-3, f_divergence_type="js_divergence")),
    ("robust_dpo", dict(beta=0.1, eps=0.1, f_divergence="alpha_divergence"),
     dict(loss_type=["robust"], label_smoothing=0.1, f_divergence_type="alpha_divergence")),
    ("discopop", dict(beta=0.1, f_divergence="js_divergence"),
     dict(loss_type=["discopop"], f_divergence_type="js_divergence")),
]


@pytest.mark.parametrize(
    "name,ours_hp,trl_cfg", DPO_CASES, ids=[f"{c[0]}-{c[2]['loss_type'][0]}-{i}" for i, c in enumerate(DPO_CASES)]
)
def test_dpo_trainer_losses(models, name, ours_hp, trl_cfg):
    inputs = _dpo_batch(CHOSEN_VARIED, REJECTED_VARIED)
    trl_loss, pol, ref = _run_dpo(models, inputs, **trl_cfg)
    ours = _ours_dpo(name, inputs, pol, ref, **ours_hp)
    assert ours.shape == (len(CHOSEN_VARIED),)
    assert torch.isfinite(trl_loss)
    assert abs(ours.mean().item() - trl_loss.item()) < TOL, (ours.mean().item(), trl_loss.item())


def test_dpo_inputs_are_not_degenerate(models):
    """The log-ratio margins span several units of 1/beta, so the equivalence tests can tell the losses apart."""
    inputs = _dpo_batch(CHOSEN_VARIED, REJECTED_VARIED)
    _, pol, ref = _run_dpo(models, inputs, loss_type=["sigmoid"])
    mask = inputs["completion_mask"][:, 1:].double()
    rho = ((pol - ref) * mask).sum(1)
    margin = rho[:5] - rho[5:]
    assert margin.abs().max() > 10 and (margin > 0).any() and (margin < 0).any()


@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_rpo_equals_trl_sigmoid_plus_sft(models, alpha):
    """RPO = TRL loss_type=['sigmoid','sft'], loss_weights=[1, alpha]; TRL's SFT term is a batch token mean, so equal
    chosen lengths (rejected lengths may differ)."""
    inputs = _dpo_batch(CHOSEN_EQUAL, REJECTED_VARIED, seed=1)
    trl_loss, pol, ref = _run_dpo(models, inputs, loss_type=["sigmoid", "sft"], loss_weights=[1.0, alpha], beta=0.1)
    ours = _ours_dpo("rpo", inputs, pol, ref, beta=0.1, alpha=alpha)
    assert abs(ours.mean().item() - trl_loss.item()) < TOL


def test_rpo_nll_differs_from_trl_only_by_token_vs_example_mean(models):
    """With unequal chosen lengths TRL's NLL is the batch token mean; ours is the mean of per-example means."""
    inputs = _dpo_batch(CHOSEN_VARIED, REJECTED_VARIED, seed=2)
    trl_loss, pol, ref = _run_dpo(models, inputs, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 1.0])
    ours = _ours_dpo("rpo", inputs, pol, ref, beta=0.1, alpha=1.0)
    dpo = _ours_dpo("dpo", inputs, pol, ref, beta=0.1)
    mask = inputs["completion_mask"][:, 1:].double()
    chosen_tok, chosen_mask = (pol * mask).chunk(2)[0], mask.chunk(2)[0]
    token_mean_nll = -chosen_tok.sum() / chosen_mask.sum()
    assert abs((dpo.mean() + token_mean_nll).item() - trl_loss.item()) < TOL
    assert abs(ours.mean().item() - trl_loss.item()) > 1e-3  # the documented, deliberate difference


def test_wpo_weights_match_trl_use_weighting(models):
    """dpo * wpo_weights(chosen) * wpo_weights(rejected) = TRL sigmoid with use_weighting=True; our
    log_sum_sq_probs is computed from the model's logits, TRL's by its fused LM head."""
    inputs = _dpo_batch(CHOSEN_VARIED, REJECTED_VARIED, seed=3)
    trl_loss, pol, ref = _run_dpo(models, inputs, loss_type=["sigmoid"], use_weighting=True)
    with torch.no_grad():
        logits = models.policy(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits[:, :-1]
    mask = inputs["completion_mask"][:, 1:]
    w = wpo_weights(pol, log_sum_sq_probs(logits), mask)
    assert not w.requires_grad and ((w > 0) & (w <= 1.0 + 1e-9)).all()
    wc, wr = w.chunk(2)
    ours = _ours_dpo("dpo", inputs, pol, ref) * wc * wr
    assert abs(ours.mean().item() - trl_loss.item()) < TOL
    # the weights matter here: unweighted DPO is far from TRL's weighted loss
    assert abs(_ours_dpo("dpo", inputs, pol, ref).mean().item() - trl_loss.item()) > 1e-3


@pytest.mark.parametrize("ld_alpha", [0.5, 0.0])
def test_ld_dpo_matches_trl_ld_alpha(models, ld_alpha):
    inputs = _dpo_batch(CHOSEN_VARIED, REJECTED_VARIED, seed=4)
    trl_loss, pol, ref = _run_dpo(models, inputs, loss_type=["sigmoid"], ld_alpha=ld_alpha)
    mask = inputs["completion_mask"][:, 1:]
    mc, mr = mask.chunk(2)
    (pol_w, pol_l), (ref_w, ref_l) = pol.chunk(2), ref.chunk(2)
    pc, pr = ld_dpo_logps(pol_w, mc, pol_l, mr, alpha=ld_alpha)
    rc, rr = ld_dpo_logps(ref_w, mc, ref_l, mr, alpha=ld_alpha)
    ours = pairwise("dpo", pc, pr, rc, rr)
    assert abs(ours.mean().item() - trl_loss.item()) < TOL


# ------------------------------------------------------------------------------------------------ CPO / ORPO


def _pair_batch(prompt_len, chosen_lens, rejected_lens, seed):
    """CPO/ORPO batch format: chosen_/rejected_ input_ids, attention_mask, labels (prompt and padding = -100)."""
    batch = {}
    for side, lens, s in (("chosen", chosen_lens, seed), ("rejected", rejected_lens, seed + 100)):
        ids, attn, comp = _sequences(prompt_len, lens, s)
        batch[f"{side}_input_ids"] = ids
        batch[f"{side}_attention_mask"] = attn
        batch[f"{side}_labels"] = ids.masked_fill(comp == 0, -100)
    return batch


def _ours_from_logits(name, models, batch, **hp):
    """Summed log-probs from the logits TRL's forward produced (recorded by the hook), then our loss."""
    b = batch["chosen_input_ids"].shape[0]
    ids_w, ids_l = batch["chosen_input_ids"], batch["rejected_input_ids"]
    width = max(ids_w.shape[1], ids_l.shape[1])
    pad = lambda t, v: torch.nn.functional.pad(t, (0, width - t.shape[1]), value=v)  # noqa: E731
    all_ids = torch.cat([pad(ids_w, PAD), pad(ids_l, PAD)])
    labels = torch.cat([pad(batch["chosen_labels"], -100), pad(batch["rejected_labels"], -100)])
    logits = models.rec_policy.find(all_ids).logits
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    tgt = labels[:, 1:]
    mask = (tgt != -100).double()
    tok = logp.gather(-1, tgt.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
    s, lens = tok.sum(1), mask.sum(1)
    zeros = torch.zeros(b, dtype=s.dtype)
    return pairwise(name, s[:b], s[b:], zeros, zeros, chosen_len=lens[:b], rejected_len=lens[b:], **hp)


def _cpo_trainer(args):
    fake = _bare(
        CPOTrainer, accelerator=_Accelerator(), is_encoder_decoder=False, pad_token_id=PAD, aux_loss_enabled=False,
        # the attributes CPOTrainer.__init__ copies from its config
        beta=args.beta, label_smoothing=args.label_smoothing, loss_type=args.loss_type, cpo_alpha=args.cpo_alpha,
        alpha=args.alpha,
    )
    if args.loss_type == "simpo":
        fake.simpo_gamma = args.simpo_gamma
    return fake


# (our name, our hparams, CPOConfig overrides); hinge and ipo are CPO's reference-free variants = ours with zero refs
CPO_CASES = [
    ("cpo", dict(beta=0.1, alpha=1.0), dict(loss_type="sigmoid", beta=0.1, cpo_alpha=1.0)),
    ("cpo", dict(beta=0.3, alpha=0.0), dict(loss_type="sigmoid", beta=0.3, cpo_alpha=0.0)),
    ("simpo", dict(beta=2.0, gamma=0.5), dict(loss_type="simpo", beta=2.0, simpo_gamma=0.5, cpo_alpha=0.0)),
    ("simpo", dict(beta=0.1, gamma=0.5), dict(loss_type="simpo", beta=0.1, cpo_alpha=0.0)),
    ("alphapo", dict(beta=2.5, gamma=0.1, alpha=0.25),
     dict(loss_type="alphapo", beta=2.5, simpo_gamma=0.1, alpha=0.25)),
    ("alphapo", dict(beta=1.0, gamma=0.5, alpha=-0.5), dict(loss_type="alphapo", beta=1.0, alpha=-0.5)),
    ("hinge", dict(beta=0.1), dict(loss_type="hinge", beta=0.1, cpo_alpha=0.0)),
    ("ipo", dict(beta=0.5), dict(loss_type="ipo", beta=0.5, cpo_alpha=0.0)),
]


@pytest.mark.parametrize(
    "name,ours_hp,trl_cfg", CPO_CASES, ids=[f"{c[0]}-{c[2]['loss_type']}-{i}" for i, c in enumerate(CPO_CASES)]
)
def test_cpo_trainer_losses(models, name, ours_hp, trl_cfg):
    args = _cfg(CPOConfig, **trl_cfg)
    batch = _pair_batch(3, CHOSEN_EQUAL, REJECTED_VARIED, seed=5)  # equal chosen lengths: TRL's NLL is a token mean
    trl_loss, _ = CPOTrainer.get_batch_loss_metrics(_cpo_trainer(args), models.policy, batch)
    ours = _ours_from_logits(name, models, batch, **ours_hp)
    assert abs(ours.mean().item() - trl_loss.item()) < TOL, (ours.mean().item(), trl_loss.item())


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_orpo_trainer_loss(models, beta):
    args = _cfg(ORPOConfig, beta=beta)
    fake = _bare(
        ORPOTrainer, accelerator=_Accelerator(), is_encoder_decoder=False, aux_loss_enabled=False, beta=args.beta,
        padding_value=args.padding_value if args.padding_value is not None else PAD,
    )
    # one-token prompt (never a label) and equal chosen lengths: TRL's NLL = our per-example completion NLL mean
    batch = _pair_batch(1, CHOSEN_EQUAL, REJECTED_VARIED, seed=6)
    trl_loss, _ = ORPOTrainer.get_batch_loss_metrics(fake, models.policy, batch)
    ours = _ours_from_logits("orpo", models, batch, beta=beta)
    assert abs(ours.mean().item() - trl_loss.item()) < TOL, (ours.mean().item(), trl_loss.item())


# ------------------------------------------------------------------------------------------------ KTO

DESIRABLE = [True, False, True, True, False, False]
KTO_LENS = [5, 7, 4, 8, 6, 3]


def _kto_batch(seed=7):
    ids, attn, comp = _sequences(3, KTO_LENS, seed)
    # mismatched pairs: prompt i with the completion of example i+1 (rotation by one, as TRL's collator)
    n = len(KTO_LENS)
    kl_lens = [KTO_LENS[(i + 1) % n] for i in range(n)]
    kl_ids, kl_attn, kl_comp = _sequences(3, kl_lens, seed)
    for i in range(n):
        j = (i + 1) % n
        kl_ids[i, :3] = ids[i, :3]
        kl_ids[i, 3 : 3 + kl_lens[i]] = ids[j, 3 : 3 + KTO_LENS[j]]
    return dict(input_ids=ids, attention_mask=attn, completion_mask=comp, label=torch.tensor(DESIRABLE),
                KL_input_ids=kl_ids, KL_attention_mask=kl_attn, KL_completion_mask=kl_comp)


def _run_kto(policy, ref, rec_policy, rec_ref, inputs, **cfg_kw):
    args = _cfg(KTOConfig, **cfg_kw)
    fake = _bare(
        KTOTrainer, model=policy, ref_model=ref, accelerator=_Accelerator(), args=args, aux_loss_enabled=False,
        # the attributes KTOTrainer.__init__ copies from its config
        beta=args.beta, precompute_ref_logps=args.precompute_ref_log_probs, loss_type=args.loss_type,
        desirable_weight=args.desirable_weight, undesirable_weight=args.undesirable_weight,
        calculate_KL=args.loss_type not in ["apo_zero_unpaired"],
        _metrics=_metrics(), _total_train_tokens=0, _tp_size=1,
    )
    loss = KTOTrainer._compute_loss(fake, policy, inputs, False)
    mask = inputs["completion_mask"][:, 1:].double()
    s_pol = (rec_policy.find(inputs["input_ids"]).log_probs * mask).sum(1)
    s_ref = (rec_ref.find(inputs["input_ids"]).log_probs * mask).sum(1)
    z0 = None
    if fake.calculate_KL:
        kl_mask = inputs["KL_completion_mask"][:, 1:].double()
        z0 = kto_kl_anchor((rec_policy.find(inputs["KL_input_ids"]).log_probs * kl_mask).sum(1),
                           (rec_ref.find(inputs["KL_input_ids"]).log_probs * kl_mask).sum(1))
    return loss, s_pol, s_ref, z0


@pytest.mark.parametrize("swap", [False, True], ids=["policy-ref", "ref-policy"])
@pytest.mark.parametrize("name,ours_hp,trl_cfg", [
    ("kto", dict(beta=0.1), dict(loss_type="kto", beta=0.1)),
    ("kto", dict(beta=0.3, lambda_d=1.3, lambda_u=0.7),
     dict(loss_type="kto", beta=0.3, desirable_weight=1.3, undesirable_weight=0.7)),
    ("apo_zero_unpaired", dict(beta=0.1), dict(loss_type="apo_zero_unpaired", beta=0.1)),
    ("apo_zero_unpaired", dict(beta=0.2, lambda_d=0.8, lambda_u=1.5),
     dict(loss_type="apo_zero_unpaired", beta=0.2, desirable_weight=0.8, undesirable_weight=1.5)),
])
def test_kto_trainer_losses(models, name, ours_hp, trl_cfg, swap):
    """Both orderings of the two tiny models, so that one of them has a positive KL anchor z0."""
    policy, ref, rp, rr = models.policy, models.ref, models.rec_policy, models.rec_ref
    if swap:
        policy, ref, rp, rr = ref, policy, rr, rp
    inputs = _kto_batch()
    trl_loss, s_pol, s_ref, z0 = _run_kto(policy, ref, rp, rr, inputs, **trl_cfg)
    ours = unpaired(name, s_pol, s_ref, inputs["label"], kl_anchor=z0, **ours_hp)
    assert ours.shape == (len(DESIRABLE),)
    assert abs(ours.mean().item() - trl_loss.item()) < TOL, (ours.mean().item(), trl_loss.item())


def test_kto_anchor_is_exercised(models):
    """One ordering of the models gives z0 > 0, so the KTO comparison above really tests the anchor."""
    inputs = _kto_batch()
    z = []
    for policy, ref, rp, rr in ((models.policy, models.ref, models.rec_policy, models.rec_ref),
                                (models.ref, models.policy, models.rec_ref, models.rec_policy)):
        z.append(_run_kto(policy, ref, rp, rr, inputs, loss_type="kto")[3].item())
    assert max(z) > 0.5 and min(z) == 0.0
