"""SENA's losses as pure functions: per-sequence log-probs, DPO, and image content alignment (ICA).

The loss functions return per-example values; `ica_reduce` is the one reduction with a choice in it. SENA's
training loss (the paper's DPO + λ·ICA objective) is

    L = mean_b[ dpo_b ] + λ · ica_reduce(ica_b)        (β = 0.1, λ = 1 in the official runs)

with `dpo_b` from `dpo_loss` on *summed* token log-probs and `ica_b` from `ica_loss` on *mean-per-token*
log-probs of the chosen answer, both from `sequence_logps`.
"""

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def gather_logps(logits, targets):
    """log softmax(logits)[target] at every position, in fp32, with no shift.

    logp[b, t] = logits[b, t, targets[b, t]] − logsumexp_v logits[b, t, v]

    logits:  (..., V) any float dtype. Upcast to fp32 here; we gather the target logit and subtract logsumexp
             rather than building a second (..., V) log_softmax tensor. Pass only the positions you score
             (e.g. the model's logits_slice) to keep the fp32 copy small.
    targets: (...) int64, valid vocabulary ids (replace ignore positions before calling).
    returns: (...) fp32.
    """
    logits = logits.float()
    target_logits = torch.gather(logits, -1, targets.unsqueeze(-1)).squeeze(-1)  # (...)
    return target_logits - torch.logsumexp(logits, dim=-1)


def sequence_logps(logits, labels):
    """Summed and mean-per-token log-probs of the labelled tokens of each sequence, in fp32.

    THE SHIFT: logits[:, t] is the model's prediction for the *next* token, so it scores labels[:, t+1].
    We therefore pair logits[:, :-1] with labels[:, 1:]; labels[:, 0] is never scored and logits[:, -1] is unused.
    Positions whose label is -100 (prompt, image tokens, padding) are ignored.

        summed_b = Σ_t m[b,t] · log p(labels[b,t+1] | logits[b,t])
        mean_b   = summed_b / max(1, Σ_t m[b,t])          m[b,t] = (labels[b,t+1] != -100)

    logits: (B, T, V) any float dtype (bf16 is fine; the log-softmax runs in fp32).
    labels: (B, T) int64, same T as logits, -100 where not scored.
    returns: (summed (B,), mean (B,)) fp32. A sequence with no labelled token gets 0 for both.
    """
    logits = logits[:, :-1]  # (B, T-1, V): position t predicts token t+1
    labels = labels[:, 1:]  # (B, T-1)
    mask = labels != IGNORE_INDEX
    # Gather needs a valid index everywhere; masked positions are zeroed below.
    logps = gather_logps(logits, labels.masked_fill(~mask, 0))  # (B, T-1) fp32
    logps = logps * mask
    summed = logps.sum(-1)
    n_tokens = mask.sum(-1).clamp(min=1)
    return summed, summed / n_tokens


def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta, dpop=0.0):
    """Per-example DPO loss (Rafailov et al. 2023, arXiv 2305.18290) and detached implicit rewards.

        h_b      = (π_c − π_r) − (ref_c − ref_r) − μ·max(0, ref_c − π_c)     (summed sequence log-probs)
        loss_b   = −log σ(β·h_b)                            (computed as −logsigmoid for stability)
        reward_b = β·(π − ref)                              (chosen and rejected; no gradient)

    μ = dpop (default 0: plain DPO, SENA's loss). μ > 0 is DPO-Positive (Pal et al. 2024, arXiv 2402.13228, who use
    μ = 50): DPO can raise the margin while lowering the chosen answer's own likelihood, most easily when chosen and
    rejected differ in a few tokens (our clean vs noised descriptions); the penalty makes that a loss.
    Gradients: ∂loss/∂π_c = −β·σ(−β·h)·(1 + μ·[π_c < ref_c]), ∂loss/∂π_r = +β·σ(−β·h); none flows into the
    reference inputs. With the policy equal to the reference, h = 0 and the loss is exactly ln 2 (for any μ).

    All four log-prob arguments: (B,) float. beta, dpop: python floats.
    returns: (losses (B,), chosen_rewards (B,), rejected_rewards (B,)). Caller reduces, e.g. losses.mean().
    """
    ref_chosen_logps = ref_chosen_logps.detach()
    ref_rejected_logps = ref_rejected_logps.detach()
    h = (policy_chosen_logps - policy_rejected_logps) - (ref_chosen_logps - ref_rejected_logps)
    if dpop:
        h = h - dpop * (ref_chosen_logps - policy_chosen_logps).clamp(min=0)
    losses = -F.logsigmoid(beta * h)
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps).detach()
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps).detach()
    return losses, chosen_rewards, rejected_rewards


def ica_loss(policy_chosen_mean_logps, is_description):
    """Per-example image content alignment (ICA) term: NLL per token of the chosen answer, on `des` pairs only.

        ica_b = −des_b · mean_logp_b           des_b = 1 for a description pair, 0 for a short-answer (`gen`) pair

    policy_chosen_mean_logps: (B,) float, mean-per-token log-probs of the chosen answers (sequence_logps()[1]).
    is_description: (B,) bool or 0/1 tensor.
    returns: (B,) same dtype as the log-probs; exactly 0 (and zero gradient) where des_b = 0, even if that
             pair's log-prob is -inf.

    ica_reduce turns these into the batch's ICA term.
    """
    des = is_description.bool()
    # where() rather than multiplying by des: 0·(−inf) would give nan on a gen pair.
    return torch.where(des, -policy_chosen_mean_logps, torch.zeros_like(policy_chosen_mean_logps))


def ica_reduce(ica, is_description, reduction="batch"):
    """The batch's ICA term from ica_loss's per-example values (B,):

        batch (official, released code):  ica = Σ_b ica_b / B            a gen pair counts as a zero
        des   (switch):                   ica = Σ_b ica_b / max(1, Σ_b des_b)

    For the same λ, "batch" therefore gives ICA the weight of the description pairs' share of the batch.
    """
    if reduction not in ("batch", "des"):
        raise ValueError(f"ICA reduction must be 'batch' or 'des', not {reduction!r}")
    return ica.sum() / (len(ica) if reduction == "batch" else is_description.float().sum().clamp(min=1))
