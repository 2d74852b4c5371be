"""Policy-gradient losses (posttrain.losses.policy_gradient): contract, on-policy gradients, clipping, KL, diagnostics,
and agreement with TRL's own GRPOTrainer / RLOOTrainer loss code on a tiny Qwen2."""

from __future__ import annotations

import math

import pytest
import torch

from posttrain.losses.policy_gradient import (
    POLICY_GRADIENT_LOSSES,
    aggregate,
    kl_estimate,
    pg_diagnostics,
    policy_gradient,
    policy_gradient_and_stats,
    ppo_value_loss,
)

ALL = ["cispo", "grpo", "gspo", "ppo", "reinforce_pp", "remax", "rloo", "sgrpo"]
CLIP_TOKEN = [("sgrpo", {}), ("reinforce_pp", {}), ("ppo", {}), ("grpo", {"loss_type": "grpo"}),
              ("grpo", {"loss_type": "bnpo"}), ("grpo", {"loss_type": "dr_grpo"}), ("grpo", {"loss_type": "dapo"})]


def _batch(seed=0, B=4, T=5):
    g = torch.Generator().manual_seed(seed)
    logps = (-torch.rand(B, T, generator=g) * 3).requires_grad_(True)
    mask = torch.ones(B, T)
    mask[1, 3:] = 0
    mask[2, 1:] = 0
    adv = torch.tensor([1.0, -0.5, 2.0, -1.5])[:B]
    return logps, mask, adv


def _onpolicy_expected_grad(name, hp, adv, mask):
    """d loss / d logps at ratio 1: the plain policy gradient -A * grad(logp), scaled by the method's aggregation."""
    B, T = mask.shape
    a = adv.unsqueeze(1).expand(B, T) if adv.dim() == 1 else adv
    n_i = mask.sum(1, keepdim=True)
    agg = {"gspo": "seq_token_mean", "rloo": "seq_sum"}.get(name, "token_mean")
    if name == "grpo":
        agg = {"grpo": "seq_token_mean", "bnpo": "token_mean", "dapo": "token_mean",
               "dr_grpo": "dr"}[hp.get("loss_type", "dapo")]
    if agg == "token_mean":
        return -a * mask / hp.get("num_items", mask.sum())
    if agg == "seq_token_mean":
        return -a * mask / (B * n_i)
    if agg == "seq_sum":  # rloo: d exp(sum_t log-ratio) / d logp_t = ratio = 1, one loss per sequence
        return -a * mask / B
    return -a * mask / (B * hp["max_completion_length"])


# --- contract -----------------------------------------------------------------------------------------------------


def test_registry_names_and_defaults():
    assert sorted(POLICY_GRADIENT_LOSSES) == ALL
    d = {n: s.defaults for n, s in POLICY_GRADIENT_LOSSES.items()}
    assert (d["sgrpo"]["eps_low"], d["sgrpo"]["eps_high"]) == (0.2, 0.2)
    assert (d["gspo"]["eps_low"], d["gspo"]["eps_high"]) == (3e-4, 4e-4)
    assert (d["cispo"]["eps_low"], d["cispo"]["eps_high"]) == (0.2, 0.2)
    assert d["grpo"]["loss_type"] == "dapo" and d["grpo"]["max_completion_length"] == 512
    assert "eps_low" not in d["remax"]
    for spec in POLICY_GRADIENT_LOSSES.values():
        assert spec.defaults["kl_coef"] == 0.0 and spec.defaults["kl_estimator"] == "k3"
        assert spec.needs_reference() is False
        assert spec.needs_reference(kl_coef=0.05) is True


def test_spec_metadata_for_the_registry():
    for name, spec in POLICY_GRADIENT_LOSSES.items():
        assert spec.reference_free is True  # kl_coef defaults to 0
        assert spec.length_normalized is (name == "gspo")
        assert spec.level == ("sequence" if name in ("gspo", "rloo") else "token")


def test_half_precision_inputs_are_computed_in_float32():
    logps32, mask, adv = _batch()
    logps = logps32.detach().to(torch.bfloat16).requires_grad_(True)
    old = logps.detach().float() + 0.1
    loss = policy_gradient("sgrpo", logps, old, adv, mask)
    assert loss.dtype == torch.float32
    (g,) = torch.autograd.grad(loss, logps)
    assert g.dtype == torch.bfloat16 and (g[mask.bool()] != 0).all()
    torch.testing.assert_close(loss, policy_gradient("sgrpo", logps.detach().float(), old, adv, mask))


def test_spec_fn_is_the_named_loss():
    logps, mask, adv = _batch()
    old = logps.detach() + 0.1
    for name, spec in POLICY_GRADIENT_LOSSES.items():
        assert torch.equal(spec.fn(logps, old, adv, mask), policy_gradient(name, logps, old, adv, mask))


def test_unknown_name_lists_known_ones():
    logps, mask, adv = _batch()
    with pytest.raises(ValueError) as e:
        policy_gradient("grpoo", logps, None, adv, mask)
    for name in ALL:
        assert name in str(e.value)


@pytest.mark.parametrize("name", ALL)
def test_unknown_hparam_raises(name):
    logps, mask, adv = _batch()
    with pytest.raises(ValueError, match="unknown hyperparameter.*beta"):
        policy_gradient(name, logps, None, adv, mask, beta=0.1)
    with pytest.raises(ValueError, match="unknown hyperparameter"):
        POLICY_GRADIENT_LOSSES[name].needs_reference(clip=0.3)


def test_bad_values_and_shapes_raise():
    logps, mask, adv = _batch()
    with pytest.raises(ValueError, match="loss_type.*bnpo"):
        policy_gradient("grpo", logps, None, adv, mask, loss_type="cispo")
    with pytest.raises(ValueError, match="kl_estimator"):
        policy_gradient("sgrpo", logps, None, adv, mask, kl_estimator="k7")
    with pytest.raises(ValueError, match="eps_low"):
        policy_gradient("sgrpo", logps, None, adv, mask, eps_low=-0.1)
    with pytest.raises(ValueError, match="advantages"):
        policy_gradient("sgrpo", logps, None, adv[:3], mask)
    with pytest.raises(ValueError, match="mask"):
        policy_gradient("sgrpo", logps, None, adv, mask[:, :3])
    with pytest.raises(ValueError, match="old_logps"):
        policy_gradient("sgrpo", logps, logps.detach()[:, :2], adv, mask)


@pytest.mark.parametrize("name", ALL)
def test_kl_needs_reference_and_is_ignored_at_zero(name):
    logps, mask, adv = _batch()
    old = logps.detach() - 0.05
    with pytest.raises(ValueError, match="ref_logps"):
        policy_gradient(name, logps, old, adv, mask, kl_coef=0.1)
    ref = logps.detach() + 0.3
    base = policy_gradient(name, logps, old, adv, mask)
    assert torch.equal(base, policy_gradient(name, logps, old, adv, mask, ref_logps=ref))
    assert torch.equal(base, policy_gradient(name, logps, old, adv, mask, ref_logps=ref, kl_coef=0.0))
    assert not torch.allclose(base, policy_gradient(name, logps, old, adv, mask, ref_logps=ref, kl_coef=0.1))


# --- on-policy: ratio 1, plain policy gradient on every completion token ----------------------------------------


ONPOLICY = [(n, {}) for n in ALL if n != "grpo"] + [
    ("grpo", {"loss_type": t}) for t in ("grpo", "bnpo", "dapo")] + [
    ("grpo", {"loss_type": "dr_grpo", "max_completion_length": 8}), ("grpo", {"loss_type": "dapo", "num_items": 40}),
    ("sgrpo", {"num_items": 33}), ("cispo", {"eps_low": None, "eps_high": 4.0})]


@pytest.mark.parametrize("name,hp", ONPOLICY, ids=[f"{n}-{h}" for n, h in ONPOLICY])
def test_first_pass_ratio_is_one_and_gradient_is_plain_policy_gradient(name, hp):
    logps, mask, adv = _batch()
    old = logps.detach()  # first, strictly on-policy pass
    loss, stats = policy_gradient_and_stats(name, logps, old, adv, mask, **hp)
    assert stats["ratio_mean"] == 1.0 and stats["ratio_min"] == 1.0 and stats["ratio_max"] == 1.0
    assert stats["clip_frac"] == 0.0 and stats["kl_old"] == 0.0
    (grad,) = torch.autograd.grad(loss, logps)
    expected = _onpolicy_expected_grad(name, hp, adv, mask)
    torch.testing.assert_close(grad, expected, atol=1e-7, rtol=1e-6)
    # every masked-in token gets the advantage, no masked-out token moves
    assert (grad[mask.bool()] != 0).all()
    assert (grad[~mask.bool()] == 0).all()
    # old_logps=None is the same first pass
    torch.testing.assert_close(policy_gradient(name, logps, None, adv, mask, **hp), loss)


def test_onpolicy_loss_values():
    logps, mask, adv = _batch()
    a = adv.unsqueeze(1).expand_as(mask)
    token_mean = float((-a * mask).sum() / mask.sum())  # (-1*5 + 0.5*3 - 2*1 + 1.5*5) / 14 = 2/14
    assert math.isclose(token_mean, 2 / 14, rel_tol=1e-6)
    for name in ("sgrpo", "ppo", "reinforce_pp", "remax"):
        assert math.isclose(float(policy_gradient(name, logps, None, adv, mask).detach()), 2 / 14, rel_tol=1e-6)
    # per-sequence means: -mean(A) = -(1 - 0.5 + 2 - 1.5)/4 = -0.25
    for name, hp in (("gspo", {}), ("rloo", {}), ("grpo", {"loss_type": "grpo"})):
        assert math.isclose(float(policy_gradient(name, logps, None, adv, mask, **hp).detach()), -0.25, rel_tol=1e-6)
    # cispo's value is -A * logp (token mean)
    expect = float((-a * logps.detach() * mask).sum() / mask.sum())
    assert math.isclose(float(policy_gradient("cispo", logps, None, adv, mask).detach()), expect, rel_tol=1e-6)


def test_token_level_advantages_are_used_per_token():
    logps, mask, _ = _batch()
    adv = torch.arange(20, dtype=torch.float32).reshape(4, 5) - 7.0
    loss = policy_gradient("sgrpo", logps, None, adv, mask)
    (grad,) = torch.autograd.grad(loss, logps)
    torch.testing.assert_close(grad, -adv * mask / mask.sum())


def test_dapo_num_items_makes_grad_accumulation_exact():
    logps, mask, adv = _batch()
    full = policy_gradient("grpo", logps, None, adv, mask, loss_type="dapo")
    n = mask.sum()
    parts = sum(policy_gradient("grpo", logps[s], None, adv[s], mask[s], loss_type="dapo", num_items=n)
                for s in (slice(0, 1), slice(1, 4)))
    torch.testing.assert_close(parts, full)
    # bnpo (micro-batch mean) is not invariant
    parts_bnpo = sum(policy_gradient("grpo", logps[s], None, adv[s], mask[s], loss_type="bnpo")
                     for s in (slice(0, 1), slice(1, 4)))
    assert not torch.allclose(parts_bnpo, full)


# --- clipping -----------------------------------------------------------------------------------------------------


def _logps_with_ratios(ratios, seed=0):
    g = torch.Generator().manual_seed(seed)
    logps = (-torch.rand(*ratios.shape, generator=g) * 3).requires_grad_(True)
    old = logps.detach() - torch.log(ratios)
    return logps, old


TOKEN_RATIOS = torch.tensor([[1.5, 0.5, 1.1], [0.5, 1.5, 0.9]])  # row 0: A > 0, row 1: A < 0
TOKEN_ADV = torch.tensor([1.0, -2.0])
# PPO-clip removes the gradient where the ratio left the trust region in the direction the advantage pushes it
TOKEN_CLIPPED = torch.tensor([[True, False, False], [True, False, False]])


@pytest.mark.parametrize("name,hp", CLIP_TOKEN, ids=[f"{n}-{h}" for n, h in CLIP_TOKEN])
def test_token_clipping_zeroes_gradient_for_both_signs(name, hp):
    hp = dict(hp, **({"max_completion_length": 3} if hp.get("loss_type") == "dr_grpo" else {}))
    logps, old = _logps_with_ratios(TOKEN_RATIOS)
    mask = torch.ones(2, 3)
    loss, stats = policy_gradient_and_stats(name, logps, old, TOKEN_ADV, mask, **hp)
    (grad,) = torch.autograd.grad(loss, logps)
    assert (grad[TOKEN_CLIPPED] == 0).all()
    assert (grad[~TOKEN_CLIPPED] != 0).all()
    # unclipped tokens: d(-w A)/d logp = -w A, scaled by the aggregation (every row has 3 tokens here)
    a = TOKEN_ADV.unsqueeze(1).expand(2, 3)
    # 6 = tokens (token mean) = B * n_i (grpo) = B * max_completion_length (dr_grpo)
    torch.testing.assert_close(grad[~TOKEN_CLIPPED], (-TOKEN_RATIOS * a / 6)[~TOKEN_CLIPPED])
    assert stats["clip_frac_high"] == pytest.approx(1 / 6) and stats["clip_frac_low"] == pytest.approx(1 / 6)
    assert stats["clip_frac"] == pytest.approx(2 / 6)
    assert stats["ratio_max"] == pytest.approx(1.5) and stats["ratio_min"] == pytest.approx(0.5)


def test_asymmetric_clip_and_delta():
    logps, old = _logps_with_ratios(torch.tensor([[1.25, 1.25, 3.0]]))
    mask = torch.ones(1, 3)
    adv = torch.tensor([1.0])
    (g,) = torch.autograd.grad(policy_gradient("sgrpo", logps, old, adv, mask, eps_high=0.28), logps)
    assert (g[0, :2] != 0).all() and g[0, 2] == 0  # 1.25 < 1.28 is inside, 3.0 is clipped
    (g,) = torch.autograd.grad(policy_gradient("sgrpo", logps, old, adv, mask), logps)
    assert (g == 0).all()  # eps_high 0.2: all clipped
    # two-sided (INTELLECT-2) delta caps the ratio for negative advantages
    logps, old = _logps_with_ratios(torch.tensor([[3.0, 1.5]]))
    loss = policy_gradient("grpo", logps, old, torch.tensor([-1.0]), mask[:, :2], loss_type="bnpo", delta=2.0)
    assert float(loss.detach()) == pytest.approx((2.0 + 1.5) / 2, rel=1e-6)


@pytest.mark.parametrize("name,eps,log_ratio", [("gspo", (3e-4, 4e-4), 1e-3), ("rloo", (0.2, 0.2), 0.5)])
def test_sequence_clipping_zeroes_gradient_for_both_signs(name, eps, log_ratio):
    mask = torch.ones(4, 4)
    mask[1, 2:] = 0
    n = mask.sum(1, keepdim=True)
    # sequence log-ratio: mean (gspo) or sum (rloo) over tokens; rows: up/A+ (clipped), up/A- (free),
    # down/A- (clipped), down/A+ (free)
    seq = torch.tensor([[log_ratio], [log_ratio], [-log_ratio], [-log_ratio]])
    per_tok = seq if name == "gspo" else seq / n
    g = torch.Generator().manual_seed(3)
    logps = (-torch.rand(4, 4, generator=g) * 3).requires_grad_(True)
    old = logps.detach() - per_tok * mask
    adv = torch.tensor([1.0, -1.0, -1.0, 1.0])
    loss, stats = policy_gradient_and_stats(name, logps, old, adv, mask)
    (grad,) = torch.autograd.grad(loss, logps)
    assert (grad[0] == 0).all() and (grad[2] == 0).all()
    for row in (1, 3):
        assert (grad[row][mask[row].bool()] != 0).all() and (grad[row][~mask[row].bool()] == 0).all()
    s = torch.exp(seq)
    # d(-s A)/d logp_t = -s A / n (gspo) or -s A (rloo), then the mean over 4 sequences
    expect = -s * adv.unsqueeze(1) / (n if name == "gspo" else 1.0) / 4 * mask
    torch.testing.assert_close(grad[[1, 3]], expect[[1, 3]])
    assert stats["clip_frac"] == pytest.approx(0.5) and stats["ratio_mean"] == pytest.approx(float(s.mean()))


def test_cispo_clips_the_weight_not_the_gradient():
    logps, old = _logps_with_ratios(TOKEN_RATIOS)
    mask = torch.ones(2, 3)
    a = TOKEN_ADV.unsqueeze(1).expand(2, 3)
    (g,) = torch.autograd.grad(policy_gradient("cispo", logps, old, TOKEN_ADV, mask), logps)
    torch.testing.assert_close(g, -TOKEN_RATIOS.clamp(0.8, 1.2) * a / 6)  # symmetric [0.8, 1.2]
    (g,) = torch.autograd.grad(policy_gradient("cispo", logps, old, TOKEN_ADV, mask, eps_low=None, eps_high=0.3),
                               logps)
    torch.testing.assert_close(g, -TOKEN_RATIOS.clamp(max=1.3) * a / 6)  # MiniMax: no lower bound
    stats = pg_diagnostics("cispo", logps, old, TOKEN_ADV, mask)
    assert stats["clip_frac_low"] == pytest.approx(2 / 6) and stats["clip_frac_high"] == pytest.approx(2 / 6)


def test_remax_never_clips():
    logps, old = _logps_with_ratios(TOKEN_RATIOS * 3)
    mask = torch.ones(2, 3)
    (g,) = torch.autograd.grad(policy_gradient("remax", logps, old, TOKEN_ADV, mask), logps)
    torch.testing.assert_close(g, -3 * TOKEN_RATIOS * TOKEN_ADV.unsqueeze(1) / 6)


@pytest.mark.parametrize("name", ALL)
def test_padding_values_cannot_leak(name):
    logps, mask, adv = _batch()
    old = logps.detach() + 0.1 * torch.randn(4, 5, generator=torch.Generator().manual_seed(2))
    ref = logps.detach() - 0.2
    adv_tok = adv.unsqueeze(1).expand(4, 5).clone()
    clean = policy_gradient(name, logps, old, adv_tok, mask, ref_logps=ref, kl_coef=0.1)
    (g_clean,) = torch.autograd.grad(clean, logps)
    pad = ~mask.bool()
    dirty = [t.clone() for t in (logps.detach(), old, adv_tok, ref)]
    for t, v in zip(dirty, (-float("inf"), float("nan"), float("nan"), float("inf"))):
        t[pad] = v
    lp = dirty[0].requires_grad_(True)
    loss = policy_gradient(name, lp, dirty[1], dirty[2], mask, ref_logps=dirty[3], kl_coef=0.1)
    (g,) = torch.autograd.grad(loss, lp)
    torch.testing.assert_close(loss, clean)
    torch.testing.assert_close(g, g_clean)
    assert (g[pad] == 0).all()


def test_extreme_log_ratios_stay_finite():
    logps = torch.full((1, 2), -1.0, requires_grad=True)
    old = torch.tensor([[-400.0, 300.0]])
    for name in ALL:
        loss = policy_gradient(name, logps, old, torch.tensor([1.0]), torch.ones(1, 2), kl_coef=0.1,
                               ref_logps=old)
        (g,) = torch.autograd.grad(loss, logps)
        assert torch.isfinite(loss) and torch.isfinite(g).all(), name


# --- KL -----------------------------------------------------------------------------------------------------------


def test_kl_estimators_hand_values():
    logps, ref = torch.tensor([[-1.0, -2.0]]), torch.tensor([[-1.5, -1.0]])
    # u = ref - logp = [-0.5, 1.0]
    torch.testing.assert_close(kl_estimate(logps, ref, "k1"), torch.tensor([[0.5, -1.0]]))
    torch.testing.assert_close(kl_estimate(logps, ref, "k2"), torch.tensor([[0.125, 0.5]]))
    torch.testing.assert_close(kl_estimate(logps, ref, "k3"),
                               torch.tensor([[0.10653066, 0.71828183]]))  # e^-0.5 + 0.5 - 1, e - 1 - 1
    with pytest.raises(ValueError, match="k3"):
        kl_estimate(logps, ref, "k4")


def test_kl_term_value_and_gradient():
    logps = torch.tensor([[-1.0, -2.0, -0.5]], requires_grad=True)
    ref = torch.tensor([[-1.5, -1.0, -0.5]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    zero = torch.zeros(1)
    for est, vals in (("k3", [0.10653066, 0.71828183]), ("k1", [0.5, -1.0])):
        loss, stats = policy_gradient_and_stats("sgrpo", logps, None, zero, mask, ref_logps=ref, kl_coef=0.1,
                                                kl_estimator=est)
        assert float(loss.detach()) == pytest.approx(0.1 * sum(vals) / 2, rel=1e-6)
        assert stats["kl_ref"] == pytest.approx(sum(vals) / 2, rel=1e-6)
    loss = policy_gradient("sgrpo", logps, None, zero, mask, ref_logps=ref, kl_coef=0.1)
    (g,) = torch.autograd.grad(loss, logps)
    # d k3 / d logp = 1 - exp(ref - logp)
    torch.testing.assert_close(g, 0.1 * (1 - torch.exp(ref - logps.detach())) * mask / 2)
    # grpo's default (TRL use_bias_correction_kl): KL * ratio, whose gradient on-policy adds KL itself
    loss = policy_gradient("grpo", logps, None, zero, mask, ref_logps=ref, kl_coef=0.1, loss_type="bnpo")
    (g,) = torch.autograd.grad(loss, logps)
    k3 = kl_estimate(logps.detach(), ref)
    torch.testing.assert_close(g, 0.1 * (1 - torch.exp(ref - logps.detach()) + k3) * mask / 2)


# --- diagnostics, aggregation, value loss -------------------------------------------------------------------------


def test_diagnostics_are_floats_and_match_the_loss():
    logps, mask, adv = _batch()
    old = logps.detach() + 0.2 * torch.randn(4, 5, generator=torch.Generator().manual_seed(5))
    ref = logps.detach() - 0.1
    for name in ALL:
        loss, stats = policy_gradient_and_stats(name, logps, old, adv, mask, ref_logps=ref)
        d = pg_diagnostics(name, logps, old, adv, mask, ref_logps=ref)
        assert d == stats and all(isinstance(v, float) for v in d.values())
        assert d["loss"] == pytest.approx(float(policy_gradient(name, logps, old, adv, mask).detach()), rel=1e-6)
        assert d["tokens"] == 14.0 and d["kl_ref"] == pytest.approx(float(
            (kl_estimate(logps.detach(), ref) * mask).sum() / 14), rel=1e-6)
        assert d["kl_old"] > 0
        assert d["advantage_mean"] == pytest.approx(-2 / 14)


def test_aggregations_hand_values():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    m = torch.tensor([[1, 1, 0], [1, 1, 1]])
    assert float(aggregate(x, m, "token_mean")) == pytest.approx(18 / 5)
    assert float(aggregate(x, m, "token_mean", num_items=9)) == pytest.approx(2.0)
    assert float(aggregate(x, m, "seq_mean_token_mean")) == pytest.approx((1.5 + 5.0) / 2)
    assert float(aggregate(x, m, "seq_mean_token_sum")) == pytest.approx((3 + 15) / 2)
    assert float(aggregate(x, m, "seq_mean_token_sum_norm", max_completion_length=6)) == pytest.approx(18 / 12)
    with pytest.raises(ValueError, match="token_mean"):
        aggregate(x, m, "sum")


def test_ppo_value_loss_hand_values():
    values = torch.tensor([[1.0, 2.0, 7.0]], requires_grad=True)
    old = torch.tensor([[0.5, 2.0, 0.0]])
    returns = torch.tensor([[2.0, 1.0, 0.0]])
    mask = torch.tensor([[1, 1, 0]])
    # token 0: max((1-2)^2, (clip(1, 0.3, 0.7) - 2)^2 = 1.69) = 1.69; token 1: max(1, 1) = 1 -> 0.5 * 2.69 / 2
    loss = ppo_value_loss(values, old, returns, mask)
    assert float(loss.detach()) == pytest.approx(0.6725)
    (g,) = torch.autograd.grad(loss, values)
    torch.testing.assert_close(g, torch.tensor([[0.0, 0.5, 0.0]]))  # clipped branch has no gradient
    assert float(ppo_value_loss(values, old, returns, mask, clip_range_value=None).detach()) == pytest.approx(0.5)


# --- TRL's own loss code ------------------------------------------------------------------------------------------


pytestmark = pytest.mark.filterwarnings("ignore:`gradient_checkpointing` is deprecated:FutureWarning")


@pytest.fixture(scope="module")
def trl_env(tmp_path_factory):
    pytest.importorskip("trl")
    from datasets import Dataset
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    chars = [chr(c) for c in range(32, 32 + 61)]
    vocab = {t: i for i, t in enumerate(["<pad>", "<eos>", "<unk>", *chars])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>",
                                  padding_side="left")
    torch.manual_seed(0)
    cfg = Qwen2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                      intermediate_size=64, vocab_size=64, pad_token_id=0, eos_token_id=1, bos_token_id=None)
    model_dir = tmp_path_factory.mktemp("tiny_qwen2")
    Qwen2ForCausalLM(cfg).save_pretrained(model_dir)  # a path, so TRL can load its own reference when beta > 0
    data = Dataset.from_dict({"prompt": ["1+1=", "2+2="] * 4})
    out = tmp_path_factory.mktemp("trl_out")

    def make(kind="grpo", **cfg_kw):
        from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

        Config, Trainer = (GRPOConfig, GRPOTrainer) if kind == "grpo" else (RLOOConfig, RLOOTrainer)
        args = Config(output_dir=str(out), use_cpu=True, bf16=False, per_device_train_batch_size=4,
                      num_generations=4, max_completion_length=8, report_to=[], gradient_checkpointing=False,
                      **cfg_kw)
        trainer = Trainer(model=str(model_dir), reward_funcs=lambda completions, **k: [0.0] * len(completions),
                          args=args, train_dataset=data, processing_class=tok)
        trainer.current_gradient_accumulation_steps = 1  # set by the training loop; one micro-batch per step here
        trainer.model.train()
        return trainer

    g = torch.Generator().manual_seed(1)
    B, P, T = 4, 3, 6
    prompt_ids = torch.randint(3, 64, (B, P), generator=g)
    prompt_mask = torch.ones(B, P, dtype=torch.long)
    prompt_ids[0, 0], prompt_mask[0, 0] = 0, 0  # left padding
    completion_ids = torch.randint(3, 64, (B, T), generator=g)
    completion_mask = torch.ones(B, T, dtype=torch.long)
    completion_mask[1, 4:] = 0
    completion_mask[2, 2:] = 0
    completion_ids[completion_mask == 0] = 0
    batch = dict(prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids,
                 completion_mask=completion_mask, advantages=torch.tensor([1.0, -0.7, 0.4, -1.2]))
    return make, batch, g


def _trl_logps(trainer, batch):
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    att = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    return trainer._get_per_token_logps_and_entropies(trainer.model, ids, att, batch["completion_ids"].size(1))[0]


def _compare_with_trl(trainer, inputs, ours):
    """TRL's _compute_loss and ours(policy logps of the same model) agree on the loss and every parameter gradient."""
    model = trainer.model
    model.zero_grad()
    trl_loss = trainer._compute_loss(model, inputs)
    trl_loss.backward()
    trl_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    loss = ours(_trl_logps(trainer, inputs))
    loss.backward()
    torch.testing.assert_close(loss.detach(), trl_loss.detach(), atol=1e-5, rtol=0)
    assert float(trl_loss.detach().abs()) > 1e-4  # a non-trivial comparison
    for p, g in zip(model.parameters(), trl_grads):
        torch.testing.assert_close(p.grad, g, atol=1e-5, rtol=0)
    assert max(float(g.abs().max()) for g in trl_grads) > 1e-3


TRL_GRPO_CASES = [
    ({"loss_type": "grpo"}, {"loss_type": "grpo"}),
    ({"loss_type": "bnpo"}, {"loss_type": "bnpo"}),
    ({"loss_type": "dr_grpo"}, {"loss_type": "dr_grpo", "max_completion_length": 8}),
    ({"loss_type": "dapo"}, {"loss_type": "dapo", "num_items": 37}),
    ({"loss_type": "dapo", "epsilon_high": 0.28, "delta": 1.4},
     {"loss_type": "dapo", "eps_high": 0.28, "delta": 1.4, "num_items": 37}),
    ({"loss_type": "grpo", "beta": 0.04}, {"loss_type": "grpo", "kl_coef": 0.04}),
    ({"loss_type": "bnpo", "beta": 0.1, "use_bias_correction_kl": False},
     {"loss_type": "bnpo", "kl_coef": 0.1, "kl_bias_correction": False}),
]


@pytest.mark.parametrize("trl_cfg,ours_hp", TRL_GRPO_CASES, ids=[str(c[0]) for c in TRL_GRPO_CASES])
def test_grpo_equals_trl_grpo_trainer(trl_env, trl_cfg, ours_hp):
    make, batch, g = trl_env
    trainer = make(**trl_cfg)
    with torch.no_grad():
        lp = _trl_logps(trainer, batch)
    old = lp + 0.3 * torch.randn(lp.shape, generator=g)  # off-policy: ratios on both sides of the clip range
    ref = lp + 0.3 * torch.randn(lp.shape, generator=g)
    inputs = dict(batch, old_per_token_logps=old, ref_per_token_logps=ref, num_items_in_batch=torch.tensor(37.0))
    stats = pg_diagnostics("grpo", lp, old, batch["advantages"], batch["completion_mask"], **ours_hp,
                           **({"ref_logps": ref} if ours_hp.get("kl_coef") else {}))
    assert stats["clip_frac"] > 0  # the clip is exercised
    _compare_with_trl(trainer, inputs, lambda logps: policy_gradient(
        "grpo", logps, old, batch["advantages"], batch["completion_mask"], ref_logps=ref, **ours_hp))


def test_grpo_first_pass_equals_trl_without_old_logps(trl_env):
    make, batch, _ = trl_env
    trainer = make(loss_type="grpo")
    _compare_with_trl(trainer, dict(batch), lambda logps: policy_gradient(
        "grpo", logps, None, batch["advantages"], batch["completion_mask"], loss_type="grpo"))


@pytest.mark.parametrize("trl_eps_high", [1.3, 5.0])
def test_cispo_minimax_form_equals_trl(trl_env, trl_eps_high):
    make, batch, g = trl_env
    trainer = make(loss_type="cispo", epsilon_high=trl_eps_high)
    with torch.no_grad():
        lp = _trl_logps(trainer, batch)
    old = lp + 0.5 * torch.randn(lp.shape, generator=g)
    inputs = dict(batch, old_per_token_logps=old, num_items_in_batch=torch.tensor(37.0))
    # TRL clamps the ratio at epsilon_high itself; ours at 1 + eps_high
    _compare_with_trl(trainer, inputs, lambda logps: policy_gradient(
        "cispo", logps, old, batch["advantages"], batch["completion_mask"], eps_low=None,
        eps_high=trl_eps_high - 1.0, num_items=37))


def test_gspo_equals_trl_sequence_level_grpo(trl_env):
    make, batch, _ = trl_env
    trainer = make(loss_type="grpo", importance_sampling_level="sequence", epsilon=3e-4, epsilon_high=4e-4)
    with torch.no_grad():
        lp = _trl_logps(trainer, batch)
    # per-sequence mean log-ratios (A = [1, -0.7, 0.4, -1.2]): +1e-3 with A>0 (clipped), +1e-3 with A<0 (free),
    # -1e-3 with A>0 (free), +1e-4 (inside [1-3e-4, 1+4e-4])
    old = lp - torch.tensor([[1e-3], [1e-3], [-1e-3], [1e-4]])
    inputs = dict(batch, old_per_token_logps=old)
    stats = pg_diagnostics("gspo", lp, old, batch["advantages"], batch["completion_mask"])
    assert 0 < stats["clip_frac"] < 1
    _compare_with_trl(trainer, inputs, lambda logps: policy_gradient(
        "gspo", logps, old, batch["advantages"], batch["completion_mask"]))


def test_rloo_equals_trl_rloo_trainer(trl_env):
    make, batch, _ = trl_env
    trainer = make("rloo", beta=0.0)
    mask = batch["completion_mask"]
    with torch.no_grad():
        lp = _trl_logps(trainer, batch)
    seq_offset = torch.tensor([[0.5], [0.1], [-0.4], [0.05]])
    old = lp - seq_offset / mask.sum(1, keepdim=True) * mask  # sequence log-ratios = seq_offset
    inputs = dict(batch, old_logps=(old * mask).sum(1))
    _compare_with_trl(trainer, inputs, lambda logps: policy_gradient("rloo", logps, old, batch["advantages"], mask))
