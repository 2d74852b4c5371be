"""Pairwise (DPO-family) losses and the options that combine with them (docs/algorithms.md section 2).

For every name: (1) a hand-checkable value written out with ``math`` from the formula, (2) a random batch against
an independent in-test implementation, (3) finite values and gradients at margins of +-1e4 and at zero. Plus the
registry metadata, the error messages, and the pure helpers of ``posttrain.losses.options``.
"""

from __future__ import annotations

import math

import pytest
import torch

from posttrain.losses._common import EXP_CLAMP
from posttrain.losses.options import (
    f_divergence_scores,
    ld_dpo_logps,
    log_sum_sq_probs,
    sequential_kl,
    tdpo,
    wpo_weights,
)
from posttrain.losses.pairwise import GPO_KINDS, PAIRWISE_LOSSES, pairwise


def sig(z):
    return 1.0 / (1.0 + math.exp(-z))


def ls(z):
    return math.log(sig(z))


ALL_NAMES = [
    "dpo", "dpo_norm", "ipo", "cdpo", "robust_dpo", "hinge", "exo", "nca", "bco", "sppo", "aot", "aot_unpaired",
    "apo_zero", "apo_down", "discopop", "dpop", "rdpo", "simpo", "cpo", "orpo", "alphapo", "rpo", "odpo", "caldpo",
    "focalpo", "gpo", "betadpo", "dpo_shift", "minor_dpo", "c2dpo", "chipo", "bpo", "spo",
]


def test_registry_has_exactly_the_contract_names():
    assert sorted(PAIRWISE_LOSSES) == sorted(ALL_NAMES)


# ------------------------------------------------------------------------------------------ hand-checked values
# One pair: S_theta(y_w) = -3, S_theta(y_l) = -5, S_ref(y_w) = -4, S_ref(y_l) = -4.5, |y_w| = 2, |y_l| = 4
# => rho_w = 1, rho_l = -0.5, D = 1.5, A_w = -1.5, A_l = -1.25. beta = 0.1 unless stated.
PC, PR, RC, RR, LC, LR = -3.0, -5.0, -4.0, -4.5, 2, 4
RW, RL, D = 1.0, -0.5, 1.5
AW, AL = -1.5, -1.25


def _alphapo_r(a, alpha):
    return (1.0 - math.exp(-alpha * a)) / alpha


def _l1me(x):
    return math.log(1.0 - math.exp(x))


# (name, hparams, expected) -- every expected value is the formula on the numbers above
HAND = [
    ("dpo", {}, -ls(0.1 * D)),
    ("dpo", {"beta": 0.5}, -ls(0.5 * D)),
    ("dpo_norm", {}, -ls(0.1 * (RW / LC - RL / LR))),
    ("ipo", {}, (RW / LC - RL / LR - 1 / (2 * 0.1)) ** 2),
    ("ipo", {"beta": 1.0}, (0.5 + 0.125 - 0.5) ** 2),
    ("cdpo", {}, -0.9 * ls(0.15) - 0.1 * ls(-0.15)),
    ("cdpo", {"eps": 0.25}, -0.75 * ls(0.15) - 0.25 * ls(-0.15)),
    ("robust_dpo", {}, (-0.9 * ls(0.15) + 0.1 * ls(-0.15)) / 0.8),
    ("robust_dpo", {"eps": 0.3}, (-0.7 * ls(0.15) + 0.3 * ls(-0.15)) / 0.4),
    ("hinge", {}, 1 - 0.15),
    ("hinge", {"beta": 1.0}, 0.0),
    ("exo", {}, sig(0.15) * (ls(0.15) - math.log(0.999)) + sig(-0.15) * (ls(-0.15) - math.log(0.001))),
    ("nca", {}, -ls(0.1) - 0.5 * ls(-0.1) - 0.5 * ls(0.05)),
    ("bco", {}, -ls(0.1) - ls(0.05)),
    ("sppo", {}, (1 - 5) ** 2 + (-0.5 + 5) ** 2),
    ("apo_zero", {}, 1 - sig(0.1) + sig(-0.05)),
    ("apo_down", {}, sig(0.1) + 1 - sig(0.15)),
    ("discopop", {}, (1 - sig(0.15 / 0.05)) * -ls(0.15) + sig(0.15 / 0.05) * math.exp(-0.15)),
    ("discopop", {"tau": 1.0}, (1 - sig(0.15)) * -ls(0.15) + sig(0.15) * math.exp(-0.15)),
    ("dpop", {}, -ls(0.15)),  # rho_w >= 0: no penalty
    ("rdpo", {}, -ls(0.15 + 0.01 * (2 - 4))),  # + alpha (|y_w| - |y_l|), the paper's sign
    ("rdpo", {"alpha": 0.1}, -ls(0.15 - 0.2)),
    ("simpo", {}, -ls(0.1 * (AW - AL) - 0.5)),
    ("simpo", {"beta": 2.0, "gamma": 1.0}, -ls(2.0 * (AW - AL) - 1.0)),
    ("cpo", {}, -ls(0.1 * (PC - PR)) + 1.0 * 1.5),
    ("cpo", {"alpha": 0.0}, -ls(0.2)),
    ("orpo", {}, 1.5 - 0.1 * ls((AW - AL) - (_l1me(AW) - _l1me(AL)))),
    ("orpo", {"beta": 1.0}, 1.5 - ls((AW - AL) - (_l1me(AW) - _l1me(AL)))),
    ("alphapo", {}, -ls(0.1 * (_alphapo_r(AW, 0.25) - _alphapo_r(AL, 0.25)) - 0.5)),
    ("alphapo", {"alpha": 0.0}, -ls(0.1 * (AW - AL) - 0.5)),  # alpha = 0 is SimPO
    ("rpo", {}, -ls(0.15) + 1.5),
    ("rpo", {"alpha": 0.5}, -ls(0.15) + 0.75),
    ("odpo", {}, -ls(0.15 - 1.0)),
    ("caldpo", {}, -ls(1.5) + ((1 - 5) ** 2 + (-0.5 + 5) ** 2)),
    ("caldpo", {"lam": 0.1, "beta": 1.0}, -ls(1.5) + 0.1 * ((1 - 0.5) ** 2 + (-0.5 + 0.5) ** 2)),
    ("focalpo", {}, -sig(0.15) * ls(0.15)),
    ("focalpo", {"gamma": 2.0}, -sig(0.15) ** 2 * ls(0.15)),
    ("gpo", {}, math.exp(-0.15)),
    ("gpo", {"kind": "logistic"}, -ls(0.15)),
    ("gpo", {"kind": "hinge"}, 0.85),
    ("gpo", {"kind": "squared"}, 0.85**2),
    ("gpo", {"kind": "exponential", "beta": 1.0}, math.exp(-1.5)),
    ("gpo", {"kind": "truncated_quadratic"}, 0.85**2),
    ("gpo", {"kind": "savage"}, sig(-0.15) ** 2),
    ("betadpo", {}, -ls(0.15)),  # one pair: the batch mean margin is its own, beta_i = beta
    ("betadpo", {"margin_mean": 0.5}, -ls(0.1 * (1 + 0.5 * (1.5 - 0.5)) * 1.5)),
    ("betadpo", {"margin_mean": 0.5, "a": 2.0}, -ls(0.1 * (1 + 2.0 * 1.0) * 1.5)),
    ("betadpo", {"margin_mean": 100.0}, -ls(1e-3 * 1.5)),  # beta_i clamped at 1e-3
    ("dpo_shift", {}, -ls(0.1 * 1.0 - 0.5 * 0.1 * -0.5)),
    ("dpo_shift", {"lam": 1.0}, -ls(0.15)),
    ("minor_dpo", {}, -ls(0.1 * (1.0 - 0.0))),  # rho_l < 0 is clamped to 0
    ("c2dpo", {}, -ls(0.15) + 2e-4 * (1.0 - 0.5) ** 2),
    ("c2dpo", {"lam": 0.5}, -ls(0.15) + 0.5 * 0.25),
    ("chipo", {}, -ls(0.1 * ((math.e + 1.0) - (math.exp(-0.5) - 0.5)))),
    ("bpo", {}, -ls(0.1 * min(1.0, 0.3 * 0.5))),
    ("bpo", {"balance_factor": 4.0}, -ls(0.1 * min(1.0, 4.0 * 0.5))),
    ("spo", {}, -(0.15 * sig(0.15))),
    # f-DPO scores f'(u), u = exp(rho), on the margin losses
    ("dpo", {"f_divergence": "forward_kl"}, -ls(0.1 * ((1 - math.exp(-1)) - (1 - math.exp(0.5))))),
    ("dpo", {"f_divergence": "js_divergence"}, -ls(0.1 * (ls(1.0) - ls(-0.5)))),
    ("dpo", {"f_divergence": "alpha_divergence"},
     -ls(0.1 * ((math.exp(-0.5 * 1) - 1) / -0.5 - (math.exp(-0.5 * -0.5) - 1) / -0.5))),
    ("dpo", {"f_divergence": "alpha_divergence", "f_alpha": 1.0}, -ls(0.15)),
    ("hinge", {"f_divergence": "forward_kl"}, 1 - 0.1 * (math.exp(0.5) - math.exp(-1))),
    ("ipo", {"f_divergence": "js_divergence"},
     ((math.log(2) + ls(1.0)) / 2 - (math.log(2) + ls(-0.5)) / 4 - 5) ** 2),
]


@pytest.mark.parametrize("name,hp,expected", HAND, ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(HAND)])
def test_hand_value(name, hp, expected):
    t = lambda v: torch.tensor([v], dtype=torch.float64)  # noqa: E731
    out = pairwise(name, t(PC), t(PR), t(RC), t(RR), chosen_len=t(LC), rejected_len=t(LR), **hp)
    assert out.shape == (1,) and out.dtype == torch.float64
    assert out.item() == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_hand_values_cover_every_name():
    assert {n for n, _, _ in HAND} | {"aot", "aot_unpaired"} == set(ALL_NAMES)


def test_hand_dpop_penalises_chosen_below_reference():
    # rho_w = -1, rho_l = -2: D = 1, penalty lam * max(0, 1) = 5
    out = pairwise("dpop", torch.tensor([-5.0]), torch.tensor([-6.0]), torch.tensor([-4.0]), torch.tensor([-4.0]))
    assert out.item() == pytest.approx(-ls(0.1 * (1 - 5 * 1)), rel=1e-6)


def test_hand_minor_dpo_keeps_positive_rejected_ratio():
    # rho_w = 1, rho_l = +2 (> 0, kept): -ls(0.1 * (1 - 2))
    out = pairwise("minor_dpo", torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-4.0]), torch.tensor([-4.0]))
    assert out.item() == pytest.approx(-ls(-0.1), rel=1e-6)


def test_hand_betadpo_uses_batch_mean_margin():
    # margins D = [2, 0], mean 1: beta_i = 0.1 * (1 + 0.5 * (D_i - 1)) = [0.15, 0.05]
    out = pairwise("betadpo", torch.tensor([-1.0, -3.0]), torch.tensor([-3.0, -3.0]),
                   torch.tensor([-2.0, -2.0]), torch.tensor([-2.0, -2.0]))
    assert out.tolist() == pytest.approx([-ls(0.15 * 2.0), -ls(0.0)], rel=1e-6)


def test_hand_aot_sorts_over_the_batch():
    # policy differences [2, 0.5] -> sorted [0.5, 2]; reference [0.5, 1] -> [0.5, 1]; delta = [0, 1]
    pc, pr = torch.tensor([-3.0, -4.0]), torch.tensor([-5.0, -4.5])
    rc, rr = torch.tensor([-4.0, -4.0]), torch.tensor([-4.5, -5.0])
    assert pairwise("aot", pc, pr, rc, rr).tolist() == pytest.approx([-ls(0.0), -ls(0.1)], rel=1e-6)
    got = pairwise("aot", pc, pr, rc, rr, eps=0.2, beta=0.5).tolist()
    assert got == pytest.approx([-0.8 * ls(0) - 0.2 * ls(0), -0.8 * ls(0.5) - 0.2 * ls(-0.5)], rel=1e-6)
    # rho_w = [1, 0] -> [0, 1]; rho_l = [-0.5, 0.5] -> [-0.5, 0.5]; delta = [0.5, 0.5]
    assert pairwise("aot_unpaired", pc, pr, rc, rr).tolist() == pytest.approx([-ls(0.05)] * 2, rel=1e-6)


def test_odpo_accepts_per_pair_offsets():
    t = torch.tensor
    out = pairwise("odpo", t([PC, PC]), t([PR, PR]), t([RC, RC]), t([RR, RR]), delta=t([0.0, 2.0]))
    assert out.tolist() == pytest.approx([-ls(0.15), -ls(0.15 - 2.0)], rel=1e-6)


def test_focalpo_detach_weight_changes_only_the_gradient():
    def run(detach):
        pc = torch.tensor([PC], requires_grad=True)
        out = pairwise("focalpo", pc, torch.tensor([PR]), torch.tensor([RC]), torch.tensor([RR]), detach_weight=detach)
        out.sum().backward()
        return out.item(), pc.grad.item()

    (v0, g0), (v1, g1) = run(False), run(True)
    assert v0 == pytest.approx(v1)
    z = 0.15
    # d/dS_w of -sig(z) ls(z) with dz/dS_w = beta: full vs. with the factor held constant
    full = 0.1 * (-(sig(z) * (1 - sig(z))) * ls(z) - sig(z) * (1 - sig(z)))
    held = 0.1 * (-sig(z) * (1 - sig(z)))
    assert g0 == pytest.approx(full, rel=1e-5) and g1 == pytest.approx(held, rel=1e-5)


def test_betadpo_beta_is_detached():
    pc = torch.tensor([-1.0, -3.0], requires_grad=True)
    args = (torch.tensor([-3.0, -3.0]), torch.tensor([-2.0, -2.0]), torch.tensor([-2.0, -2.0]))
    pairwise("betadpo", pc, *args).sum().backward()
    # only the explicit D in beta_i * D carries gradient: d/dS_w = -beta_i * sig(-beta_i D_i)
    expected = [-0.15 * sig(-0.3), -0.05 * sig(0.0)]
    assert pc.grad.tolist() == pytest.approx(expected, rel=1e-6)


def test_rdpo_sign_follows_the_paper():
    """A longer preferred answer lowers the loss (the length explains part of the preference)."""
    t = torch.tensor
    longer = pairwise("rdpo", t([PC]), t([PR]), t([RC]), t([RR]), chosen_len=t([50]), rejected_len=t([10]))
    same = pairwise("rdpo", t([PC]), t([PR]), t([RC]), t([RR]), chosen_len=t([10]), rejected_len=t([10]))
    assert longer.item() < same.item()


# ------------------------------------------------------------------------------------ random batch vs reference


def _lsig(z):  # an independent log-sigmoid (fine for the moderate arguments used below)
    return -torch.log1p(torch.exp(-z))


def _sigm(z):
    return 1.0 / (1.0 + torch.exp(-z))


def _ref_impl(name, pc, pr, rc, rr, lc, lr, hp):
    b = hp.get("beta", 0.1)
    rw, rl = pc - rc, pr - rr
    d = rw - rl
    aw, al = pc / lc, pr / lr
    nll = -pc / lc
    if name == "dpo":
        return -_lsig(b * d)
    if name == "dpo_norm":
        return -_lsig(b * (rw / lc - rl / lr))
    if name == "ipo":
        return (rw / lc - rl / lr - 0.5 / b) ** 2
    if name == "cdpo":
        e = hp["eps"]
        return -(1 - e) * _lsig(b * d) - e * _lsig(-b * d)
    if name == "robust_dpo":
        e = hp["eps"]
        return ((1 - e) * -_lsig(b * d) - e * -_lsig(-b * d)) / (1 - 2 * e)
    if name == "hinge":
        return torch.clamp(1 - b * d, min=0)
    if name == "exo":
        e = hp["eps"]
        qw, ql = _sigm(b * d), _sigm(-b * d)
        return qw * (torch.log(qw) - math.log(1 - e)) + ql * (torch.log(ql) - math.log(e))
    if name == "nca":
        return -_lsig(b * rw) - 0.5 * _lsig(-b * rw) - 0.5 * _lsig(-b * rl)
    if name == "bco":
        return -_lsig(b * rw) - _lsig(-b * rl)
    if name == "sppo":
        return (rw - 1 / (2 * b)) ** 2 + (rl + 1 / (2 * b)) ** 2
    if name in ("aot", "aot_unpaired"):
        e = hp.get("eps", 0.0)
        if name == "aot":
            delta = torch.sort(pc - pr).values - torch.sort(rc - rr).values
        else:
            delta = torch.sort(rw).values - torch.sort(rl).values
        return -(1 - e) * _lsig(b * delta) - e * _lsig(-b * delta)
    if name == "apo_zero":
        return (1 - _sigm(b * rw)) + _sigm(b * rl)
    if name == "apo_down":
        return _sigm(b * rw) + (1 - _sigm(b * d))
    if name == "discopop":
        z, w = b * d, _sigm(b * d / hp["tau"])
        return (1 - w) * -_lsig(z) + w * torch.exp(-z)
    if name == "dpop":
        return -_lsig(b * (d - hp["lam"] * torch.clamp(-rw, min=0)))
    if name == "rdpo":
        return -_lsig(b * d + hp["alpha"] * (lc - lr))
    if name == "simpo":
        return -_lsig(b * (aw - al) - hp["gamma"])
    if name == "cpo":
        return -_lsig(b * (pc - pr)) + hp["alpha"] * nll
    if name == "orpo":
        odds_w, odds_l = torch.exp(aw) / (1 - torch.exp(aw)), torch.exp(al) / (1 - torch.exp(al))
        return nll - b * _lsig(torch.log(odds_w / odds_l))
    if name == "alphapo":
        a = hp["alpha"]
        r = lambda p: (1 - p ** (-a)) / a  # noqa: E731
        return -_lsig(b * (r(torch.exp(aw)) - r(torch.exp(al))) - hp["gamma"])
    if name == "rpo":
        return -_lsig(b * d) + hp["alpha"] * nll
    if name == "odpo":
        return -_lsig(b * d - hp["delta"])
    if name == "caldpo":
        return -_lsig(d) + hp["lam"] * ((rw - 0.5 / b) ** 2 + (rl + 0.5 / b) ** 2)
    if name == "focalpo":
        return -(_sigm(b * d) ** hp["gamma"]) * _lsig(b * d)
    if name == "gpo":
        h = b * d
        return {"exponential": torch.exp(-h), "savage": 1 / (1 + torch.exp(h)) ** 2}[hp["kind"]]
    if name == "betadpo":
        bi = torch.clamp(b * (1 + hp["a"] * (d - d.mean())), min=1e-3)
        return -_lsig(bi * d)
    if name == "dpo_shift":
        return -_lsig(b * rw - hp["lam"] * b * rl)
    if name == "minor_dpo":
        return -_lsig(b * (rw - torch.clamp(rl, min=0)))
    if name == "c2dpo":
        return -_lsig(b * d) + hp["lam"] * (rw + rl) ** 2
    if name == "chipo":
        return -_lsig(b * ((torch.exp(rw) + rw) - (torch.exp(rl) + rl)))
    if name == "bpo":
        return -_lsig(b * torch.minimum(rw, hp["balance_factor"] * -rl))
    if name == "spo":
        return -(b * d) * _sigm(b * d)
    raise AssertionError(name)


# non-default hyperparameters, so that their meaning is tested too
RANDOM_HP = {
    "dpo": dict(beta=0.2), "dpo_norm": dict(beta=1.5), "ipo": dict(beta=0.4), "cdpo": dict(beta=0.2, eps=0.2),
    "robust_dpo": dict(beta=0.2, eps=0.2), "hinge": dict(beta=0.05), "exo": dict(beta=0.2, eps=0.05),
    "nca": dict(beta=0.2), "bco": dict(beta=0.2), "sppo": dict(beta=0.3), "aot": dict(beta=0.2, eps=0.1),
    "aot_unpaired": dict(beta=0.2, eps=0.1), "apo_zero": dict(beta=0.2), "apo_down": dict(beta=0.2),
    "discopop": dict(beta=0.05, tau=0.2), "dpop": dict(beta=0.2, lam=3.0), "rdpo": dict(beta=0.2, alpha=0.05),
    "simpo": dict(beta=2.0, gamma=0.8), "cpo": dict(beta=0.2, alpha=0.5), "orpo": dict(beta=0.3),
    "alphapo": dict(beta=2.0, gamma=0.3, alpha=0.4), "rpo": dict(beta=0.2, alpha=0.3),
    "odpo": dict(beta=0.2, delta=0.5), "caldpo": dict(beta=0.2, lam=0.5), "focalpo": dict(beta=0.2, gamma=2.0),
    "gpo": dict(beta=0.1, kind="savage"), "betadpo": dict(beta=0.2, a=0.3), "dpo_shift": dict(beta=0.2, lam=0.7),
    "minor_dpo": dict(beta=0.2), "c2dpo": dict(beta=0.2, lam=0.01), "chipo": dict(beta=0.2),
    "bpo": dict(beta=0.2, balance_factor=0.6), "spo": dict(beta=0.2),
}


def _random_batch(seed, b=16):
    g = torch.Generator().manual_seed(seed)
    lc = torch.randint(1, 30, (b,), generator=g).double()
    lr = torch.randint(1, 30, (b,), generator=g).double()
    # per-token average log-probs in [-3, -0.05] (so ORPO's odds stay finite), and log-ratios of a few nats
    pc = -lc * (0.05 + 2.95 * torch.rand(b, generator=g, dtype=torch.float64))
    pr = -lr * (0.05 + 2.95 * torch.rand(b, generator=g, dtype=torch.float64))
    rc = pc - 6 * (torch.rand(b, generator=g, dtype=torch.float64) - 0.5)
    rr = pr - 6 * (torch.rand(b, generator=g, dtype=torch.float64) - 0.5)
    return pc, pr, rc, rr, lc, lr


@pytest.mark.parametrize("name", ALL_NAMES)
def test_random_batch_matches_reference(name):
    torch.manual_seed(0)
    pc, pr, rc, rr, lc, lr = _random_batch(seed=ALL_NAMES.index(name))
    hp = RANDOM_HP[name]
    got = pairwise(name, pc, pr, rc, rr, chosen_len=lc.long(), rejected_len=lr.long(), **hp)
    want = _ref_impl(name, pc, pr, rc, rr, lc, lr, hp)
    assert got.shape == want.shape == (16,)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("kind", ["exponential", "savage"])
def test_gpo_kinds_random(kind):
    pc, pr, rc, rr, lc, lr = _random_batch(seed=99)
    got = pairwise("gpo", pc, pr, rc, rr, kind=kind, beta=0.3)
    torch.testing.assert_close(got, _ref_impl("gpo", pc, pr, rc, rr, lc, lr, dict(beta=0.3, kind=kind)))


def test_reference_free_losses_ignore_refs_and_accept_none():
    pc, pr, rc, rr, lc, lr = _random_batch(seed=5)
    for name, spec in PAIRWISE_LOSSES.items():
        if spec.reference_free:
            a = pairwise(name, pc, pr, chosen_len=lc, rejected_len=lr)
            b = pairwise(name, pc, pr, rc, rr, chosen_len=lc, rejected_len=lr)
            torch.testing.assert_close(a, b)


def test_gradients_point_the_right_way():
    """Each loss lowers by raising the chosen log-prob, for a pair that is still misranked (rho_w = rho_l = -1)."""
    for name in ALL_NAMES:
        if name in ("aot", "aot_unpaired", "spo", "discopop"):
            # batch-sorted; SPO's and DiscoPOP's (non-convex, tau = 0.05) slopes are not negative at zero margin
            continue
        pc = torch.tensor([-6.0, -6.0], requires_grad=True)
        out = pairwise(name, pc, torch.tensor([-6.0, -6.0]), torch.tensor([-5.0, -5.0]), torch.tensor([-5.0, -5.0]),
                       chosen_len=torch.tensor([3, 3]), rejected_len=torch.tensor([3, 3]))
        out.sum().backward()
        assert (pc.grad < 0).all(), (name, pc.grad)


# ------------------------------------------------------------------------------------------ extremes


def _extreme_batch(dtype):
    big = 1e4
    # rows: (S_w, S_l, R_w, R_l) -- all valid log-probs (<= 0): margins +2e4, -2e4, +1e4, -1e4, 0 and all zero
    rows = [(0, -big, -big, 0), (-big, 0, 0, -big), (0, -big, 0, 0), (-big, 0, 0, 0), (-5, -5, -5, -5), (0, 0, 0, 0)]
    cols = [torch.tensor(c, dtype=dtype) for c in zip(*rows)]
    lens = torch.tensor([1, 7, 1, 7, 3, 1])
    return cols, lens


def _assert_finite_value_and_grad(name, dtype, **hp):
    (pc, pr, rc, rr), lens = _extreme_batch(dtype)
    pc, pr = pc.clone().requires_grad_(), pr.clone().requires_grad_()
    out = pairwise(name, pc, pr, rc, rr, chosen_len=lens, rejected_len=lens.flip(0), **hp)
    assert torch.isfinite(out).all(), (name, hp, out)
    out.sum().backward()
    assert torch.isfinite(pc.grad).all() and torch.isfinite(pr.grad).all(), (name, hp, pc.grad, pr.grad)
    # and each row alone (a batch of one pair where the loss allows it)
    if name not in ("aot", "aot_unpaired"):
        for i in range(len(lens)):
            one = pairwise(name, pc[i : i + 1], pr[i : i + 1], rc[i : i + 1], rr[i : i + 1],
                           chosen_len=lens[i : i + 1], rejected_len=lens[i : i + 1], **hp)
            assert torch.isfinite(one).all(), (name, hp, i, one)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ALL_NAMES)
def test_finite_at_extreme_margins(name, dtype):
    _assert_finite_value_and_grad(name, dtype)


@pytest.mark.parametrize("hp", [dict(kind=k) for k in GPO_KINDS])
def test_gpo_finite_at_extremes(hp):
    _assert_finite_value_and_grad("gpo", torch.float32, **hp)


@pytest.mark.parametrize("f", ["forward_kl", "js_divergence", "alpha_divergence"])
@pytest.mark.parametrize("name", ["dpo", "cdpo", "robust_dpo", "hinge", "exo", "discopop", "dpo_norm"])
def test_f_divergence_finite_at_extremes(name, f):
    _assert_finite_value_and_grad(name, torch.float32, f_divergence=f)


def test_exponent_clamp_is_exact_inside_and_saturates_outside():
    assert EXP_CLAMP >= 50
    t = torch.tensor
    # inside the bound: exactly e^{-h}
    assert pairwise("gpo", t([0.0]), t([-40.0]), t([0.0]), t([0.0]), beta=1.0, kind="exponential").item() == \
        pytest.approx(math.exp(-40.0), rel=1e-6)
    # beyond it: e^{EXP_CLAMP}
    assert pairwise("gpo", t([-1e4]), t([0.0]), t([0.0]), t([0.0]), beta=1.0, kind="exponential").item() == \
        pytest.approx(math.exp(EXP_CLAMP), rel=1e-5)


def test_bf16_inputs_are_computed_in_float32():
    out = pairwise("dpo", *(torch.tensor([v], dtype=torch.bfloat16) for v in (PC, PR, RC, RR)))
    assert out.dtype == torch.float32 and out.item() == pytest.approx(-ls(0.15), rel=1e-6)


# ------------------------------------------------------------------------------------------ registry metadata

FLAGS = {  # name: (reference_free, length_normalized, needs_lengths)
    "simpo": (True, True, True), "orpo": (True, True, True), "alphapo": (True, True, True), "cpo": (True, False, True),
    "dpo_norm": (False, True, True), "ipo": (False, True, True), "rdpo": (False, False, True),
    "rpo": (False, False, True),
}

DEFAULTS = {
    "cdpo": dict(eps=0.1), "robust_dpo": dict(eps=0.1), "exo": dict(eps=1e-3), "aot": dict(eps=0.0),
    "aot_unpaired": dict(eps=0.0), "discopop": dict(tau=0.05), "dpop": dict(lam=5.0), "rdpo": dict(alpha=0.01),
    "simpo": dict(gamma=0.5), "cpo": dict(alpha=1.0), "alphapo": dict(gamma=0.5, alpha=0.25), "rpo": dict(alpha=1.0),
    "odpo": dict(delta=1.0), "caldpo": dict(lam=1.0), "focalpo": dict(gamma=1.0), "gpo": dict(kind="exponential"),
    "betadpo": dict(a=0.5, margin_mean=None),
}


@pytest.mark.parametrize("name", ALL_NAMES)
def test_spec_metadata(name):
    spec = PAIRWISE_LOSSES[name]
    assert callable(spec.fn)
    assert (spec.reference_free, spec.length_normalized, spec.needs_lengths) == FLAGS.get(name, (False, False, False))
    assert spec.defaults["beta"] == 0.1
    for k, v in DEFAULTS.get(name, {}).items():
        assert spec.defaults[k] == v, (name, k)
    if spec.f_divergence:
        assert spec.defaults["f_divergence"] == "reverse_kl" and spec.defaults["f_alpha"] == 0.5


def test_defaults_are_what_the_functions_use():
    pc, pr, rc, rr, lc, lr = _random_batch(seed=7, b=4)
    for name, spec in PAIRWISE_LOSSES.items():
        a = pairwise(name, pc, pr, rc, rr, chosen_len=lc, rejected_len=lr)
        b = pairwise(name, pc, pr, rc, rr, chosen_len=lc, rejected_len=lr, **spec.defaults)
        torch.testing.assert_close(a, b)


# ------------------------------------------------------------------------------------------ errors

ONE = torch.tensor([-1.0])


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown pairwise loss 'sigmoid'") as e:
        pairwise("sigmoid", ONE, ONE, ONE, ONE)
    for n in ALL_NAMES:
        assert n in str(e.value)


def test_unknown_hparam_names_it_and_the_accepted_ones():
    with pytest.raises(ValueError, match=r"'gamma'.*'dpo'.*accepted: beta, f_divergence, f_alpha"):
        pairwise("dpo", ONE, ONE, ONE, ONE, gamma=1.0)
    with pytest.raises(ValueError, match=r"'label_smoothing'.*accepted: beta, eps"):
        pairwise("robust_dpo", ONE, ONE, ONE, ONE, label_smoothing=0.1)
    # f-DPO only where TRL allows it (the log Z(x) term must cancel in the margin)
    with pytest.raises(ValueError, match=r"'f_divergence'.*'nca'.*accepted: beta$"):
        pairwise("nca", ONE, ONE, ONE, ONE, f_divergence="forward_kl")


def test_reference_based_loss_without_refs_is_a_clear_error():
    with pytest.raises(ValueError, match=r"'dpo' needs reference log-probs.*reference-free losses: .*simpo"):
        pairwise("dpo", ONE, ONE)
    with pytest.raises(ValueError, match="needs reference log-probs"):
        pairwise("ipo", ONE, ONE, ONE, None, chosen_len=ONE, rejected_len=ONE)


def test_missing_lengths_are_a_clear_error():
    with pytest.raises(ValueError, match=r"'simpo' needs completion lengths; missing chosen_len, rejected_len"):
        pairwise("simpo", ONE, ONE)
    with pytest.raises(ValueError, match=r"'rpo' needs completion lengths; missing rejected_len"):
        pairwise("rpo", ONE, ONE, ONE, ONE, chosen_len=ONE)


@pytest.mark.parametrize("name", ["aot", "aot_unpaired"])
def test_aot_rejects_batch_of_one(name):
    with pytest.raises(ValueError, match=rf"{name} sorts over the batch.*at least 2 pairs.*got 1"):
        pairwise(name, ONE, ONE, ONE, ONE)


@pytest.mark.parametrize("name,hp,match", [
    ("robust_dpo", dict(eps=0.5), r"eps must lie in \[0.0, 0.5\)"),
    ("cdpo", dict(eps=-0.1), "eps must lie"),
    ("exo", dict(eps=0.0), r"eps must lie in \(0.0, 1.0\)"),
    ("dpo", dict(beta=0.0), "beta must be > 0"),
    ("discopop", dict(tau=0.0), "tau must be > 0"),
    ("gpo", dict(kind="cubic"), r"unknown kind 'cubic'; known: logistic, hinge, squared"),
    ("dpo", dict(f_divergence="kl"), r"unknown f_divergence 'kl'; known: reverse_kl, forward_kl"),
])
def test_bad_hparam_values(name, hp, match):
    with pytest.raises(ValueError, match=match):
        pairwise(name, ONE, ONE, ONE, ONE, **hp)


def test_shape_errors():
    with pytest.raises(ValueError, match="1-D"):
        pairwise("dpo", torch.zeros(2, 2), torch.zeros(2, 2), torch.zeros(2, 2), torch.zeros(2, 2))
    with pytest.raises(ValueError, match="policy_rejected has shape"):
        pairwise("dpo", torch.zeros(2), torch.zeros(3), torch.zeros(2), torch.zeros(3))
    with pytest.raises(ValueError, match="chosen_len has shape"):
        pairwise("simpo", torch.zeros(2), torch.zeros(2), chosen_len=torch.ones(3), rejected_len=torch.ones(2))


# ------------------------------------------------------------------------------------------ options (2.22-2.25)


def test_f_divergence_scores_hand():
    r = torch.tensor([1.0, -0.5], dtype=torch.float64)
    assert f_divergence_scores(r).tolist() == [1.0, -0.5]
    assert f_divergence_scores(r, "forward_kl").tolist() == pytest.approx([1 - math.exp(-1), 1 - math.exp(0.5)])
    assert f_divergence_scores(r, "js_divergence").tolist() == pytest.approx(
        [math.log(2 * math.e / (1 + math.e)), math.log(2 * math.exp(-0.5) / (1 + math.exp(-0.5)))])
    assert f_divergence_scores(r, "alpha_divergence", 0.3).tolist() == pytest.approx(
        [(math.exp(-0.7) - 1) / -0.7, (math.exp(0.35) - 1) / -0.7])


def test_log_sum_sq_probs_hand():
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [math.log(3.0), 0.0, -1e9, -1e9]]], dtype=torch.float64)
    # uniform over 4: sum p^2 = 1/4; p = (3/4, 1/4): 9/16 + 1/16 = 10/16
    assert log_sum_sq_probs(logits)[0].tolist() == pytest.approx([math.log(0.25), math.log(10 / 16)])


def test_wpo_weights_hand():
    tok = torch.tensor([[math.log(0.5), math.log(0.25), -7.0], [math.log(0.9), 0.0, 0.0]], requires_grad=True)
    lsq = torch.tensor([[math.log(0.5), math.log(0.5), 3.0], [math.log(0.81), 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    w = wpo_weights(tok, lsq, mask)
    # row 0: mean(log .5 - log .5, log .25 - log .5) = log(.5)/2 -> sqrt(.5); row 1: exp(log .9 - log .81) = 1/.9
    assert w.tolist() == pytest.approx([math.sqrt(0.5), 1 / 0.9], rel=1e-6)
    assert not w.requires_grad


def test_ld_dpo_logps_hand():
    chosen = torch.tensor([[-9.0, -1.0, -2.0, -3.0, 0.0, 0.0]])  # a prompt position, then 3 completion tokens
    cmask = torch.tensor([[0, 1, 1, 1, 0, 0]])
    rejected = torch.tensor([[-9.0, -1.0, -1.0, -1.0, -1.0, -1.0]])
    rmask = torch.tensor([[0, 1, 1, 1, 1, 1]])
    c, r = ld_dpo_logps(chosen, cmask, rejected, rmask, alpha=0.5)
    assert c.tolist() == [-6.0]  # no tail on the shorter side
    assert r.tolist() == [-3.0 + 0.5 * -2.0]  # 3 shared + 0.5 * 2 excess tokens
    c1, r1 = ld_dpo_logps(chosen, cmask, rejected, rmask, alpha=1.0)
    assert (c1.item(), r1.item()) == (-6.0, -5.0)  # alpha = 1: plain sums
    with pytest.raises(ValueError, match=r"alpha must lie in \[0, 1\]"):
        ld_dpo_logps(chosen, cmask, rejected, rmask, alpha=1.5)


def test_sequential_kl_matches_brute_force():
    torch.manual_seed(0)
    pol = torch.randn(2, 5, 7, dtype=torch.float64, requires_grad=True)
    ref = torch.randn(2, 5, 7, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[0, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    got = sequential_kl(pol, ref, mask)
    want = []
    for b in range(2):
        total = 0.0
        for t in range(5):
            if mask[b, t]:
                p = torch.softmax(ref[b, t], -1)
                q = torch.softmax(pol[b, t], -1)
                total += sum(p[v].item() * math.log(p[v].item() / q[v].item()) for v in range(7))
        want.append(total)
    assert got.tolist() == pytest.approx(want, rel=1e-9)
    assert (got > 0).all()
    assert torch.allclose(sequential_kl(ref, ref, mask), torch.zeros(2, dtype=torch.float64), atol=1e-12)
    got.sum().backward()
    assert pol.grad is not None and ref.grad is None  # the reference is a constant


def test_tdpo_hand_and_stop_gradient():
    t = lambda v: torch.tensor([v], dtype=torch.float64)  # noqa: E731
    kw, kl_ = t(0.4).requires_grad_(), t(1.0).requires_grad_()
    one = tdpo(t(PC), t(PR), t(RC), t(RR), kw, kl_, beta=0.1, variant=1)
    assert one.item() == pytest.approx(-ls(0.1 * (1.5 - (1.0 - 0.4))), rel=1e-9)
    two = tdpo(t(PC), t(PR), t(RC), t(RR), kw, kl_, beta=0.1, alpha=0.5)  # variant 2 is the default
    assert two.item() == pytest.approx(-ls(0.1 * (1.5 - 0.5 * (1.0 - 0.4))), rel=1e-9)
    two.sum().backward()
    assert kw.grad is None  # sg(D(y_w)) in TDPO2
    assert kl_.grad.item() == pytest.approx(0.1 * 0.5 * sig(-0.1 * 1.2), rel=1e-9)
    kw2 = t(0.4).requires_grad_()
    tdpo(t(PC), t(PR), t(RC), t(RR), kw2, t(1.0), variant=1).sum().backward()
    assert kw2.grad.item() != 0.0
    with pytest.raises(ValueError, match="variant must be 1 or 2"):
        tdpo(t(PC), t(PR), t(RC), t(RR), kw, kl_, variant=3)
