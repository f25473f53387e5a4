"""Batched decoding for Llava with a KV cache: greedy, or temperature / top-p sampling.

Prompts of different lengths are left-padded into one batch, so every row's next token sits in the last column.
Positions come from the attention mask (cumsum(mask) - 1), so a padded row sees the same positions and keys as
the same prompt alone: batched output equals per-sample output (tested). The image goes through the vision tower
once, at the prefill (whose last layer runs only at the last column, the one whose logits are read); each later
step feeds one token per row and reuses the cached keys and values.

Three savings on top of batching (all exact: every row sees the same tokens, keys and positions as alone):
- shared prefix: the tokens every prompt starts with (the system text, and the image block when rows show the same
  image) are run once per distinct image, their keys and values copied to the rows that share them; rows are laid
  out [shared prefix | left padding | own suffix], positions still cumsum(mask) - 1;
- finished rows leave the batch: once a quarter of the running rows have stopped, the cache is compacted to the
  rest, so a batch of short answers does not pay for its longest one (amortised: at most ~log_{4/3} B copies);
- across calls (prefix_cache): a round's stages all start with the same system text and image, so their keys and
  values are kept per image and each later prompt prefills only its own words.
"""

import hashlib

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


def shared_prefix(input_ids, image_features, n_image_tokens, image_token_id):
    """How much of the prompts to prefill once: (P0, S, group), group[b] the prefix group of row b.

    P0 is the longest common token prefix, leaving each row at least one token of its own. Its first S tokens (the
    text before the first image token, S = P0 if it holds none) are the same for every row and run once. Tokens
    [S, P0) hold a whole image block when every row shows exactly one image; they run once per distinct image
    (rows grouped by equal features). A prefix that would cut an image block stops before it (P0 = S).
    """
    B, n_min = len(input_ids), min(len(p) for p in input_ids)
    P0 = 0
    while P0 < n_min - 1 and all(p[P0] == input_ids[0][P0] for p in input_ids):
        P0 += 1
    if image_token_id not in input_ids[0][:P0]:
        return P0, P0, [0] * B
    S = input_ids[0].index(image_token_id)
    one_image = image_features is not None and image_features.shape[0] == B and all(
        p.count(image_token_id) == n_image_tokens for p in input_ids)
    if not one_image or S + n_image_tokens > P0 or any(t != image_token_id for t in input_ids[0][S:S + n_image_tokens]):
        return S, S, [0] * B
    # Group rows by identical features: a cheap fingerprint first, torch.equal to confirm.
    flat = image_features.reshape(B, -1)
    keys = torch.stack([flat.float().sum(-1), flat[:, ::97].float().sum(-1)], -1).tolist()
    reps, group = [], []
    for b in range(B):
        g = next((j for j, r in enumerate(reps) if keys[r] == keys[b] and torch.equal(flat[r], flat[b])), None)
        if g is None:
            reps.append(b)
            g = len(reps) - 1
        group.append(g)
    return P0, S, group


def prefill_prefix(model, input_ids, image_features, P0, S, group, prefix_cache=None):
    """Keys and values of the shared prefix [0, P0), one row per prefix group: a KVCache (U, n_kv, P0, hs).

    [0, S) is the common text, run once; [S, E) the image block (E = S + n_image_tokens), run once per distinct
    image; [E, P0) the common text after it, per group. prefix_cache: a dict the caller keeps across calls; the
    text part and each image's [0, E) part are stored in it under (tokens, image digest) and reused, so the stages
    of a round (which all start with the same system text and image) compute them once per round. It holds
    n_images x E positions of keys and values: small for tiny models, gigabytes for a 7B one.
    """
    dev = model.model.language_model.embed_tokens.weight.device
    reps = [group.index(g) for g in range(max(group) + 1)]  # first row of each prefix group
    pre = KVCache.new(model, len(reps), P0)

    def run(ids, cache, feats=None):  # only the cache is wanted
        return model.hidden_states(torch.tensor(ids, device=dev), image_features=feats, cache=cache,
                                   keep_from=len(ids[0]) - 1)

    if S > 0:  # the common text
        key = ("text", tuple(input_ids[0][:S]))
        kv = None if prefix_cache is None else prefix_cache.get(key)
        if kv is None:
            one = KVCache.new(model, 1, S)
            run([input_ids[0][:S]], one)
            kv = (one.k, one.v)
            if prefix_cache is not None:
                prefix_cache[key] = kv
        for i in range(len(pre.k)):
            pre.k[i][:, :, :S], pre.v[i][:, :, :S] = kv[0][i], kv[1][i]
        pre.length = S
    if P0 == S:
        return pre
    if prefix_cache is None:  # the image block and the text after it, once per distinct image
        run([input_ids[r][S:P0] for r in reps], pre, image_features[reps])
        return pre
    E = S + model.config.n_image_tokens
    keys = [(tuple(input_ids[r][:E]), digest(image_features[r])) for r in reps]
    missing = [u for u, key in enumerate(keys) if key not in prefix_cache]
    if missing:
        part = KVCache.new(model, len(missing), E)
        for i in range(len(part.k)):
            part.k[i][:, :, :S], part.v[i][:, :, :S] = pre.k[i][:1, :, :S], pre.v[i][:1, :, :S]
        part.length = S
        run([input_ids[reps[u]][S:E] for u in missing], part, image_features[[reps[u] for u in missing]])
        for j, u in enumerate(missing):
            prefix_cache[keys[u]] = ([k[j : j + 1].clone() for k in part.k], [v[j : j + 1].clone() for v in part.v])
    for u, key in enumerate(keys):
        k_list, v_list = prefix_cache[key]
        for i in range(len(pre.k)):
            pre.k[i][u : u + 1, :, :E], pre.v[i][u : u + 1, :, :E] = k_list[i], v_list[i]
    pre.length = E
    if P0 > E:
        run([input_ids[r][E:P0] for r in reps], pre)
    return pre


def digest(t):
    """A content key for one image's features (exact: any changed bit changes it)."""
    return hashlib.blake2b(t.detach().float().cpu().numpy().tobytes(), digest_size=16).hexdigest()


def select_rows(cache, rows):
    """Keep only the given batch rows of a KVCache (in place). rows: (B',) long tensor."""
    cache.k = [k.index_select(0, rows) for k in cache.k]
    cache.v = [v.index_select(0, rows) for v in cache.v]


@torch.no_grad()
def generate(model, input_ids, pixel_values=None, image_features=None, max_new_tokens=32, eos_token_id=None,
             pad_token_id=None, stop_strings=None, tokenizer=None, do_sample=False, temperature=1.0, top_p=1.0,
             generator=None, share_prefix=True, compact=True, prefix_cache=None):
    """Continue each prompt; returns the new tokens per prompt, without the EOS.

    input_ids: list of B token lists (image prompts hold n_image_tokens image tokens). pixel_values (n_img, 3, S, S)
    or image_features (n_img, N, D) (Llava.encode_images output) fill the image tokens in batch order, one image per
    image prompt. eos_token_id: int or list (default config.eos_token_id). pad_token_id: only fills the padding
    (default config.pad_token_id, else config.eos_token_id; it is masked out, so its value never matters).
    stop_strings: a row also stops once its decoded new text contains one of them (needs tokenizer); the tokens
    that complete the stop string are kept, as transformers does. share_prefix / compact: the two savings of the
    module docstring (off = the plain left-padded batch; the tests and benchmarks compare both). prefix_cache: a dict
    kept across calls to reuse the system text's and each image's keys and values (see prefill_prefix).
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
    if pixel_values is not None:
        image_features = model.encode_images(pixel_values.to(dev))  # (n_img, N, D), once per image
    P0, S, group = 0, 0, [0] * B
    if share_prefix:
        P0, S, group = shared_prefix(input_ids, image_features, cfg.n_image_tokens, cfg.image_token_index)
    T = max(len(p) for p in input_ids) - P0  # suffix columns
    ids = torch.full((B, T), pad_token_id, dtype=torch.long)
    mask = torch.zeros(B, P0 + T, dtype=torch.long)
    mask[:, :P0] = 1
    for b, p in enumerate(input_ids):  # left padding of the suffixes: the last column is every row's last token
        ids[b, T - len(p) + P0:] = torch.tensor(p[P0:], dtype=torch.long)
        mask[b, P0 + T - len(p) + P0:] = 1
    ids, mask = ids.to(dev), mask.to(dev)
    cache = KVCache.new(model, B, P0 + T + max_new_tokens)
    feats = image_features
    if P0 > 0:
        pre = prefill_prefix(model, input_ids, feats, P0, S, group, prefix_cache)
        if P0 > S:
            feats = None  # every row's image is in the prefix; none is left for the suffixes
        rows = torch.tensor(group, device=dev)
        for i in range(len(cache.k)):
            cache.k[i][:, :, :P0], cache.v[i][:, :, :P0] = pre.k[i][rows], pre.v[i][rows]
        cache.length = P0
    # Only the last column's logits are read: the last layer runs its queries and MLP there alone (keep_from).
    h = model.hidden_states(ids, attention_mask=mask, image_features=feats, cache=cache, keep_from=T - 1)  # (B,1,D)
    logits = model.lm_head(h)  # (B, 1, V)
    out, done = [[] for _ in range(B)], [False] * B
    active = list(range(B))  # original index of each row still in the batch
    for step in range(max_new_tokens):
        nxt = sample_next(logits[:, -1].float(), do_sample, temperature, top_p, generator)  # (B',)
        for j, tok in enumerate(nxt.tolist()):
            b = active[j]
            if done[b]:
                continue
            if tok in eos_ids:
                done[b] = True
                continue
            out[b].append(tok)
            if stop_strings and any(s in tokenizer.decode(out[b]) for s in stop_strings):
                done[b] = True
        n_done = sum(done[b] for b in active)
        if n_done == len(active) or step == max_new_tokens - 1:
            break
        if compact and 4 * n_done >= len(active):  # compact: drop the finished rows from the cache and the mask
            keep = [j for j, b in enumerate(active) if not done[b]]
            rows = torch.tensor(keep, device=dev)
            select_rows(cache, rows)
            mask, nxt = mask[rows], nxt[rows]
            active = [active[j] for j in keep]
        # Finished rows not yet compacted keep decoding pads (output ignored) so the batch stays rectangular.
        nxt = nxt.masked_fill(torch.tensor([done[b] for b in active], device=dev), pad_token_id)
        mask = torch.cat([mask, mask.new_ones(len(active), 1)], dim=1)  # (B', T_past + 1)
        logits = model(nxt[:, None], attention_mask=mask, cache=cache)  # (B', 1, V)
    return out
