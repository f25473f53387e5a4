"""Label-free telemetry of a round's pairs, from θ(k-1), the round's reference (ours, not the paper's; docs/method.md).

- How often the reference already prefers the chosen answer: the share of pairs whose cached chosen log-prob is above
  the rejected one (summed, what DPO compares, and per token, which discounts length). DPO has the most to teach
  where it does not.
- Image reliance: log π(a | image) − log π(a | noised image), mean per token, for the chosen and the rejected answer
  a, the noised image being the one generate.py made for that pair's rejected answer. A chosen answer that leans on
  the image much more than its rejected one makes a pair about the image; equal reliance makes a pair about
  something else (length, wording, a prior).
Nothing here reads a label.
"""

import torch


def _groups(types):
    t = list(types)
    return {"all": torch.ones(len(t), dtype=torch.bool), "des": torch.tensor([x == "des" for x in t]),
            "gen": torch.tensor([x == "gen" for x in t])}


def reference_preference(ref, types):
    """{group: {n, summed, per_token}}: share of pairs (all / des / gen) where the reference ranks chosen above
    rejected. ref: the cached dict of (N,) tensors (sena.refcache.FIELDS); types: N strings "des" / "gen"."""
    out = {}
    for name, m in _groups(types).items():
        if m.any():
            summed = ref["ref_chosen_logps"][m] > ref["ref_rejected_logps"][m]
            per_token = ref["ref_chosen_mean_logps"][m] > ref["ref_rejected_mean_logps"][m]
            out[name] = {"n": int(m.sum()), "summed": summed.float().mean().item(),
                         "per_token": per_token.float().mean().item()}
    return out


def image_reliance(clean, noised, types):
    """{group: {n, chosen, rejected}}: mean over pairs of mean-per-token log π(a | image) − log π(a | noised image),
    in nats per token. clean, noised: dicts of (n,) tensors scored by the same model on the same n pairs
    (sena.refcache.reference_logps without and with noise); types: n strings."""
    out = {}
    for name, m in _groups(types).items():
        if m.any():
            out[name] = {"n": int(m.sum())} | {
                side: (clean[f"ref_{side}_mean_logps"][m] - noised[f"ref_{side}_mean_logps"][m]).mean().item()
                for side in ("chosen", "rejected")}
    return out


def summary_line(tele):
    """One line for the log."""
    p, r = tele["reference_prefers_chosen"], tele.get("image_reliance", {})
    line = "telemetry: reference prefers chosen in " + ", ".join(
        f"{100 * v['summed']:.0f}% of {k}" for k, v in p.items())
    if r:
        line += " | image reliance (nats/token, clean − noised), chosen / rejected: " + ", ".join(
            f"{k} {v['chosen']:.3f} / {v['rejected']:.3f}" for k, v in r.items())
    return line
