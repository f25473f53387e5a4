"""Local Hugging Face LLaVA directories <-> sena.model.Llava: config.json + single or sharded safetensors.

Reads the three key layouts found in the wild (legacy llava-hf, what transformers 5.x writes, in-memory names) and
writes exactly what transformers 5.24 writes, so `LlavaForConditionalGeneration.from_pretrained` loads our output.
Safetensors only: we never unpickle.
"""

import json
import os

import torch
from safetensors import SafetensorError, safe_open

from sena.cli import UserError
from sena.io import read_json, save_tensors
from sena.model import Llava, ModelConfig

# On-disk prefixes -> in-memory prefixes, first match wins. Covers legacy llava-hf (vision_tower.vision_model.*),
# what transformers 5.x save_pretrained writes (vision_tower.*, language_model.model.*) and in-memory names.
_FROM_DISK = [("language_model.lm_head.", "lm_head."), ("language_model.model.", "model.language_model."),
              ("vision_tower.vision_model.", "model.vision_tower."), ("vision_tower.", "model.vision_tower."),
              ("multi_modal_projector.", "model.multi_modal_projector."), ("model.", "model."),
              ("lm_head.", "lm_head.")]
# What transformers 5.24 save_pretrained writes (checked in tests): we write the same.
_TO_DISK = [("lm_head.", "language_model.lm_head."), ("model.language_model.", "language_model.model."),
            ("model.vision_tower.", "vision_tower."), ("model.multi_modal_projector.", "multi_modal_projector.")]
# Non-persistent buffers that older checkpoints sometimes hold; we recompute them.
_IGNORED_SUFFIXES = ("position_ids", "rotary_emb.inv_freq")


def _rename(key, table):
    for old, new in table:
        if key.startswith(old):
            return new + key[len(old):]
    return None


class ModelDirError(UserError):
    """A file of a model directory is missing or unreadable; the message names the file and the problem."""


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def _open_safetensors(fpath):
    """safe_open, with a truncated or otherwise broken file named (an interrupted download or copy, usually)."""
    try:
        return safe_open(fpath, framework="pt")
    except (SafetensorError, OSError) as e:
        raise ModelDirError(f"{fpath}: not a readable safetensors file ({e}); an interrupted download or copy?") \
            from None


def load_tokenizer(path, required=True):
    """transformers.AutoTokenizer from the directory's tokenizer files; None when it has none and none is required.
    A corrupt file is named; a set of files that does not load says which ones were there."""
    present = [n for n in TOKENIZER_FILES if os.path.isfile(os.path.join(path, n))]
    if not present:
        if required:
            raise ModelDirError(f"{path}: no tokenizer files (one of {', '.join(TOKENIZER_FILES)})")
        return None
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if os.path.isfile(os.path.join(path, name)):
            read_json(os.path.join(path, name))  # a broken JSON file is named, not reported as a tokenizer error
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as e:  # transformers raises many types here; each means these files define no tokenizer
        if "tokenizer.json" not in present:
            raise ModelDirError(f"{os.path.join(path, 'tokenizer.json')}: missing (the tokenizer files there, "
                                f"{', '.join(present)}, do not load without it)") from e
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ModelDirError(f"{path}: the tokenizer files ({', '.join(present)}) do not load: {first}") from e


def load_pretrained(path, dtype=torch.float32, device="cpu", need_tokenizer=False):
    """Load a local HF LLaVA directory -> (Llava, tokenizer or None, image_cfg dict).

    Reads config.json, model.safetensors or model.safetensors.index.json + shards (safetensors only),
    tokenizer files via transformers.AutoTokenizer if present (need_tokenizer: refuse a directory without),
    preprocessor_config.json (default_image_cfg if absent). Any of these missing or corrupt raises ModelDirError
    naming the file and the problem.
    """
    path = str(path)
    if not os.path.isdir(path):
        raise ModelDirError(f"{path}: no such model directory")
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise ModelDirError(f"{path}: no config.json (not a Hugging Face LLaVA directory)")
    hf_config = read_json(cfg_path)
    try:
        config = ModelConfig.from_hf_dict(hf_config)
    except ValueError as e:  # a LLaVA variant this model does not implement; the message names the field
        raise ModelDirError(f"{cfg_path}: {e}") from None
    except (KeyError, TypeError, AttributeError) as e:  # a field of the wrong type, e.g. text_config a list
        raise ModelDirError(f"{cfg_path}: a field is missing or of the wrong type ({type(e).__name__}: {e})") from None
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelDirError(f"{index}: no 'weight_map' of tensor names to shard files")
        files = sorted(set(weight_map.values()))
    elif os.path.isfile(os.path.join(path, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        pickles = [n for n in os.listdir(path) if n.endswith((".bin", ".pt", ".pth"))]
        raise ModelDirError(f"{path}: no model.safetensors or model.safetensors.index.json"
                            + (f" (found {pickles}: pickle checkpoints are not loaded; convert to safetensors)"
                               if pickles else ""))
    with torch.device("meta"):  # no memory for random weights we are about to replace
        model = Llava(config)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    tied = config.text.tie_word_embeddings
    state, unexpected = {}, []
    for name in files:
        fpath = os.path.join(path, name)
        if not os.path.isfile(fpath):
            raise ModelDirError(f"{path}: shard {name} named in model.safetensors.index.json is missing")
        with _open_safetensors(fpath) as f:
            for key in f.keys():
                new = _rename(key, _FROM_DISK)
                if new is None or new not in expected:
                    if not key.endswith(_IGNORED_SUFFIXES):
                        unexpected.append(f"{name}:{key}")
                    continue
                t = f.get_tensor(key)
                if t.shape != expected[new]:
                    raise ModelDirError(f"{fpath}: {key} has shape {tuple(t.shape)}, config.json implies "
                                        f"{tuple(expected[new])}")
                state[new] = t.to(device=device, dtype=dtype)
    if tied:
        state["lm_head.weight"] = state.get("model.language_model.embed_tokens.weight")
    missing = [k for k in expected if state.get(k) is None]
    if missing or unexpected:
        raise ModelDirError(f"{path} ({', '.join(files)}) does not match config.json: missing keys {missing[:20]}"
                            f"{' ...' if len(missing) > 20 else ''}; unexpected keys {unexpected[:20]}"
                            f"{' ...' if len(unexpected) > 20 else ''}")
    model.load_state_dict(state, strict=True, assign=True)
    if tied:  # assign=True gave lm_head its own Parameter object; share it again so training keeps them equal
        model.lm_head.weight = model.model.language_model.embed_tokens.weight
    tok = load_tokenizer(path, required=need_tokenizer)
    pp = os.path.join(path, "preprocessor_config.json")
    if os.path.isfile(pp):
        image_cfg = read_json(pp)
    else:
        from sena.image import default_image_cfg

        image_cfg = default_image_cfg(config.vision.image_size)
    return model, tok, image_cfg


def save_pretrained(model, out_dir, tokenizer=None, image_cfg=None, max_shard_bytes=None):
    """Write a HF LLaVA directory that transformers' LlavaForConditionalGeneration.from_pretrained loads.

    Keys use transformers 5.24's on-disk layout. max_shard_bytes: split into model-0000i-of-0000n.safetensors with
    model.safetensors.index.json. Old weight files in out_dir are removed first so loaders see one checkpoint.
    """
    os.makedirs(out_dir, exist_ok=True)
    for n in os.listdir(out_dir):
        if n.startswith("model") and (n.endswith(".safetensors") or n == "model.safetensors.index.json"):
            os.remove(os.path.join(out_dir, n))
    state = {}
    for k, v in model.state_dict().items():
        if k == "lm_head.weight" and model.config.text.tie_word_embeddings:
            continue  # tied: transformers re-ties from embed_tokens; safetensors refuses shared storage anyway
        state[_rename(k, _TO_DISK)] = v.detach().to("cpu").contiguous()
    shards, size = [{}], 0
    for k, v in state.items():
        nbytes = v.numel() * v.element_size()
        if max_shard_bytes and shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += nbytes
    if max_shard_bytes is None:
        save_tensors(shards[0], os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_tensors(shard, os.path.join(out_dir, name), metadata={"format": "pt"})
            weight_map |= {k: name for k in shard}
        total = sum(v.numel() * v.element_size() for v in state.values())
        with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    c = model.config
    dtype = str(next(iter(state.values())).dtype).removeprefix("torch.")
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(c.to_hf_dict() | {"dtype": dtype}, f, indent=2)
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": c.bos_token_id, "eos_token_id": c.eos_token_id, "pad_token_id": c.pad_token_id},
                  f, indent=2)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    if image_cfg is None:
        from sena.image import default_image_cfg

        image_cfg = default_image_cfg(c.vision.image_size)
    with open(os.path.join(out_dir, "preprocessor_config.json"), "w") as f:
        json.dump(image_cfg, f, indent=2)
