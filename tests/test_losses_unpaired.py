"""Unpaired (KTO-family) losses (docs/algorithms.md section 3): hand values, random batches against an independent
in-test implementation, the KL anchor helper, extremes, metadata and errors."""

from __future__ import annotations

import math

import pytest
import torch

from posttrain.losses.unpaired import UNPAIRED_LOSSES, kto_kl_anchor, unpaired


def sig(z):
    return 1.0 / (1.0 + math.exp(-z))


def ls(z):
    return math.log(sig(z))


ALL_NAMES = ["kto", "apo_zero_unpaired", "bco"]

# three examples: r = rho(y) = S_theta - S_ref = [1.0, -0.5, 2.0], desirable = [T, F, F]
POL = torch.tensor([-3.0, -5.0, -2.0], dtype=torch.float64)
REF = torch.tensor([-4.0, -4.5, -4.0], dtype=torch.float64)
DES = torch.tensor([True, False, False])
R = [1.0, -0.5, 2.0]


def test_registry_names():
    assert sorted(UNPAIRED_LOSSES) == sorted(ALL_NAMES)


@pytest.mark.parametrize("name,hp,z0,expected", [
    ("kto", {}, 0.3, [1 - sig(0.1 * (1.0 - 0.3)), 1 - sig(0.1 * (0.3 + 0.5)), 1 - sig(0.1 * (0.3 - 2.0))]),
    ("kto", {"beta": 0.5, "lambda_d": 1.3, "lambda_u": 0.7}, 0.0,
     [1.3 * (1 - sig(0.5)), 0.7 * (1 - sig(0.25)), 0.7 * (1 - sig(-1.0))]),
    ("apo_zero_unpaired", {}, None, [1 - sig(0.1), sig(-0.05), sig(0.2)]),
    ("apo_zero_unpaired", {"lambda_d": 2.0, "lambda_u": 0.5}, None,
     [2 * (1 - sig(0.1)), 0.5 * sig(-0.05), 0.5 * sig(0.2)]),
    ("bco", {"delta": 0.0}, None, [-ls(0.1), -ls(0.05), -ls(-0.2)]),
    # delta None: the batch's mean implicit reward (0.1 - 0.05 + 0.2) / 3 stands in for the running mean
    ("bco", {}, None, [-ls(0.1 - 0.25 / 3), -ls(-(-0.05 - 0.25 / 3)), -ls(-(0.2 - 0.25 / 3))]),
    ("bco", {"delta": 0.1, "beta": 0.2}, None, [-ls(0.2 - 0.1), -ls(-(-0.1 - 0.1)), -ls(-(0.4 - 0.1))]),
])
def test_hand_values(name, hp, z0, expected):
    out = unpaired(name, POL, REF, DES, kl_anchor=z0, **hp)
    assert out.shape == (3,) and out.dtype == torch.float64
    assert out.tolist() == pytest.approx(expected, rel=1e-12)


def test_kto_kl_anchor():
    pol = torch.tensor([-3.0, -4.0, -4.0], requires_grad=True)
    ref = torch.tensor([-4.0, -4.0, -4.0])
    z0 = kto_kl_anchor(pol, ref)  # mean of [1, 0, 0]
    assert z0.dim() == 0 and z0.item() == pytest.approx(1 / 3)
    assert not z0.requires_grad
    z = kto_kl_anchor(torch.tensor([-3.0, -3.0]), torch.tensor([-4.0, -3.5]))
    assert z.item() == pytest.approx(0.75)
    assert kto_kl_anchor(torch.tensor([-5.0, -6.0]), torch.tensor([-4.0, -4.0])).item() == 0.0  # clamped at 0


def test_kl_anchor_is_a_constant_and_may_be_a_float():
    z = torch.tensor(0.3, requires_grad=True)
    pol = POL.clone().requires_grad_()
    out = unpaired("kto", pol, REF, DES, kl_anchor=z)
    out.sum().backward()
    assert z.grad is None and pol.grad is not None
    torch.testing.assert_close(out.detach(), unpaired("kto", POL, REF, DES, kl_anchor=0.3))


def test_desirable_may_be_0_1_integers():
    a = unpaired("kto", POL, REF, DES, kl_anchor=0.1)
    b = unpaired("kto", POL, REF, torch.tensor([1, 0, 0]), kl_anchor=0.1)
    torch.testing.assert_close(a, b)


# ------------------------------------------------------------------------------------------ random vs reference


def _ref_impl(name, pol, ref, des, z0, hp):
    b = hp.get("beta", 0.1)
    r = pol - ref
    s = lambda x: 1 / (1 + torch.exp(-x))  # noqa: E731
    if name == "kto":
        return torch.where(des, hp["lambda_d"] * (1 - s(b * (r - z0))), hp["lambda_u"] * (1 - s(b * (z0 - r))))
    if name == "apo_zero_unpaired":
        return torch.where(des, hp["lambda_d"] * (1 - s(b * r)), hp["lambda_u"] * s(b * r))
    if name == "bco":
        z = b * r - hp["delta"]
        return torch.where(des, torch.log1p(torch.exp(-z)), torch.log1p(torch.exp(z)))
    raise AssertionError(name)


RANDOM_HP = {
    "kto": dict(beta=0.2, lambda_d=1.2, lambda_u=0.9),
    "apo_zero_unpaired": dict(beta=0.3, lambda_d=0.8, lambda_u=1.1),
    "bco": dict(beta=0.2, delta=0.4),
}


@pytest.mark.parametrize("name", ALL_NAMES)
def test_random_batch_matches_reference(name):
    g = torch.Generator().manual_seed(ALL_NAMES.index(name))
    pol = -60 * torch.rand(32, generator=g, dtype=torch.float64)
    ref = pol - 10 * (torch.rand(32, generator=g, dtype=torch.float64) - 0.5)
    des = torch.rand(32, generator=g) < 0.5
    assert des.any() and (~des).any()
    kl_pol = -60 * torch.rand(32, generator=g, dtype=torch.float64)
    z0 = kto_kl_anchor(kl_pol, kl_pol - 2 * torch.rand(32, generator=g, dtype=torch.float64))
    assert z0.item() > 0
    hp = RANDOM_HP[name]
    got = unpaired(name, pol, ref, des, kl_anchor=z0, **hp)
    torch.testing.assert_close(got, _ref_impl(name, pol, ref, des, z0, hp), rtol=1e-10, atol=1e-12)


def test_gradients_point_the_right_way():
    """Desirable examples lower their loss by raising their log-prob; undesirable ones by lowering it."""
    for name in ALL_NAMES:
        pol = torch.tensor([-5.0, -5.0], requires_grad=True)
        unpaired(name, pol, torch.tensor([-5.0, -5.0]), torch.tensor([True, False]), kl_anchor=0.2).sum().backward()
        assert pol.grad[0] < 0 < pol.grad[1], (name, pol.grad)


# ------------------------------------------------------------------------------------------ extremes


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ALL_NAMES)
def test_finite_at_extremes(name, dtype):
    big = 1e4
    pol = torch.tensor([0.0, -big, 0.0, -big, 0.0, 0.0], dtype=dtype, requires_grad=True)
    ref = torch.tensor([-big, 0.0, -big, 0.0, 0.0, 0.0], dtype=dtype)
    des = torch.tensor([True, True, False, False, True, False])
    for z0 in (0.0, big):
        out = unpaired(name, pol, ref, des, kl_anchor=z0)
        assert torch.isfinite(out).all(), (name, z0, out)
        (g,) = torch.autograd.grad(out.sum(), pol)
        assert torch.isfinite(g).all(), (name, z0, g)


# ------------------------------------------------------------------------------------------ metadata and errors


def test_spec_metadata():
    for name, spec in UNPAIRED_LOSSES.items():
        assert callable(spec.fn) and spec.defaults["beta"] == 0.1
        assert not spec.reference_free and not spec.length_normalized and not spec.needs_lengths
        assert spec.needs_kl_anchor == (name == "kto")
    assert UNPAIRED_LOSSES["kto"].defaults == {"beta": 0.1, "lambda_d": 1.0, "lambda_u": 1.0}
    assert UNPAIRED_LOSSES["bco"].defaults == {"beta": 0.1, "delta": None}


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown unpaired loss 'kto_pair'; known: apo_zero_unpaired, bco, kto"):
        unpaired("kto_pair", POL, REF, DES, kl_anchor=0.0)


def test_unknown_hparam_names_it_and_the_accepted_ones():
    with pytest.raises(ValueError, match=r"'desirable_weight'.*'kto'.*accepted: beta, lambda_d, lambda_u"):
        unpaired("kto", POL, REF, DES, kl_anchor=0.0, desirable_weight=1.0)


def test_kto_needs_the_anchor():
    with pytest.raises(ValueError, match=r"'kto' needs kl_anchor"):
        unpaired("kto", POL, REF, DES, kl_anchor=None)
    unpaired("apo_zero_unpaired", POL, REF, DES, kl_anchor=None)  # does not use it


def test_input_errors():
    with pytest.raises(ValueError, match="needs reference log-probs"):
        unpaired("kto", POL, None, DES, kl_anchor=0.0)
    with pytest.raises(ValueError, match="same shape"):
        unpaired("kto", POL, REF[:2], DES, kl_anchor=0.0)
    with pytest.raises(ValueError, match="desirable has shape"):
        unpaired("kto", POL, REF, DES[:2], kl_anchor=0.0)
    with pytest.raises(ValueError, match="bool tensor"):
        unpaired("kto", POL, REF, torch.tensor([0.5, 1.0, 0.0]), kl_anchor=0.0)
    with pytest.raises(ValueError, match="beta must be > 0"):
        unpaired("bco", POL, REF, DES, kl_anchor=None, beta=-1.0)
