"""Advantage estimators (posttrain.losses.advantages) against hand-computed values."""

from __future__ import annotations

import pytest
import torch

from posttrain.losses.advantages import (
    EPS_STUDY,
    EPS_TRL,
    batch_normalize,
    frac_zero_std_groups,
    gae,
    group_zscore,
    kl_penalized_scores,
    kl_shaped_token_rewards,
    leave_one_out,
    masked_whiten,
    reinforce_pp_advantages,
    reinforce_pp_baseline_advantages,
    remax_advantages,
    returns_to_go,
)

close = torch.testing.assert_close
R = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0])  # two prompts x 4 completions


def test_group_zscore_group_scale():
    # group 1: mean 0.5, Bessel std sqrt((4 * 0.25) / 3) = sqrt(1/3) = 0.5773503; group 2: all equal -> 0
    # study eps 1e-8: 0.5 / 0.5773503 = 0.8660254; TRL eps 1e-4: 0.5 / 0.5774503 = 0.8658754
    close(group_zscore(R, 4, eps=EPS_STUDY), torch.tensor([0.8660254, -0.8660254, -0.8660254, 0.8660254, 0, 0, 0, 0]))
    close(group_zscore(R, 4, eps=EPS_TRL), torch.tensor([0.8658754, -0.8658754, -0.8658754, 0.8658754, 0, 0, 0, 0]))
    assert EPS_STUDY == 1e-8 and EPS_TRL == 1e-4
    # the same as [P, G]
    close(group_zscore(R.reshape(2, 4), eps=EPS_STUDY), group_zscore(R, 4, eps=EPS_STUDY).reshape(2, 4))


def test_group_zscore_batch_and_none_scales():
    # centred by group mean: [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]
    close(group_zscore(R, 4, scale="none"), torch.tensor([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]))
    # batch: divided by the Bessel std of all 8 rewards: mean 0.75, sum of squares 6*0.0625 + 2*0.5625 = 1.5,
    # std = sqrt(1.5 / 7) = 0.4629100 -> 0.5 / 0.4629100 = 1.0801234
    close(group_zscore(R, 4, scale="batch", eps=1e-8),
          torch.tensor([1.0801234, -1.0801234, -1.0801234, 1.0801234, 0, 0, 0, 0]))
    with pytest.raises(ValueError, match="group"):
        group_zscore(R, 4, scale="global")


def test_group_zscore_errors_and_singletons():
    with pytest.raises(ValueError, match="group_size"):
        group_zscore(R, 3)
    close(group_zscore(torch.tensor([3.0, 5.0]), 1), torch.zeros(2))


def test_frac_zero_std_groups():
    assert frac_zero_std_groups(R, 4) == 0.5
    assert frac_zero_std_groups(torch.tensor([1.0, 1.0, 0.0, 0.0, 0.5, 0.5]), 2) == 1.0
    assert frac_zero_std_groups(torch.tensor([1.0, 0.0, 0.0, 0.0]), 2) == 0.5


def test_leave_one_out():
    # [1, 0, 0, 1]: baseline of item 0 = (0 + 0 + 1) / 3 -> 1 - 1/3 = 2/3; item 1: (1 + 0 + 1) / 3 -> -2/3
    # [3, 1]: 3 - 1 = 2, 1 - 3 = -2
    close(leave_one_out(torch.tensor([1.0, 0.0, 0.0, 1.0]), 4), torch.tensor([2 / 3, -2 / 3, -2 / 3, 2 / 3]))
    close(leave_one_out(torch.tensor([3.0, 1.0, 2.0, 2.0]), 2), torch.tensor([2.0, -2.0, 0.0, 0.0]))
    with pytest.raises(ValueError, match="at least 2"):
        leave_one_out(torch.tensor([1.0, 2.0]), 1)


def test_batch_normalize():
    # [1, 2, 3, 4]: mean 2.5, Bessel std sqrt(5/3) = 1.2909944 -> +-1.5/1.29099 = 1.1618950, +-0.5/1.29099 = 0.3872983
    close(batch_normalize(torch.tensor([1.0, 2.0, 3.0, 4.0])),
          torch.tensor([-1.161895, -0.3872983, 0.3872983, 1.161895]))
    x = torch.tensor([[1.0, 2.0, 99.0], [3.0, 4.0, -99.0]])
    m = torch.tensor([[1, 1, 0], [1, 1, 0]])
    close(batch_normalize(x, m), torch.tensor([[-1.161895, -0.3872983, 0.0], [0.3872983, 1.161895, 0.0]]))
    close(batch_normalize(torch.tensor([2.0, -2.0]), center=False), torch.tensor([0.7071068, -0.7071068]))


def test_reinforce_pp_token_level():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, float("nan")]])  # padding holds anything
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    # returns-to-go (gamma 1): [[1, 1, 1], [2, 2, 0]]; valid values [1, 1, 1, 2, 2]: mean 1.4,
    # Bessel var (3 * 0.16 + 2 * 0.36) / 4 = 0.3, std 0.5477226: (1 - 1.4)/std = -0.7302967, (2 - 1.4)/std = 1.0954451
    close(returns_to_go(rewards, mask), torch.tensor([[1.0, 1.0, 1.0], [2.0, 2.0, 0.0]]))
    close(returns_to_go(rewards, mask, gamma=0.5), torch.tensor([[0.25, 0.5, 1.0], [1.0, 2.0, 0.0]]))
    close(reinforce_pp_advantages(rewards, mask),
          torch.tensor([[-0.7302967, -0.7302967, -0.7302967], [1.0954451, 1.0954451, 0.0]]))


def test_reinforce_pp_baseline():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0])
    # centred: [0.5, -0.5, -0.5, 0.5, 0.25, 0.25, 0.25, -0.75]; sum of squares 1 + 3 * 0.0625 + 0.5625 = 1.75,
    # Bessel var 1.75 / 7 = 0.25, std 0.5
    close(reinforce_pp_baseline_advantages(r, 4), torch.tensor([1.0, -1.0, -1.0, 1.0, 0.5, 0.5, 0.5, -1.5]))


def test_remax():
    close(remax_advantages(torch.tensor([1.0, 0.0, 1.0]), torch.tensor([1.0, 1.0, 0.0])),
          torch.tensor([0.0, -1.0, 1.0]))
    with pytest.raises(ValueError):
        remax_advantages(torch.zeros(3), torch.zeros(2))


def test_gae_hand_values():
    # row 0: r = [0, 0, 1], V = [0.5, 0.6, 0.7], gamma 1, lam 0.5
    #   t2: delta = 1 - 0.7 = 0.3, A = 0.3; t1: delta = 0.7 - 0.6 = 0.1, A = 0.1 + 0.5*0.3 = 0.25;
    #   t0: delta = 0.6 - 0.5 = 0.1, A = 0.1 + 0.5*0.25 = 0.225; returns A + V = [0.725, 0.85, 1.0]
    adv, ret = gae(torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([[0.5, 0.6, 0.7]]), torch.ones(1, 3), gamma=1.0,
                   lam=0.5)
    close(adv, torch.tensor([[0.225, 0.25, 0.3]]))
    close(ret, torch.tensor([[0.725, 0.85, 1.0]]))
    # right padding, gamma 0.9, lam 0.8: r = [1, 2, pad], V = [0.5, 1.0, pad]
    #   t1: delta = 2 + 0.9*0 - 1 = 1.0, A = 1.0; t0: delta = 1 + 0.9*1.0 - 0.5 = 1.4, A = 1.4 + 0.72*1.0 = 2.12
    nan = float("nan")  # whatever padding holds cannot leak
    adv, ret = gae(torch.tensor([[1.0, 2.0, nan]]), torch.tensor([[0.5, 1.0, nan]]), torch.tensor([[1, 1, 0]]),
                   gamma=0.9, lam=0.8)
    close(adv, torch.tensor([[2.12, 1.0, 0.0]]))
    close(ret, torch.tensor([[2.62, 2.0, 0.0]]))
    # a hole in the mask is skipped: r = [0, x, 1], V = [0.5, x, 0.7], gamma 1, lam 0.5
    #   t2: A = 0.3; t0: delta = 0 + 0.7 - 0.5 = 0.2, A = 0.2 + 0.5*0.3 = 0.35
    adv, _ = gae(torch.tensor([[0.0, 9.0, 1.0]]), torch.tensor([[0.5, 5.0, 0.7]]), torch.tensor([[1, 0, 1]]),
                 gamma=1.0, lam=0.5)
    close(adv, torch.tensor([[0.35, 0.0, 0.3]]))


def test_gae_lambda_one_is_return_minus_value():
    r = torch.tensor([[0.1, -0.2, 0.3, 1.0]])
    v = torch.tensor([[0.4, 0.3, 0.2, 0.1]])
    adv, ret = gae(r, v, torch.ones(1, 4), gamma=1.0, lam=1.0)
    close(ret, torch.tensor([[1.2, 1.1, 1.3, 1.0]]))  # returns-to-go
    close(adv, ret - v)


def test_masked_whiten():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0, 50.0])
    m = torch.tensor([1, 1, 1, 1, 0])
    w = masked_whiten(x, m)
    close(w[:4], torch.tensor([-1.161895, -0.3872983, 0.3872983, 1.161895]))
    close(masked_whiten(x, m, shift_mean=False)[:4], torch.tensor([-1.161895, -0.3872983, 0.3872983, 1.161895]) + 2.5)


def test_kl_in_the_reward():
    logps = torch.tensor([[-1.0, -2.0, -3.0]])
    ref = torch.tensor([[-1.5, -2.0, -2.0]])
    # k1 = logp - ref = [0.5, 0, -1]; -0.1 * k1 = [-0.05, 0, 0.1]; score 2 at the last valid token
    close(kl_shaped_token_rewards(torch.tensor([2.0]), logps, ref, torch.ones(1, 3), kl_coef=0.1),
          torch.tensor([[-0.05, 0.0, 2.1]]))
    close(kl_shaped_token_rewards(torch.tensor([2.0]), logps, ref, torch.tensor([[1, 1, 0]]), kl_coef=0.1),
          torch.tensor([[-0.05, 2.0, 0.0]]))
    # RLOO: R - 0.1 * sum k1 = 1 - 0.1 * (-0.5) = 1.05; with the padding token masked: 1 - 0.1 * 0.5 = 0.95
    close(kl_penalized_scores(torch.tensor([1.0]), logps, ref, torch.ones(1, 3), kl_coef=0.1), torch.tensor([1.05]))
    close(kl_penalized_scores(torch.tensor([1.0]), logps, ref, torch.tensor([[1, 1, 0]]), kl_coef=0.1),
          torch.tensor([0.95]))
