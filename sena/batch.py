"""Preference pairs -> tensors, and the per-sequence log-probs of chosen and rejected under a model.

Shared prefix. The image and prompt are ~90% of a SENA sequence and identical for chosen and rejected, so a pair
is packed into ONE row and the prompt runs through the model once:

    columns   [ prompt (P)          | chosen (Ac)         | rejected (Ar)       | pad ]
    positions   0 .. P-1             P .. P+Ac-1           P .. P+Ar-1           0
    sees        prompt (causal)      prompt + chosen       prompt + rejected     itself

Rejected restarts its positions at P and is blocked from the chosen keys, so every chosen and rejected token has
exactly the queries, keys and positions it has in its own duplicated sequence [prompt | answer]: the log-probs are
equal to the duplicated forward up to float summation order (tests/test_fast_paths.py). THE SHIFT: the token in
column t is scored by the logits of column t-1, except each answer's first token, scored by the last prompt column
P-1 (for rejected that column is not adjacent). The LM head and log-softmax run only on those columns, and the
last decoder layer computes its queries and MLP only from the first of them on (Llava.hidden_states keep_from).

`plain_pair_batch` / `plain_pair_logps` keep the duplicated layout (2B rows, chosen rows first, full logits) as the
reference path for tests and benchmarks.
"""

import os

import torch
import torch.utils.checkpoint

from sena.chat import encode_answer, encode_prompt
from sena.image import load_image, preprocess
from sena.losses import IGNORE_INDEX, gather_logps, sequence_logps
from sena.noise import noised_image

LOGITS_PER_CHUNK = 2**24  # fp32 logits materialised at once by answer_logps (64 MB; 523 rows of a 32064 vocab)


def tokenize_pair(tok, config, pair):
    prompt = encode_prompt(tok, pair["prompt"], config.n_image_tokens, config.image_token_index)
    return prompt, encode_answer(tok, pair["chosen"]), encode_answer(tok, pair["rejected"])


def pack(rows, pad_token_id):
    """Shared-prefix packing, the one packer of SENA's pairs and of the world's θ0 build: a row is one prefix and
    several suffixes, each suffix restarting its positions after the prefix.

    rows: list of B (prefix_ids, [(suffix_ids, suffix_labels), ...]).
        columns   [ prefix (P) | suffix 1 (n1) | suffix 2 (n2) | ... | pad ]
        positions   0 .. P-1     P .. P+n1-1     P .. P+n2-1           0
        segment     0            1               2                     -1
    Returns input_ids, labels (IGNORE_INDEX on the prefix and padding), position_ids and segment, all (B, T) int64.
    With block_mask(segment), every suffix token has exactly the keys and positions of its own unpacked sequence.
    """
    B = len(rows)
    T = max(len(p) + sum(len(ids) for ids, _ in sfx) for p, sfx in rows)
    input_ids = torch.full((B, T), pad_token_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((B, T), dtype=torch.long)
    segment = torch.full((B, T), -1, dtype=torch.long)
    for b, (prefix, sfx) in enumerate(rows):
        P = n = len(prefix)
        input_ids[b, :P], segment[b, :P] = torch.tensor(prefix, dtype=torch.long), 0
        position_ids[b, :P] = torch.arange(P)
        for j, (ids, lab) in enumerate(sfx):
            m = len(ids)
            input_ids[b, n : n + m], labels[b, n : n + m] = torch.tensor(ids, dtype=torch.long), torch.tensor(lab)
            position_ids[b, n : n + m], segment[b, n : n + m] = torch.arange(P, P + m), j + 1
            n += m
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "segment": segment}


def block_mask(segment):
    """(B, T, T) bool, True where query t may see key s: causal, a real key, and the key in the prefix (segment 0)
    or in the query's own segment. So a suffix never sees another suffix (rejected never sees chosen); padding
    (-1) sees the prefix only and is seen by nobody."""
    T = segment.shape[1]
    t = torch.arange(T, device=segment.device)
    causal = t[None, :] <= t[:, None]  # (T, T) key s <= query t
    sq, sk = segment[:, :, None], segment[:, None, :]  # (B, T, 1) queries, (B, 1, T) keys
    return causal & (sk >= 0) & ((sk == 0) | (sk == sq))


def pair_batch(tokenized, pad_token_id):
    """tokenized: list of B (prompt_ids, chosen_ids, rejected_ids). pack's tensors with the prompt as prefix and
    chosen, rejected as suffixes 1 and 2, plus attention_mask (1 on real tokens: the token count), and the scoring
    positions: score_index (n,) flat index b*T+t of the column whose logits score a token, score_target (n,) that
    token, score_row (n,) its sequence: b for pair b's chosen, B+b for its rejected.
    """
    B = len(tokenized)
    packed = pack([(p, [(c, c), (r, r)]) for p, c, r in tokenized], pad_token_id)
    T = packed["input_ids"].shape[1]
    index, target, row = [], [], []
    for b, (p, c, r) in enumerate(tokenized):
        P, Ac, Ar = len(p), len(c), len(r)
        # Column of the logits that score each answer token: the previous column, or P-1 for an answer's first.
        index += [b * T + P - 1 + j for j in range(Ac)] + [b * T + (P - 1 if j == 0 else P + Ac + j - 1)
                                                           for j in range(Ar)]
        target += c + r
        row += [b] * Ac + [B + b] * Ar
    return {"input_ids": packed["input_ids"], "attention_mask": (packed["segment"] >= 0).long(),
            "position_ids": packed["position_ids"], "segment": packed["segment"], "score_index": torch.tensor(index),
            "score_target": torch.tensor(target), "score_row": torch.tensor(row)}


def answer_logps(lm_head, h, targets, logits_per_chunk=LOGITS_PER_CHUNK):
    """log softmax(lm_head(h))[target] per row, fp32: h (n, D), targets (n,) -> (n,).

    The LM head runs on these n rows only, in chunks of about logits_per_chunk logits. With gradients on and more
    than one chunk, each chunk is recomputed in backward (checkpointed), so only h is stored, never (n, V) logits.
    """
    rows = max(1, logits_per_chunk // lm_head.weight.shape[0])
    if h.shape[0] <= rows:
        return gather_logps(lm_head(h), targets)

    def f(hc, tc):
        return gather_logps(lm_head(hc), tc)

    ckpt = torch.is_grad_enabled() and h.requires_grad
    return torch.cat([torch.utils.checkpoint.checkpoint(f, h[s : s + rows], targets[s : s + rows], use_reentrant=False)
                      if ckpt else f(h[s : s + rows], targets[s : s + rows]) for s in range(0, h.shape[0], rows)])


def pair_logps(model, batch, image_features):
    """Summed and mean answer log-probs of chosen and rejected, one shared-prefix forward per pair.

    batch: from pair_batch, on the model's device. image_features: (B, n_tok, D), one per pair.
    Returns chosen_logps, rejected_logps, chosen_mean_logps, rejected_mean_logps, each (B,) fp32.
    """
    B, T = batch["input_ids"].shape
    col = batch["score_index"] % T  # (n,) the column of each scoring position
    c0 = int(col.min())  # nothing left of it is scored: the last layer skips those columns (keep_from)
    h = model.hidden_states(batch["input_ids"], block_mask(batch["segment"]), image_features=image_features,
                            position_ids=batch["position_ids"], keep_from=c0)  # (B, T - c0, D)
    h = h.reshape(B * (T - c0), -1)[batch["score_index"] // T * (T - c0) + col - c0]  # (n, D): scoring columns
    logps = answer_logps(model.lm_head, h, batch["score_target"])  # (n,) fp32
    row = batch["score_row"]
    summed = logps.new_zeros(2 * B).index_add(0, row, logps)  # (2B,): chosen rows first
    mean = summed / torch.bincount(row, minlength=2 * B).clamp(min=1)
    return summed[:B], summed[B:], mean[:B], mean[B:]


def plain_pair_batch(tokenized, pad_token_id):
    """The duplicated layout: rows [0, B) prompt+chosen, [B, 2B) prompt+rejected; input_ids, attention_mask, labels
    (2B, T) right-padded, labels -100 on prompt and padding."""
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


def plain_pair_logps(model, batch, image_features):
    """pair_logps on a plain_pair_batch: every prompt twice, full-vocabulary logits at every position."""
    B = image_features.shape[0]
    logits = model(batch["input_ids"], attention_mask=batch["attention_mask"],
                   image_features=torch.cat([image_features, image_features]))  # (2B, T, V)
    summed, mean = sequence_logps(logits, batch["labels"])
    return summed[:B], summed[B:], mean[:B], mean[B:]


def load_pixels(pairs, image_root, image_cfg):
    """(B, 3, S, S) preprocessed clean images of the pairs."""
    return torch.stack([preprocess(load_image(os.path.join(image_root, p["image"])), image_cfg) for p in pairs])


def pair_features(model, pairs, image_root, image_cfg, cache=None, noise=None):
    """(B, n_tok, D) image features of the pairs, each distinct image read and encoded once.

    The pairs of one image (its des and gen pair) share the features. cache: optional dict image name -> (n_tok, D)
    kept by the caller across calls; valid while the vision tower and projector are frozen (LoRA on the LLM).
    noise: optional (t, seed, round): encode each image noised exactly as generate.py noised it for the rejected
    answer (same step and per-image generator), for the image-reliance telemetry. Not with a cache.
    """
    assert noise is None or cache is None, "noised features must not share a cache with clean ones"
    names = [p["image"] for p in pairs]
    todo = [n for n in dict.fromkeys(names) if cache is None or n not in cache]
    new = {}
    if todo:
        w = model.model.vision_tower.embeddings.patch_embedding.weight
        pixels = [preprocess(load_image(os.path.join(image_root, n)), image_cfg) for n in todo]
        if noise is not None:
            t, seed, rnd = noise
            pixels = [noised_image(x, t, seed, n, rnd) for x, n in zip(pixels, todo)]
        pixels = torch.stack(pixels)
        new = dict(zip(todo, model.encode_images(pixels.to(w.device, w.dtype))))
        if cache is not None:
            cache.update(new)
    return torch.stack([new[n] if n in new else cache[n] for n in names])
