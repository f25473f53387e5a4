"""Preference pairs -> tensors, and the per-sequence log-probs of chosen and rejected under a model.

A batch of B pairs becomes 2B sequences, chosen rows first: rows [0, B) are prompt+chosen, rows [B, 2B) are
prompt+rejected. The image features of a pair are computed once and used by both of its rows.
"""

import os

import torch

from sena.chat import IGNORE_INDEX, encode_answer, encode_prompt
from sena.image import load_image, preprocess
from sena.losses import sequence_logps


def tokenize_pair(tok, config, pair):
    prompt = encode_prompt(tok, pair["prompt"], config.n_image_tokens, config.image_token_index)
    return prompt, encode_answer(tok, pair["chosen"]), encode_answer(tok, pair["rejected"])


def pair_batch(tokenized, pad_token_id):
    """tokenized: list of (prompt_ids, chosen_ids, rejected_ids). Returns right-padded input_ids, attention_mask,
    labels, all (2B, T), with labels -100 on prompt and padding positions."""
    rows = [(p, c) for p, c, _ in tokenized] + [(p, r) for p, _, r in tokenized]
    T = max(len(p) + len(a) for p, a in rows)
    input_ids = torch.full((len(rows), T), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, (p, a) in enumerate(rows):
        n = len(p) + len(a)
        input_ids[i, :n] = torch.tensor(p + a)
        labels[i, len(p) : n] = torch.tensor(a)
        mask[i, :n] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def load_pixels(pairs, image_root, image_cfg):
    """(B, 3, S, S) preprocessed clean images of the pairs."""
    return torch.stack([preprocess(load_image(os.path.join(image_root, p["image"])), image_cfg) for p in pairs])


def pair_logps(model, batch, image_features):
    """Summed and mean answer log-probs of chosen and rejected.

    batch: from pair_batch, (2B, T) tensors on the model's device. image_features: (B, n_tok, D), one per pair.
    Returns chosen_logps, rejected_logps, chosen_mean_logps, rejected_mean_logps, each (B,) fp32.
    """
    B = image_features.shape[0]
    logits = model(batch["input_ids"], attention_mask=batch["attention_mask"],
                   image_features=torch.cat([image_features, image_features]))  # (2B, T, V)
    summed, mean = sequence_logps(logits, batch["labels"])
    return summed[:B], summed[B:], mean[:B], mean[B:]
