"""sena/losses.py: hand-computed values in float64, closed-form gradients, the one-token shift."""

import math

import pytest
import torch
import torch.nn.functional as F

from sena.losses import dpo_loss, gather_logps, ica_loss, sequence_logps

f64 = torch.float64


# ---------------------------------------------------------------- dpo_loss

# Two pairs, β = 0.1, summed log-probs:
#   pair 0: π_c=-10, π_r=-14, ref_c=-11, ref_r=-12 → h = (-10+14) - (-11+12) = 3,  βh = 0.3
#           loss = log(1 + e^-0.3) = 0.5543552444685271; rewards 0.1·(+1) = 0.1, 0.1·(-2) = -0.2
#   pair 1: π_c=-5,  π_r=-3,  ref_c=-4,  ref_r=-4  → h = (-5+3) - 0 = -2,      βh = -0.2
#           loss = log(1 + e^0.2) = 0.7981388693815918; rewards 0.1·(-1) = -0.1, 0.1·(+1) = 0.1
BETA = 0.1
PI_C, PI_R, REF_C, REF_R = [-10.0, -5.0], [-14.0, -3.0], [-11.0, -4.0], [-12.0, -4.0]


def _dpo_inputs(ref_grad=False):
    pc = torch.tensor(PI_C, dtype=f64, requires_grad=True)
    pr = torch.tensor(PI_R, dtype=f64, requires_grad=True)
    rc = torch.tensor(REF_C, dtype=f64, requires_grad=ref_grad)
    rr = torch.tensor(REF_R, dtype=f64, requires_grad=ref_grad)
    return pc, pr, rc, rr


def test_dpo_hand_values():
    losses, chosen_r, rejected_r = dpo_loss(*_dpo_inputs(), beta=BETA)
    assert losses.shape == (2,) and losses.dtype == f64
    torch.testing.assert_close(
        losses, torch.tensor([0.5543552444685271, 0.7981388693815918], dtype=f64), rtol=0, atol=1e-14
    )
    torch.testing.assert_close(chosen_r, torch.tensor([0.1, -0.1], dtype=f64), rtol=0, atol=1e-14)
    torch.testing.assert_close(rejected_r, torch.tensor([-0.2, 0.1], dtype=f64), rtol=0, atol=1e-14)


def test_dpo_gradient_closed_form():
    # ∂L/∂π_c = -β·σ(-βh), ∂L/∂π_r = +β·σ(-βh); pair 0: -0.0425557483188341, pair 1: -0.0549833997312478.
    pc, pr, rc, rr = _dpo_inputs()
    losses, _, _ = dpo_loss(pc, pr, rc, rr, beta=BETA)
    losses.sum().backward()
    expected = torch.tensor([-0.0425557483188341, -0.0549833997312478], dtype=f64)
    torch.testing.assert_close(pc.grad, expected, rtol=0, atol=1e-15)
    torch.testing.assert_close(pr.grad, -expected, rtol=0, atol=1e-15)
    # Same thing written from the formula, so the constants above are checked too.
    h = torch.tensor([3.0, -2.0], dtype=f64)
    torch.testing.assert_close(pc.grad, -BETA * torch.sigmoid(-BETA * h), rtol=0, atol=1e-15)


def test_dpo_no_grad_to_reference_and_rewards_detached():
    pc, pr, rc, rr = _dpo_inputs(ref_grad=True)
    losses, chosen_r, rejected_r = dpo_loss(pc, pr, rc, rr, beta=BETA)
    assert not chosen_r.requires_grad and not rejected_r.requires_grad
    losses.sum().backward()
    for ref in (rc, rr):
        assert ref.grad is None or torch.count_nonzero(ref.grad) == 0
    assert torch.count_nonzero(pc.grad) == 2  # the policy did get a gradient


def test_dpo_policy_equals_reference_is_ln2():
    logps = torch.tensor([-3.25, -17.5, -120.0], dtype=f64)
    rejected = torch.tensor([-4.0, -2.0, -99.0], dtype=f64)
    losses, chosen_r, rejected_r = dpo_loss(logps, rejected, logps.clone(), rejected.clone(), beta=0.1)
    assert torch.equal(losses, torch.full((3,), math.log(2), dtype=f64))
    assert torch.equal(chosen_r, torch.zeros(3, dtype=f64)) and torch.equal(rejected_r, torch.zeros(3, dtype=f64))


def test_dpo_stable_for_large_margins():
    big = torch.tensor([5000.0, -5000.0], dtype=torch.float32)
    zero = torch.zeros(2)
    losses, _, _ = dpo_loss(big, zero, zero, zero, beta=1.0)
    assert torch.isfinite(losses).all()
    torch.testing.assert_close(losses, torch.tensor([0.0, 5000.0]), rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- sequence_logps

# Vocabulary of 3, T = 4; logits are log-probabilities, so log_softmax returns them unchanged.
PROBS = [[0.5, 0.25, 0.25], [0.1, 0.2, 0.7], [0.6, 0.3, 0.1], [1 / 3, 1 / 3, 1 / 3]]
#  labels [0, 0, 2, 1]: position t scores labels[t+1] → p = 0.5 (t0→0), 0.7 (t1→2), 0.3 (t2→1); labels[0] unscored.
#  summed = ln(0.5·0.7·0.3) = ln 0.105 = -2.2537949288246137, mean = summed / 3
#  labels [0, -100, 2, 1]: ln(0.7·0.3) = ln 0.21 = -1.5606477482646683, mean = summed / 2


def _hand_logits():
    return torch.tensor(PROBS, dtype=f64).log().unsqueeze(0)  # (1, 4, 3)


def test_sequence_logps_shift_hand_values():
    logits = _hand_logits().repeat(2, 1, 1)
    labels = torch.tensor([[0, 0, 2, 1], [0, -100, 2, 1]])
    summed, mean = sequence_logps(logits, labels)
    assert summed.dtype == torch.float32 and summed.shape == (2,)
    expected = torch.tensor([-2.2537949288246137, -1.5606477482646683])
    torch.testing.assert_close(summed, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(mean, expected / torch.tensor([3.0, 2.0]), rtol=0, atol=1e-6)
    # Without the shift (pairing logits[t] with labels[t]) the first row would be ln(0.5·0.25·0.1·(1/3)) instead.
    assert abs(summed[0].item() - math.log(0.5 * 0.25 * 0.1 / 3)) > 1.0


def test_sequence_logps_ignores_first_label_and_last_logits():
    logits = _hand_logits()
    labels = torch.tensor([[0, 0, 2, 1]])
    ref = sequence_logps(logits, labels)
    logits2 = logits.clone()
    logits2[:, -1] = torch.tensor([5.0, -3.0, 1.0], dtype=f64)  # last position predicts nothing we score
    labels2 = labels.clone()
    labels2[:, 0] = 2  # first token is never predicted
    for a, b in zip(ref, sequence_logps(logits2, labels2)):
        assert torch.equal(a, b)


def test_sequence_logps_padding_invariant():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 6, 11, generator=g)
    labels = torch.tensor([[-100, -100, 4, 7, 1, 9]])
    ref_sum, ref_mean = sequence_logps(logits, labels)
    # right padding: extra positions with random logits and label -100
    pad_logits = torch.cat([logits, torch.randn(1, 3, 11, generator=g)], 1)
    pad_labels = torch.cat([labels, torch.full((1, 3), -100)], 1)
    # left padding: extra positions in front, label -100
    left_logits = torch.cat([torch.randn(1, 2, 11, generator=g), logits], 1)
    left_labels = torch.cat([torch.full((1, 2), -100), labels], 1)
    for lg, lb in ((pad_logits, pad_labels), (left_logits, left_labels)):
        s, m = sequence_logps(lg, lb)
        torch.testing.assert_close(s, ref_sum, rtol=0, atol=1e-6)
        torch.testing.assert_close(m, ref_mean, rtol=0, atol=1e-6)


def test_sequence_logps_matches_cross_entropy():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 7, 13, generator=g, dtype=f64)
    labels = torch.randint(0, 13, (3, 7), generator=g)
    labels[0, :3] = -100
    labels[2, 5:] = -100
    summed, mean = sequence_logps(logits, labels)
    for b in range(3):
        nll = F.cross_entropy(logits[b, :-1], labels[b, 1:], ignore_index=-100, reduction="none")
        n = (labels[b, 1:] != -100).sum()
        torch.testing.assert_close(summed[b].double(), -nll.sum(), rtol=0, atol=1e-5)
        torch.testing.assert_close(mean[b].double(), -nll.sum() / n, rtol=0, atol=1e-6)


def test_sequence_logps_bf16_in_fp32_out():
    g = torch.Generator().manual_seed(2)
    logits = (4 * torch.randn(2, 5, 17, generator=g)).bfloat16()
    labels = torch.tensor([[-100, 3, 5, 16, 0], [-100, -100, -100, 2, 2]])
    summed, mean = sequence_logps(logits, labels)
    assert summed.dtype == torch.float32 and mean.dtype == torch.float32
    ref_sum, ref_mean = sequence_logps(logits.double(), labels)  # same bf16 values, exact upcast
    torch.testing.assert_close(summed.double(), ref_sum.double(), rtol=0, atol=1e-5)
    torch.testing.assert_close(mean.double(), ref_mean.double(), rtol=0, atol=1e-5)


def test_sequence_logps_empty_sequence_is_zero():
    logits = torch.randn(1, 4, 5)
    summed, mean = sequence_logps(logits, torch.full((1, 4), -100))
    assert summed.item() == 0.0 and mean.item() == 0.0


def test_gather_logps_no_shift():
    logits = _hand_logits()[0]  # (4, 3)
    out = gather_logps(logits, torch.tensor([0, 2, 1, 0]))
    expected = torch.tensor([0.5, 0.7, 0.3, 1 / 3], dtype=f64).log().float()
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


# ---------------------------------------------------------------- ica_loss

# mean log-probs [-2, -0.5, -3], des [1, 0, 1] → ica_b = [2, 0, 3];
# whole-batch mean = 5/3 (gradient -des/3), description-pairs mean = 5/2 (gradient -des/2).


def test_ica_values_and_reductions():
    mean_logps = torch.tensor([-2.0, -0.5, -3.0], dtype=f64, requires_grad=True)
    des = torch.tensor([True, False, True])
    ica = ica_loss(mean_logps, des)
    torch.testing.assert_close(ica, torch.tensor([2.0, 0.0, 3.0], dtype=f64), rtol=0, atol=1e-15)

    (g_each,) = torch.autograd.grad(ica.sum(), mean_logps, retain_graph=True)
    torch.testing.assert_close(g_each, torch.tensor([-1.0, 0.0, -1.0], dtype=f64), rtol=0, atol=0)

    official = ica.mean()
    assert official.item() == pytest.approx(5 / 3, abs=1e-14)
    (g_off,) = torch.autograd.grad(official, mean_logps, retain_graph=True)
    torch.testing.assert_close(g_off, torch.tensor([-1 / 3, 0.0, -1 / 3], dtype=f64), rtol=0, atol=1e-15)

    switch = ica.sum() / des.sum().clamp(min=1)
    assert switch.item() == pytest.approx(5 / 2, abs=1e-14)
    (g_sw,) = torch.autograd.grad(switch, mean_logps)
    torch.testing.assert_close(g_sw, torch.tensor([-0.5, 0.0, -0.5], dtype=f64), rtol=0, atol=1e-15)


def test_ica_accepts_float_mask_and_ignores_inf_on_gen_pairs():
    mean_logps = torch.tensor([-float("inf"), -1.5], requires_grad=True)
    ica = ica_loss(mean_logps, torch.tensor([0.0, 1.0]))
    assert torch.equal(ica, torch.tensor([0.0, 1.5]))
    ica.sum().backward()
    assert torch.equal(mean_logps.grad, torch.tensor([0.0, -1.0]))


def test_dpop_hand_values_and_gradient():
    # DPO-Positive, μ = 2, the inputs above. Pair 0: π_c = -10 ≥ ref_c = -11, no penalty: plain DPO's loss and
    # gradient. Pair 1: π_c = -5 < ref_c = -4, penalty 2·1: h = -2 - 2 = -4, βh = -0.4,
    # loss = log(1 + e^0.4) = 0.9130152523999526; ∂L/∂π_c = -β·σ(0.4)·(1 + μ) = -0.1796062980337356,
    # ∂L/∂π_r = +β·σ(0.4) = 0.05986876601124521.
    pc, pr, rc, rr = _dpo_inputs()
    losses, chosen_r, _ = dpo_loss(pc, pr, rc, rr, beta=BETA, dpop=2.0)
    torch.testing.assert_close(losses, torch.tensor([0.5543552444685271, 0.9130152523999526], dtype=f64),
                               rtol=0, atol=1e-14)
    torch.testing.assert_close(chosen_r, torch.tensor([0.1, -0.1], dtype=f64), rtol=0, atol=1e-14)  # rewards as DPO
    losses.sum().backward()
    torch.testing.assert_close(pc.grad, torch.tensor([-0.0425557483188341, -0.1796062980337356], dtype=f64),
                               rtol=0, atol=1e-15)
    torch.testing.assert_close(pr.grad, torch.tensor([0.0425557483188341, 0.05986876601124521], dtype=f64),
                               rtol=0, atol=1e-15)
    # At the reference the penalty is 0: still exactly ln 2.
    logps = torch.tensor([-3.25, -17.5], dtype=f64)
    same, _, _ = dpo_loss(logps, logps - 1, logps.clone(), logps - 1, beta=0.1, dpop=50.0)
    assert torch.equal(same, torch.full((2,), math.log(2), dtype=f64))
