"""Batched decoding for Llava with a KV cache: greedy, or temperature / top-p sampling.

Prompts of different lengths are left-padded into one batch, so every row's next token sits in the last column.
Positions come from the attention mask (cumsum(mask) - 1), so a padded row sees the same positions and keys as
the same prompt alone: batched output equals per-sample output (tested). The image goes through the vision tower
once, at the prefill; each later step feeds one token per row and reuses the cached keys and values.
"""

import torch

from sena.model import KVCache


def sample_next(logits, do_sample=False, temperature=1.0, top_p=1.0, generator=None):
    """Next token per row from logits (B, V): argmax, or a draw from softmax(logits / temperature) on the top-p nucleus.

    The nucleus is the smallest set of most likely tokens whose probability reaches top_p (at least one token).
    """
    if not do_sample:
        return logits.argmax(-1)  # (B,)
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # (B, V)
    if top_p < 1.0:
        p_sorted, idx = probs.sort(dim=-1, descending=True)  # (B, V)
        # Drop a token when the tokens ranked above it already hold top_p; the first token always stays.
        drop = (p_sorted.cumsum(-1) - p_sorted) >= top_p
        probs = probs.scatter(-1, idx, p_sorted.masked_fill(drop, 0.0))
    return torch.multinomial(probs, 1, generator=generator)[:, 0]  # (B,)


@torch.no_grad()
def generate(model, input_ids, pixel_values=None, image_features=None, max_new_tokens=32, eos_token_id=None,
             pad_token_id=None, stop_strings=None, tokenizer=None, do_sample=False, temperature=1.0, top_p=1.0,
             generator=None):
    """Continue each prompt; returns the new tokens per prompt, without the EOS.

    input_ids: list of B token lists (image prompts hold n_image_tokens image tokens). pixel_values (n_img, 3, S, S)
    or image_features (n_img, N, D) (Llava.encode_images output) fill the image tokens in batch order, one image per
    image prompt. eos_token_id: int or list (default config.eos_token_id). pad_token_id: only fills the padding
    (default config.pad_token_id, else config.eos_token_id; it is masked out, so its value never matters).
    stop_strings: a row also stops once its decoded new text contains one of them (needs tokenizer); the tokens
    that complete the stop string are kept, as transformers does.
    """
    cfg = model.config
    eos = cfg.eos_token_id if eos_token_id is None else eos_token_id
    eos_ids = {eos} if isinstance(eos, int) else set(eos or [])
    if pad_token_id is None:
        pad_token_id = next((t for t in (cfg.pad_token_id, cfg.eos_token_id) if t is not None), 0)
    if not 0 <= pad_token_id < cfg.text.vocab_size:  # pads are masked out; any embeddable id will do
        pad_token_id = 0
    if stop_strings and tokenizer is None:
        raise ValueError("stop_strings need a tokenizer to decode the generated tokens")
    if isinstance(stop_strings, str):
        stop_strings = [stop_strings]
    B = len(input_ids)
    if B == 0 or max_new_tokens <= 0:
        return [[] for _ in range(B)]
    if min(len(p) for p in input_ids) == 0:
        raise ValueError("empty prompt: every prompt needs at least one token (e.g. BOS)")
    dev = model.model.language_model.embed_tokens.weight.device
    T = max(len(p) for p in input_ids)
    ids = torch.full((B, T), pad_token_id, dtype=torch.long)
    mask = torch.zeros(B, T, dtype=torch.long)
    for b, p in enumerate(input_ids):  # left padding: the last column is every row's last prompt token
        ids[b, T - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[b, T - len(p):] = 1
    ids, mask = ids.to(dev), mask.to(dev)
    if pixel_values is not None:
        image_features = model.encode_images(pixel_values.to(dev))  # (n_img, N, D), once per image
    cache = KVCache.new(model, B, T + max_new_tokens)
    logits = model(ids, attention_mask=mask, image_features=image_features, cache=cache, logits_slice=-1)  # (B,1,V)
    out, done = [[] for _ in range(B)], [False] * B
    for step in range(max_new_tokens):
        nxt = sample_next(logits[:, -1].float(), do_sample, temperature, top_p, generator)  # (B,)
        for b, tok in enumerate(nxt.tolist()):
            if done[b]:
                continue
            if tok in eos_ids:
                done[b] = True
                continue
            out[b].append(tok)
            if stop_strings and any(s in tokenizer.decode(out[b]) for s in stop_strings):
                done[b] = True
        if all(done) or step == max_new_tokens - 1:
            break
        # Finished rows keep decoding pad tokens (their output is ignored) so the batch stays rectangular.
        nxt = nxt.masked_fill(torch.tensor(done, device=dev), pad_token_id)
        mask = torch.cat([mask, mask.new_ones(B, 1)], dim=1)  # (B, T_past + 1)
        logits = model(nxt[:, None], attention_mask=mask, cache=cache)  # (B, 1, V)
    return out
