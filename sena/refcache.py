"""Reference log-probs, computed once per round by θ(k-1) and stored beside the pairs.

No reference model is held in memory while training. The cache carries a key made of the pairs file's hash and
the reference weights' hash; training refuses a cache whose key does not match what it is about to train on.
"""

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from tqdm import tqdm

from sena.batch import pair_batch, pair_features, pair_logps, tokenize_pair
from sena.cli import UserError
from sena.io import save_tensors, sha256_file, sha256_weights

FIELDS = ("ref_chosen_logps", "ref_rejected_logps", "ref_chosen_mean_logps", "ref_rejected_mean_logps")


def cache_key(pairs_path, ref_model_dir, precision="float32"):
    """What the cached log-probs are a function of: the pairs, the reference weights, and the precision they were
    scored in (train.py: "float32" on CPU, "<weights dtype>+autocast" on CUDA), so that a cache scored in bf16 for a
    LoRA run is not reused by a --full-ft run, whose step 0 would then not be ln 2."""
    return f"pairs:{sha256_file(pairs_path)}|ref:{sha256_weights(ref_model_dir)}|precision:{precision}"


@torch.no_grad()
def reference_logps(model, tok, image_cfg, pairs, image_root, batch_size=16, device="cpu", autocast_dtype=None,
                    noise=None):
    """Summed and mean log-probs of every pair's chosen and rejected answer under `model`: dict of (N,) fp32.

    One shared-prefix forward per pair (sena.batch.pair_logps); the pairs of one image sit next to each other in
    pairs.jsonl, so a batch encodes each of its images once (pair_features). noise: (t, seed, round) scores the
    answers given the noised image instead (pair_features), for sena.telemetry.
    """
    model.eval()
    out = {f: [] for f in FIELDS}
    for s in tqdm(range(0, len(pairs), batch_size), desc="reference", leave=False, disable=None):
        chunk = pairs[s : s + batch_size]
        batch = {k: v.to(device) for k, v in pair_batch([tokenize_pair(tok, model.config, p) for p in chunk],
                                                         tok.pad_token_id).items()}
        with torch.autocast(device_type=device.split(":")[0], dtype=autocast_dtype, enabled=autocast_dtype is not None):
            values = pair_logps(model, batch, pair_features(model, chunk, image_root, image_cfg, noise=noise))
        for f, v in zip(FIELDS, values):
            out[f].append(v.float().cpu())
    return {f: torch.cat(v) for f, v in out.items()}


def save_reference(path, values, key):
    save_tensors({f: values[f].contiguous() for f in FIELDS}, path, metadata={"key": key})


def cache_problem(path):
    """Why the cache file at path cannot be read ('' if it can): truncated, empty, or missing a field."""
    try:
        values = load_file(path)
    except (SafetensorError, OSError) as e:
        return f"not a readable safetensors file: {e}"
    missing = [f for f in FIELDS if f not in values]
    return f"no {', '.join(missing)}" if missing else ""


def load_reference(path, key):
    """The cached values; raises UserError naming the file when its key differs from `key`."""
    with safe_open(path, "pt") as f:
        found = (f.metadata() or {}).get("key")
    if found != key:
        parts = dict(p.split(":", 1) for p in (found or "").split("|") if ":" in p)
        names = {"pairs": "the pairs", "ref": "the reference weights", "precision": "the precision"}
        changed = [names[k] for k, v in (p.split(":", 1) for p in key.split("|")) if parts.get(k) != v]
        raise UserError(f"{path}: reference cache key does not match ({' and '.join(changed)} changed since it was "
                        "scored); delete the file to recompute it")
    return load_file(path)
