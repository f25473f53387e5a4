"""LoRA adapters as plain nn.Modules, saved and loaded in PEFT's format.

LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", arXiv 2106.09685) keeps the pretrained
weight W₀ (out, in) frozen and learns a low-rank update:

    y = W₀x + b + (α/r)·B·A·dropout(x)        A: (r, in) kaiming-uniform,  B: (out, r) zeros

so at initialisation the adapted model equals the base model exactly. The reference policy of DPO is the same model
with adapters switched off (`lora_disabled`), and the next SENA round starts from the merged model
(`merge_lora`: W ← W₀ + (α/r)·B·A).

Module paths copy PEFT's: the wrapped layer stays reachable as `<path>.base_layer` and the factors are
`<path>.lora_A` / `<path>.lora_B`. Adapters are written as `adapter_config.json` + `adapter_model.safetensors`
with keys `base_model.model.<path>.lora_A.weight`, so `peft.PeftModel.from_pretrained` loads ours on transformers'
LlavaForConditionalGeneration (same module paths as sena.model.Llava) and `load_adapter` loads PEFT's.
"""

import contextlib
import json
import math
import os
import re
from dataclasses import dataclass

import torch
import torch.nn as nn
from safetensors.torch import load_file

from sena.io import save_tensors

PEFT_PREFIX = "base_model.model."
LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class LoRAConfig:
    """LoRA settings; `apply_lora(model, **dataclasses.asdict(cfg))`. Defaults follow LLaVA-1.5's LoRA recipe."""

    target_modules: tuple = LLAMA_TARGETS
    r: int = 128
    alpha: float = 256
    dropout: float = 0.05
    include: str | None = "language_model"


class LoRALinear(nn.Module):
    """y = base_layer(x) + (α/r)·lora_B(lora_A(dropout(x))); with `disabled` set, y = base_layer(x).

    The LoRA factors live in fp32 when the base weight is bf16/fp16 (master weights stay fp32, as PEFT does);
    the LoRA branch runs in their dtype (or the autocast dtype) and is cast back to the base output's dtype.
    """

    def __init__(self, base_layer: nn.Linear, r: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.base_layer = base_layer
        self.r, self.alpha, self.dropout_p = r, alpha, dropout
        self.scaling = alpha / r
        w = base_layer.weight
        dtype = w.dtype if w.dtype in (torch.float32, torch.float64) else torch.float32
        self.lora_A = nn.Linear(base_layer.in_features, r, bias=False, device=w.device, dtype=dtype)  # (r, in)
        self.lora_B = nn.Linear(r, base_layer.out_features, bias=False, device=w.device, dtype=dtype)  # (out, r)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.disabled = False
        # Same init as PEFT: A like nn.Linear's default, B = 0 so the adapter starts as the identity.
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x):
        out = self.base_layer(x)
        if self.disabled:
            return out
        z = self.lora_dropout(x).to(self.lora_A.weight.dtype)
        # α/r scales the r-wide inner activation, not the out-wide result: same math, one full-width multiply
        # fewer in the forward and in the backward.
        return out + self.lora_B(self.lora_A(z) * self.scaling).to(out.dtype)

    def extra_repr(self):
        return f"r={self.r}, alpha={self.alpha}, dropout={self.dropout_p}"


def _set_module(model, name, module):
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def lora_modules(model):
    """[(path, LoRALinear)] in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def _wrap(model, names, r, alpha, dropout):
    # Freeze everything first: after wrapping, only the LoRA factors train.
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        module = model.get_submodule(name)
        if not isinstance(module, LoRALinear):
            _set_module(model, name, LoRALinear(module, r, alpha, dropout))
    for _, m in lora_modules(model):
        m.lora_A.weight.requires_grad_(True)
        m.lora_B.weight.requires_grad_(True)


def apply_lora(model, target_modules, r, alpha, dropout=0.0, include="language_model", exclude=()):
    """Wrap every nn.Linear whose path ends in one of `target_modules` (e.g. "q_proj") with a LoRALinear.

    target_modules: list of last path components (or longer dotted suffixes), PEFT-style: path == t or
                    path.endswith("." + t).
    include: only wrap paths containing this string (default: the language model, so the CLIP tower's
             q_proj/v_proj are left alone); None wraps anywhere.
    exclude: paths containing any of these strings are skipped.
    Freezes every other parameter (requires_grad=False) and returns the list of wrapped paths.
    """
    names = []
    for name, module in model.named_modules():
        if type(module) is not nn.Linear:
            continue
        if not any(name == t or name.endswith("." + t) for t in target_modules):
            continue
        if (include is not None and include not in name) or any(e in name for e in exclude):
            continue
        names.append(name)
    if not names:
        raise ValueError(f"no nn.Linear matches target_modules={list(target_modules)} with include={include!r}")
    _wrap(model, names, r, alpha, dropout)
    return names


def lora_parameters(model):
    """The LoRA factors, for the optimizer."""
    return [p for _, m in lora_modules(model) for p in (m.lora_A.weight, m.lora_B.weight)]


@contextlib.contextmanager
def lora_disabled(model):
    """Within the block the model is its base (adapters off): the DPO reference without a second copy."""
    saved = [(m, m.disabled) for _, m in lora_modules(model)]
    try:
        for m, _ in saved:
            m.disabled = True
        yield model
    finally:
        for m, flag in saved:
            m.disabled = flag


@torch.no_grad()
def merge_lora(model):
    """Fold every adapter into its base weight, W ← W₀ + (α/r)·B·A, and put the plain nn.Linear back.

    The product is formed in at least fp32, then cast to the base weight's dtype. requires_grad flags of the base
    weights are left as they were (frozen after apply_lora). Returns the list of merged paths.
    """
    merged = []
    for name, m in lora_modules(model):
        w = m.base_layer.weight
        dtype = torch.promote_types(w.dtype, torch.float32)
        delta = m.scaling * (m.lora_B.weight.to(dtype) @ m.lora_A.weight.to(dtype))  # (out, in)
        w.copy_((w.to(dtype) + delta).to(w.dtype))
        _set_module(model, name, m.base_layer)
        merged.append(name)
    return merged


def lora_state_dict(model):
    """{"base_model.model.<path>.lora_A.weight": (r, in), "...lora_B.weight": (out, r)}: PEFT's saved key names.

    The tensors are detached views of the live parameters, not copies: clone them to keep a snapshot.
    """
    sd = {}
    for name, m in lora_modules(model):
        sd[f"{PEFT_PREFIX}{name}.lora_A.weight"] = m.lora_A.weight.detach()
        sd[f"{PEFT_PREFIX}{name}.lora_B.weight"] = m.lora_B.weight.detach()
    return sd


def _peft_target_modules(model, wrapped):
    """A regex PEFT full-matches against module paths, if one picks out exactly `wrapped`; else the path list."""
    lora_inner = (".base_layer", ".lora_A", ".lora_B", ".lora_dropout")
    paths = [n for n, _ in model.named_modules() if n and not any(s in n for s in lora_inner)]
    suffixes = sorted({n.rsplit(".", 1)[-1] for n in wrapped})
    common = [p for p in ("language_model",) if all(p in n for n in wrapped)]
    pattern = (rf".*{common[0]}.*" if common else ".*") + rf"\.({'|'.join(map(re.escape, suffixes))})"
    if sorted(p for p in paths if re.fullmatch(pattern, p)) == sorted(wrapped):
        return pattern
    return sorted(wrapped)


def save_adapter(model, out_dir, base_model_path=None):
    """Write adapter_config.json + adapter_model.safetensors that peft.PeftModel.from_pretrained can load."""
    mods = lora_modules(model)
    if not mods:
        raise ValueError("model has no LoRA adapters")
    settings = {(m.r, m.alpha, m.dropout_p) for _, m in mods}
    if len(settings) != 1:
        raise ValueError(f"save_adapter expects one (r, alpha, dropout) for all adapters, got {settings}")
    r, alpha, dropout = settings.pop()
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": None if base_model_path is None else str(base_model_path),
        "revision": None,
        "inference_mode": True,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "target_modules": _peft_target_modules(model, [n for n, _ in mods]),
        "exclude_modules": None,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "lora_bias": False,
    }
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    tensors = {k: v.cpu().contiguous() for k, v in lora_state_dict(model).items()}
    save_tensors(tensors, os.path.join(out_dir, "adapter_model.safetensors"), metadata={"format": "pt"})


# Adapters trained by PEFT on transformers 4.x llava-hf models name the LLM path the old way.
_LEGACY_PATHS = (("language_model.model.", "model.language_model."), ("language_model.lm_head", "lm_head"))


def _resolve_path(model, path):
    candidates = [path] + [new + path[len(old) :] for old, new in _LEGACY_PATHS if path.startswith(old)]
    for p in candidates:
        try:
            model.get_submodule(p)
            return p
        except AttributeError:
            continue
    raise KeyError(f"adapter module {path!r} not found in the model")


def load_adapter(model, adapter_dir):
    """Load a PEFT LoRA adapter directory (ours or PEFT's) into `model`, wrapping the named layers if needed.

    The wrapped layers are exactly those named in adapter_model.safetensors; r, lora_alpha and lora_dropout come
    from adapter_config.json. Freezes all other parameters like apply_lora. Returns the list of adapted paths.
    """
    with open(os.path.join(adapter_dir, "adapter_config.json")) as f:
        config = json.load(f)
    unsupported = [k for k in ("use_dora", "use_rslora", "rank_pattern", "alpha_pattern") if config.get(k)]
    if config.get("peft_type", "LORA") != "LORA" or unsupported or config.get("bias", "none") != "none":
        raise NotImplementedError(f"only plain LoRA adapters are supported (got {unsupported or config['peft_type']})")
    sd = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
    weights = {}  # path -> {"lora_A": tensor, "lora_B": tensor}
    for key, tensor in sd.items():
        m = re.fullmatch(rf"{re.escape(PEFT_PREFIX)}(.+)\.(lora_[AB])(?:\.[^.]+)?\.weight", key)
        if m is None:
            raise KeyError(f"unexpected key in adapter: {key}")
        weights.setdefault(_resolve_path(model, m.group(1)), {})[m.group(2)] = tensor
    _wrap(model, list(weights), config["r"], config["lora_alpha"], config.get("lora_dropout", 0.0))
    with torch.no_grad():
        for path, ab in weights.items():
            module = model.get_submodule(path)
            for which in ("lora_A", "lora_B"):
                param = getattr(module, which).weight
                if which not in ab or ab[which].shape != param.shape:
                    raise ValueError(f"{path}.{which}: expected shape {tuple(param.shape)}")
                param.copy_(ab[which])
    return list(weights)
