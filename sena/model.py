"""LLaVA-1.5 in plain PyTorch: CLIP ViT vision tower -> 2-layer GELU MLP projector -> Llama decoder.

The module tree mirrors transformers 5.x `LlavaForConditionalGeneration` in memory, so our state_dict keys equal
theirs (`model.vision_tower.*`, `model.multi_modal_projector.*`, `model.language_model.*`, `lm_head`) and PEFT
adapter keys line up. The image path (the "default" LLaVA-1.5 strategy):

    h_0 = pre_layrnorm([cls; conv_p(x)] + pos)            (B, 1+N, Dv),  N = (image_size / patch_size)^2
    h_l = h_{l-1} + attn(ln1(h_{l-1})); h_l += mlp(ln2(h_l))          quick_gelu MLP
    f   = linear_2(gelu(linear_1(h_L'[:, 1:])))            (B, N, D),  L' from vision_feature_layer (-2: L-1)

The text path is Llama: RMSNorm, rotary positions, grouped-query attention, SwiGLU. Image tokens in input_ids
(image_token_index, n_image_tokens copies per image, as transformers 5.x expects) are replaced by f in order.
Checkpoints are safetensors only; we never unpickle.
"""

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint


@dataclass
class VisionConfig:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    image_size: int
    patch_size: int
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"


@dataclass
class TextConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    head_dim: int | None = None  # None -> hidden_size // num_attention_heads (the Llama default)


# Defaults of transformers' CLIPVisionConfig as LlavaConfig fills them, and of LlamaConfig: real llava-hf
# configs omit every field that equals a default, so reading them needs these.
_VISION_DEFAULTS = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                        image_size=336, patch_size=14, layer_norm_eps=1e-5, hidden_act="quick_gelu")
_CLIP_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                      image_size=224, patch_size=32, layer_norm_eps=1e-5, hidden_act="quick_gelu")
_LLAMA_DEFAULTS = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, rms_norm_eps=1e-6, max_position_embeddings=2048)


@dataclass
class ModelConfig:
    vision: VisionConfig
    text: TextConfig
    image_token_index: int
    vision_feature_layer: int = -2
    vision_feature_select_strategy: str = "default"  # "default" drops CLS (LLaVA-1.5); "full" keeps it
    projector_hidden_act: str = "gelu"
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2

    @property
    def first_image_feature(self) -> int:
        """Index of the first vision hidden state LLaVA reads: 1 drops CLS ("default"), 0 keeps it ("full")."""
        return 0 if self.vision_feature_select_strategy == "full" else 1

    @property
    def n_image_tokens(self) -> int:
        return (self.vision.image_size // self.vision.patch_size) ** 2 + 1 - self.first_image_feature

    def to_hf_dict(self) -> dict:
        """A transformers LlavaConfig dict (what config.json holds)."""
        v, t = self.vision, self.text
        text = {k: getattr(t, k) for k in _LLAMA_DEFAULTS} | dict(
            model_type="llama", num_key_value_heads=t.num_key_value_heads, head_dim=t.head_dim or
            t.hidden_size // t.num_attention_heads, hidden_act="silu", attention_bias=False, mlp_bias=False,
            rope_parameters={"rope_theta": t.rope_theta, "rope_type": "default"}, rope_theta=t.rope_theta,
            tie_word_embeddings=t.tie_word_embeddings, pad_token_id=self.pad_token_id,
            bos_token_id=self.bos_token_id, eos_token_id=self.eos_token_id)
        vision = asdict(v) | dict(model_type="clip_vision_model", num_channels=3)
        return dict(architectures=["LlavaForConditionalGeneration"], model_type="llava",
                    image_token_index=self.image_token_index, image_seq_length=self.n_image_tokens,
                    projector_hidden_act=self.projector_hidden_act, vision_feature_layer=self.vision_feature_layer,
                    vision_feature_select_strategy=self.vision_feature_select_strategy, multimodal_projector_bias=True,
                    tie_word_embeddings=t.tie_word_embeddings, pad_token_id=self.pad_token_id,
                    text_config=text, vision_config=vision)

    @classmethod
    def from_hf_dict(cls, d: dict) -> "ModelConfig":
        """Read a transformers LlavaConfig dict (4.x or 5.x); refuse variants this model does not implement."""
        vd = _VISION_DEFAULTS if d.get("vision_config") is None else _CLIP_DEFAULTS | d["vision_config"]
        td = _LLAMA_DEFAULTS | (d.get("text_config") or {})
        rope = td.get("rope_parameters") or td.get("rope_scaling") or {}  # 5.x name, then 4.x name
        strategy = d.get("vision_feature_select_strategy", "default")
        if strategy not in ("default", "full"):
            raise ValueError(f"unsupported LLaVA config: vision_feature_select_strategy={strategy!r} (this model "
                             "implements 'default' and 'full')")
        checks = {"multimodal_projector_bias": (d.get("multimodal_projector_bias", True), True),
                  "text model_type": (td.get("model_type", "llama"), "llama"),
                  "text hidden_act": (td.get("hidden_act", "silu"), "silu"),
                  "attention_bias": (td.get("attention_bias", False), False),
                  "mlp_bias": (td.get("mlp_bias", False), False),
                  "rope_type": (rope.get("rope_type", rope.get("type")) or "default", "default")}
        for name, (got, want) in checks.items():
            if got != want:
                raise ValueError(f"unsupported LLaVA config: {name}={got!r} (this model implements {want!r})")
        if not isinstance(d.get("vision_feature_layer", -2), int):
            raise ValueError("unsupported LLaVA config: vision_feature_layer must be one int")
        rope_theta = rope.get("rope_theta", td.get("rope_theta", 10000.0))
        head_dim = td.get("head_dim")  # kept only when it is not the default hidden // heads
        tie = bool(d.get("tie_word_embeddings") or td.get("tie_word_embeddings"))
        text = TextConfig(**{k: td[k] for k in _LLAMA_DEFAULTS}, num_key_value_heads=td.get("num_key_value_heads")
                          or td["num_attention_heads"], rope_theta=float(rope_theta), tie_word_embeddings=tie,
                          head_dim=None if head_dim == td["hidden_size"] // td["num_attention_heads"] else head_dim)
        pick = lambda k, default: td[k] if td.get(k) is not None else d.get(k, default)  # noqa: E731
        return cls(VisionConfig(**{k: vd[k] for k in _CLIP_DEFAULTS}), text,
                   image_token_index=d.get("image_token_index", d.get("image_token_id", 32000)),
                   vision_feature_layer=d.get("vision_feature_layer", -2), vision_feature_select_strategy=strategy,
                   projector_hidden_act=d.get("projector_hidden_act", "gelu"), pad_token_id=pick("pad_token_id", None),
                   bos_token_id=pick("bos_token_id", 1), eos_token_id=pick("eos_token_id", 2))


ACT = {"quick_gelu": lambda x: x * torch.sigmoid(1.702 * x), "gelu": F.gelu, "silu": F.silu,
       "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


# ----------------------------------------------------------------------------------------------- vision tower
class VisionEmbeddings(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.zeros(c.hidden_size))
        self.patch_embedding = nn.Conv2d(3, c.hidden_size, c.patch_size, stride=c.patch_size, bias=False)
        self.position_embedding = nn.Embedding((c.image_size // c.patch_size) ** 2 + 1, c.hidden_size)

    def forward(self, pixel_values):
        B = pixel_values.shape[0]
        x = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))  # (B, D, g, g)
        x = x.flatten(2).transpose(1, 2)  # (B, N, D), patches in row-major order
        cls = self.class_embedding.expand(B, 1, -1)  # (B, 1, D)
        return torch.cat([cls, x], dim=1) + self.position_embedding.weight  # (B, 1+N, D)


class VisionAttention(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.n_head = c.num_attention_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(c.hidden_size, c.hidden_size)
                                                                for _ in range(4))

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = (p(x).view(B, T, self.n_head, D // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        y = F.scaled_dot_product_attention(q, k, v)  # full (bidirectional) attention over patches
        return self.out_proj(y.transpose(1, 2).reshape(B, T, D))  # (B, T, D)


class VisionMLP(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.act = ACT[c.hidden_act]
        self.fc1, self.fc2 = nn.Linear(c.hidden_size, c.intermediate_size), nn.Linear(c.intermediate_size,
                                                                                        c.hidden_size)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class VisionLayer(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.self_attn, self.mlp = VisionAttention(c), VisionMLP(c)
        self.layer_norm1 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.layer_norm2 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class VisionEncoder(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(VisionLayer(c) for _ in range(c.num_hidden_layers))


class VisionTower(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.embeddings = VisionEmbeddings(c)
        self.pre_layrnorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)  # sic: CLIP's spelling
        self.encoder = VisionEncoder(c)
        # Unused by LLaVA (it reads an inner layer) but part of the checkpoint, so kept for 1:1 keys.
        self.post_layernorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, pixel_values, n_layers):
        """Hidden states after n_layers encoder layers = transformers' hidden_states[n_layers]. (B, 1+N, D)"""
        x = self.pre_layrnorm(self.embeddings(pixel_values))
        for layer in self.encoder.layers[:n_layers]:
            x = layer(x)
        return x


class Projector(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.act = ACT[c.projector_hidden_act]
        self.linear_1 = nn.Linear(c.vision.hidden_size, c.text.hidden_size)
        self.linear_2 = nn.Linear(c.text.hidden_size, c.text.hidden_size)

    def forward(self, x):
        return self.linear_2(self.act(self.linear_1(x)))


# ----------------------------------------------------------------------------------------------- language model
class RMSNorm(nn.Module):
    """y = w * x / sqrt(mean(x^2) + eps), the statistic in fp32 as Llama does (bf16 squares lose precision)."""

    def __init__(self, dim, eps):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(dim)), eps

    def forward(self, x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope(x, cos, sin):
    """Rotary embedding, Llama's half-split layout: x*cos + [-x2, x1]*sin. x (B, nh, T, hs), cos/sin (B, 1, T, hs)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class KVCache:
    """Preallocated keys/values per layer, k[i] and v[i] of shape (B, n_kv, T_max, hs); .length positions filled.

    Llava.forward writes the new keys at [length, length+T) of every layer and then advances length by T.
    """

    def __init__(self, k, v):
        self.k, self.v, self.length = k, v, 0

    @classmethod
    def new(cls, model, batch, max_len, dtype=None, device=None):
        t = model.config.text
        w = model.model.language_model.embed_tokens.weight
        shape = (batch, t.num_key_value_heads, max_len, t.head_dim or t.hidden_size // t.num_attention_heads)
        mk = lambda: torch.zeros(shape, dtype=dtype or w.dtype, device=device or w.device)  # noqa: E731
        return cls([mk() for _ in range(t.num_hidden_layers)], [mk() for _ in range(t.num_hidden_layers)])

    @property
    def max_len(self):
        return self.k[0].shape[2]

    def update(self, i, k, v):
        """Store layer i's new k, v (B, n_kv, T, hs); return all keys/values so far (B, n_kv, length+T, hs)."""
        s, e = self.length, self.length + k.shape[2]
        self.k[i][:, :, s:e], self.v[i][:, :, s:e] = k, v
        return self.k[i][:, :, :e], self.v[i][:, :, :e]


class Attention(nn.Module):
    def __init__(self, c: TextConfig):
        super().__init__()
        self.n_head, self.n_kv = c.num_attention_heads, c.num_key_value_heads
        self.hs = c.head_dim or c.hidden_size // c.num_attention_heads
        self.q_proj = nn.Linear(c.hidden_size, self.n_head * self.hs, bias=False)
        self.k_proj = nn.Linear(c.hidden_size, self.n_kv * self.hs, bias=False)
        self.v_proj = nn.Linear(c.hidden_size, self.n_kv * self.hs, bias=False)
        self.o_proj = nn.Linear(self.n_head * self.hs, c.hidden_size, bias=False)

    def forward(self, x, cos, sin, mask, cache, i, q_from=0):
        """Keys and values for all T positions; queries (and the output) only for positions q_from..T-1."""
        B, T, _ = x.shape
        Tq = T - q_from
        q = self.q_proj(x[:, q_from:]).view(B, Tq, self.n_head, self.hs).transpose(1, 2)  # (B, nh, Tq, hs)
        k = self.k_proj(x).view(B, T, self.n_kv, self.hs).transpose(1, 2)  # (B, n_kv, T, hs)
        v = self.v_proj(x).view(B, T, self.n_kv, self.hs).transpose(1, 2)  # (B, n_kv, T, hs)
        q, k = rope(q, cos[:, :, q_from:], sin[:, :, q_from:]), rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(i, k, v)  # (B, n_kv, T_past+T, hs)
        # mask None means plain causal with no past (training, full prompts): lets SDPA use its fused kernel.
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=None if mask is None else mask[:, :, q_from:],
                                           is_causal=mask is None, enable_gqa=self.n_kv != self.n_head)
        return self.o_proj(y.transpose(1, 2).reshape(B, Tq, self.n_head * self.hs))  # (B, Tq, D)


class MLP(nn.Module):
    def __init__(self, c: TextConfig):
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


class DecoderLayer(nn.Module):
    def __init__(self, c: TextConfig):
        super().__init__()
        self.self_attn, self.mlp = Attention(c), MLP(c)
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache, i, q_from=0):
        """(B, T, D) -> (B, T - q_from, D): with q_from > 0 only the last positions come out (see keep_from)."""
        x = x[:, q_from:] + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, i, q_from)
        return x + self.mlp(self.post_attention_layernorm(x))


class LanguageModel(nn.Module):
    def __init__(self, c: TextConfig):
        super().__init__()
        self.config = c
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(c) for _ in range(c.num_hidden_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        # Activation checkpointing: keep only each layer's input, recompute the layer in backward (~1/3 more
        # compute, activation memory per layer drops from ~20 tensors of (B, T, D) to one). Off by default.
        self.gradient_checkpointing = False

    def forward(self, x, attention_mask=None, position_ids=None, cache=None, keep_from=0):
        """x (B, T, D) input embeddings -> final-norm hidden states (B, T - keep_from, D) of positions keep_from..T-1.

        keep_from > 0 (the caller needs only the last positions, e.g. the answer tokens or the next-token logits):
        every layer still computes keys and values at all positions, but the last layer computes its queries,
        attention output and MLP only at the kept positions, as nothing reads the others; those equal the full
        pass's hidden states (up to float summation order).

        attention_mask: (B, T_past+T) 1/0 key padding mask (causal attention is added here), or a (B, T, T) bool
        block mask, True where query t may see key s, used as given (packed sequences; needs position_ids).
        """
        B, T, _ = x.shape
        past = cache.length if cache is not None else 0
        if cache is not None and past + T > cache.max_len:
            raise ValueError(f"KVCache full: {past} + {T} tokens > max_len {cache.max_len}")
        dev = x.device
        block = attention_mask is not None and attention_mask.dim() == 3
        if block and (position_ids is None or cache is not None or attention_mask.shape[1:] != (T, T)):
            raise ValueError("a (B, T, T) block attention_mask needs position_ids and no cache")
        if attention_mask is not None and not block and attention_mask.shape[1] != past + T:
            raise ValueError(f"attention_mask covers {attention_mask.shape[1]} positions, expected {past + T}")
        if position_ids is None:
            if attention_mask is None:
                position_ids = torch.arange(past, past + T, device=dev).expand(B, T)
            else:  # HF convention: count real tokens, so a left-padded row starts at 0; pads get 1 (unused)
                position_ids = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)[:, -T:]
        # Rotary tables in fp32, cast to the compute dtype as transformers does.  inv_freq: (hs/2,)
        hs = self.layers[0].self_attn.hs
        inv_freq = 1.0 / (self.config.rope_theta ** (torch.arange(0, hs, 2, dtype=torch.float, device=dev) / hs))
        freqs = position_ids[..., None].float() * inv_freq  # (B, T, hs/2)
        emb = torch.cat([freqs, freqs], dim=-1)[:, None]  # (B, 1, T, hs)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        mask = None
        if block:  # each query also sees itself, so a pad row attends to something (see below)
            mask = (attention_mask.bool() | torch.eye(T, dtype=torch.bool, device=dev))[:, None]  # (B, 1, T, T)
        elif past > 0 or keep_from > 0 or (attention_mask is not None and not bool(attention_mask.all())):
            q_pos = torch.arange(past, past + T, device=dev)[:, None]  # (T, 1)
            k_pos = torch.arange(past + T, device=dev)[None, :]  # (1, S)
            mask = (k_pos <= q_pos)[None]  # (1, T, S) causal
            if attention_mask is not None:
                mask = mask & attention_mask[:, None, :].bool()  # (B, T, S) drop padded keys
            # A left-pad query sees no real key; some SDPA kernels give NaN for an all-masked row, and a NaN
            # value times a zero weight still poisons later rows. Letting each query see itself avoids that.
            mask = (mask | (k_pos == q_pos))[:, None]  # (B or 1, 1, T, S)
        ckpt = self.gradient_checkpointing and torch.is_grad_enabled() and cache is None
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            q_from = keep_from if i == last else 0  # (a causal mask is built above whenever keep_from > 0)
            if ckpt:
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, mask, None, i, q_from, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, cache, i, q_from)
        if cache is not None:
            cache.length += T
        return self.norm(x)


class LlavaModel(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.vision_tower = VisionTower(c.vision)
        self.multi_modal_projector = Projector(c)
        self.language_model = LanguageModel(c.text)


class Llava(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = LlavaModel(config)
        self.lm_head = nn.Linear(config.text.hidden_size, config.text.vocab_size, bias=False)
        self.apply(_init_weights)
        if config.text.tie_word_embeddings:
            self.lm_head.weight = self.model.language_model.embed_tokens.weight

    def vision_hidden(self, pixel_values):
        """(B, 3, H, W) -> (B, 1+N, Dv): hidden states of CLIP layer vision_feature_layer, CLS first."""
        L, k = self.config.vision.num_hidden_layers, self.config.vision_feature_layer
        return self.model.vision_tower(pixel_values, k if k >= 0 else L + 1 + k)

    def encode_images(self, pixel_values):
        """(B, 3, H, W) -> (B, n_image_tokens, D_text): vision_hidden (CLS dropped unless "full"), projected."""
        h = self.vision_hidden(pixel_values)[:, self.config.first_image_feature:]  # (B, N or 1+N, Dv)
        return self.model.multi_modal_projector(h)

    def hidden_states(self, input_ids, attention_mask=None, pixel_values=None, image_features=None,
                      position_ids=None, cache=None, keep_from=0):
        """Final-norm hidden states (B, T - keep_from, D) before lm_head, of positions keep_from..T-1 (default all).

        Same arguments as forward; keep_from > 0 skips the last layer's queries and MLP at the earlier positions.
        """
        embed = self.model.language_model.embed_tokens
        if pixel_values is not None:
            image_features = self.encode_images(pixel_values)
        if image_features is None:
            x = embed(input_ids)  # (B, T, D)
        else:
            is_img = input_ids == self.config.image_token_index  # (B, T)
            feats = image_features.reshape(-1, image_features.shape[-1])  # (n_images * N, D), images in order
            if int(is_img.sum()) != feats.shape[0]:
                raise ValueError(f"{int(is_img.sum())} image tokens in input_ids but {feats.shape[0]} image feature "
                                 f"rows ({self.config.n_image_tokens} per image)")
            x = embed(input_ids.masked_fill(is_img, 0))  # the image slots are overwritten next
            x = x.masked_scatter(is_img[..., None], feats.to(x.dtype))  # (B, T, D)
        return self.model.language_model(x, attention_mask, position_ids, cache, keep_from)

    def forward(self, input_ids, attention_mask=None, pixel_values=None, image_features=None, position_ids=None,
                cache=None, logits_slice=None):
        """Next-token logits (B, T, V) in the model dtype; logits[:, t] predicts input_ids[:, t+1].

        input_ids (B, T) hold n_image_tokens copies of image_token_index per image; the rows of pixel_values
        (n_img, 3, S, S) or image_features (n_img, N, D) fill them in reading order (row-major over the batch);
        with neither, image tokens are embedded as ordinary tokens (as transformers does).
        attention_mask (B, T_past+T): 1 real, 0 pad; or a (B, T, T) bool block mask (query t sees key s) for packed
        sequences, with explicit position_ids. position_ids default cumsum(mask)-1. cache: a KVCache,
        extended in place. logits_slice: int, slice or 1-D index over T (-> (B, T', V)), or a (B, T) bool mask
        (-> (n_true, V)); lm_head then runs only on those positions.
        """
        h = self.hidden_states(input_ids, attention_mask, pixel_values, image_features, position_ids, cache)
        if logits_slice is not None:
            if isinstance(logits_slice, int):  # keep the time axis: -1 -> (B, 1, V)
                logits_slice = slice(logits_slice, logits_slice + 1 if logits_slice != -1 else None)
            is_mask = isinstance(logits_slice, torch.Tensor) and logits_slice.dtype == torch.bool
            h = h[logits_slice] if is_mask else h[:, logits_slice]
        return self.lm_head(h)


def _init_weights(m):
    """Normal(0, 0.02) weights, zero biases, unit norms: transformers' initializer_range default."""
    if isinstance(m, (nn.Linear, nn.Conv2d, nn.Embedding)):
        nn.init.normal_(m.weight, std=0.02)
        if getattr(m, "bias", None) is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, VisionEmbeddings):
        nn.init.normal_(m.class_embedding, std=0.02)

