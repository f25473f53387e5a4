"""GPU readiness: SENA's training step and reference-scoring batch on a random model with LLaVA-1.5-7B's shapes.

    python -m benchmarks.gpu_readiness                       # CUDA: 7B shapes, bf16, LoRA r=128, 4 pairs/step
    python -m benchmarks.gpu_readiness --checkpointing --batch-size 16
    python -m benchmarks.gpu_readiness --tiny                # CPU, scaled-down shapes, seconds (the test runs it)

Shapes (no download): CLIP ViT-L/14-336 (hidden 1024, 24 layers, 16 heads, MLP 4096, 576 patches), 2-layer MLP
projector, Vicuna-7B (hidden 4096, 32 layers, 32 heads, MLP 11008, vocab 32064). Base weights bf16 and frozen,
LoRA r=128 α=256 on the LLM's seven Linear kinds in fp32 under bf16 autocast (train.py's CUDA precision). Pairs have
SENA's real length: <s> + 35 system tokens + 576 image tokens + 15 request tokens ≈ 627 prompt tokens; half the
pairs are descriptions (chosen 32, rejected 28 answer tokens), half short answers (4 and 3).

Training step = train.py's: image features (frozen tower, no grad), shared-prefix pair_logps, DPO + ICA, backward,
AdamW. Reference batch = refcache.reference_logps's forward (no grad). Model FLOPs per token, counted for MFU:
2·N_llm forward + 2·N_llm backward (activation gradients only: the base is frozen; LoRA's own FLOPs and attention
are left out, so MFU is a lower bound), plus 2·N_vision per image patch forward. Recomputation under
--checkpointing is not counted (that would be hardware FLOPs utilisation).
"""

import argparse
import json
import os
import time

import torch

from sena.batch import pair_batch, pair_logps
from sena.lora import apply_lora, lora_parameters
from sena.losses import dpo_loss, ica_loss
from sena.model import Llava, ModelConfig, TextConfig, VisionConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}  # dense bf16


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="scaled-down shapes on CPU (seconds)")
    p.add_argument("--batch-size", type=int, default=4, help="pairs per training step")
    p.add_argument("--ref-batch-size", type=int, default=16, help="pairs per reference-scoring batch")
    p.add_argument("--steps", type=int, default=5, help="timed training steps (after one warm-up step)")
    p.add_argument("--lora-r", type=int, default=128, help="LoRA rank (α = 2r)")
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing of the decoder layers")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="peak dense bf16 TFLOPS for MFU (default: looked up from the GPU name; none on CPU)")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads (on a shared 2-core machine more than 1 thread can be 20x slower)")
    p.add_argument("--no-json", action="store_true", help="do not write benchmarks/results/gpu_readiness*.json")
    return p.parse_args(argv)


def config(tiny):
    if tiny:  # same structure, 16 patches, hidden 128; the full 32064 vocabulary keeps the chunked LM head honest
        vision = VisionConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                              image_size=56, patch_size=14)
        text = TextConfig(vocab_size=32064, hidden_size=128, intermediate_size=344, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=4096)
    else:
        vision = VisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=336, patch_size=14)
        text = TextConfig(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                          num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)
    return ModelConfig(vision, text, image_token_index=32000, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def make_pairs(cfg, n, g):
    """n tokenized pairs of SENA's length: (prompt, chosen, rejected) id lists, des and gen alternating."""

    def words(k):
        return torch.randint(3, 32000, (k,), generator=g).tolist()

    out = []
    for i in range(n):
        prompt = [1] + words(35) + [cfg.image_token_index] * cfg.n_image_tokens + words(15)
        lc, lr = (32, 28) if i % 2 == 0 else (4, 3)
        out.append((prompt, words(lc - 1) + [2], words(lr - 1) + [2]))
    return out


def sync(dev):
    if dev.startswith("cuda"):
        torch.cuda.synchronize()


def main(argv=None):
    args = parse_args(argv)
    dev = "cpu" if args.tiny else args.device
    cuda = dev.startswith("cuda")
    threads = torch.get_num_threads()
    if not cuda:
        torch.set_num_threads(args.threads)
    try:
        return run(args, dev, cuda)
    finally:
        torch.set_num_threads(threads)


def run(args, dev, cuda):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    cfg = config(args.tiny)
    # Precision: frozen base in bf16 (built in bf16 so a 7B model never exists in fp32), LoRA factors fp32,
    # bf16 autocast for the forward; on CPU --tiny runs fp32 without autocast (bf16 matmuls are slow there).
    base_dtype = torch.bfloat16 if cuda else torch.float32
    torch.set_default_dtype(base_dtype)
    with torch.device(dev):
        model = Llava(cfg)
    torch.set_default_dtype(torch.float32)
    apply_lora(model, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], r=args.lora_r,
               alpha=2 * args.lora_r)
    model.model.language_model.gradient_checkpointing = args.checkpointing
    params = lora_parameters(model)
    opt = torch.optim.AdamW(params, lr=1e-5)
    autocast = dict(device_type=dev.split(":")[0], dtype=torch.bfloat16, enabled=cuda)
    # Matmul weights of the decoder (the embedding is a lookup; the LM head runs on answer tokens only).
    n_llm = sum(p.numel() for n, p in model.named_parameters()
                if "language_model.layers" in n and "lora_" not in n and p.dim() == 2)
    n_vis = sum(p.numel() for n, p in model.named_parameters() if "vision_tower" in n or "projector" in n)
    n_lora = sum(p.numel() for p in params)
    if cuda:
        torch.cuda.reset_peak_memory_stats()

    def batch_of(tokenized):
        b = {k: v.to(dev) for k, v in pair_batch(tokenized, 0).items()}
        pixels = torch.randn(len(tokenized), 3, cfg.vision.image_size, cfg.vision.image_size, generator=g)
        return b, pixels.to(dev, base_dtype)

    def train_step(tokenized):
        b, pixels = batch_of(tokenized)
        with torch.autocast(**autocast):
            with torch.no_grad():
                feats = model.encode_images(pixels)  # frozen tower and projector under LoRA
            pc, pr, pc_mean, _ = pair_logps(model, b, feats)
        ref_c, ref_r = pc.detach() - 1.0, pr.detach() + 1.0  # stand-ins for the cached reference
        losses, _, _ = dpo_loss(pc, pr, ref_c, ref_r, 0.1)
        is_des = torch.tensor([len(c) > 8 for _, c, _ in tokenized], device=dev, dtype=torch.float32)
        loss = losses.mean() + ica_loss(pc_mean, is_des).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return int(b["attention_mask"].sum())

    model.train()
    train_step(make_pairs(cfg, args.batch_size, g))  # warm-up: allocator, kernels
    sync(dev)
    t0, tokens = time.perf_counter(), 0
    for _ in range(args.steps):
        tokens += train_step(make_pairs(cfg, args.batch_size, g))
    sync(dev)
    t_train = (time.perf_counter() - t0) / args.steps
    train_peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else None

    model.eval()
    ref_pairs = make_pairs(cfg, args.ref_batch_size, g)
    with torch.no_grad(), torch.autocast(**autocast):
        b, pixels = batch_of(ref_pairs)
        pair_logps(model, b, model.encode_images(pixels))  # warm-up
        sync(dev)
        t0 = time.perf_counter()
        b, pixels = batch_of(ref_pairs)
        pair_logps(model, b, model.encode_images(pixels))
        sync(dev)
    t_ref = time.perf_counter() - t0
    ref_tokens = int(b["attention_mask"].sum())

    patches = (cfg.n_image_tokens + 1) * args.batch_size
    flops = 4 * n_llm * tokens / args.steps + 2 * n_vis * patches  # per training step (see docstring)
    achieved = flops / t_train / 1e12
    peak = args.peak_tflops
    if peak is None and cuda:
        name = torch.cuda.get_device_name()
        peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    peak_mb = torch.cuda.max_memory_allocated() / 2**20 if cuda else _peak_rss_mb()
    res = {"device": torch.cuda.get_device_name() if cuda else "cpu", "tiny": args.tiny,
           "checkpointing": args.checkpointing, "params_llm": n_llm, "params_vision": n_vis, "params_lora": n_lora,
           "batch_pairs": args.batch_size, "tokens_per_step": tokens / args.steps,
           "train_step_s": t_train, "train_pairs_per_s": args.batch_size / t_train,
           "train_tokens_per_s": tokens / args.steps / t_train, "train_tflops": achieved,
           "train_mfu": achieved / peak if peak else None, "train_peak_memory_mb": train_peak,
           "ref_batch_pairs": args.ref_batch_size, "ref_s": t_ref, "ref_pairs_per_s": args.ref_batch_size / t_ref,
           "ref_tokens_per_s": ref_tokens / t_ref, "peak_memory_mb": peak_mb}
    mfu = f"{100 * res['train_mfu']:.1f}%" if res["train_mfu"] else "n/a (no peak known; --peak-tflops)"
    print(f"{res['device']} | {'tiny' if args.tiny else 'LLaVA-1.5-7B'} shapes | LLM {n_llm / 1e6:.1f}M, vision "
          f"{n_vis / 1e6:.1f}M, LoRA {n_lora / 1e6:.1f}M | checkpointing {'on' if args.checkpointing else 'off'}")
    print(f"train: {args.batch_size} pairs/step, {tokens / args.steps:.0f} tokens/step (packed), "
          f"{t_train:.3f} s/step | {res['train_pairs_per_s']:.2f} pairs/s | {res['train_tokens_per_s']:.0f} tokens/s "
          f"| {achieved:.2f} TFLOPS | MFU {mfu}")
    print(f"reference: {args.ref_batch_size} pairs in {t_ref:.3f} s | {res['ref_pairs_per_s']:.2f} pairs/s | "
          f"{res['ref_tokens_per_s']:.0f} tokens/s | peak memory {peak_mb:.0f} MB")
    if not args.no_json:
        os.makedirs(os.path.join(ROOT, "benchmarks", "results"), exist_ok=True)
        name = "gpu_readiness_tiny.json" if args.tiny else "gpu_readiness.json"
        with open(os.path.join(ROOT, "benchmarks", "results", name), "w") as f:
            json.dump(res | {"args": vars(args)}, f, indent=2)
    return res


def _peak_rss_mb():
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


if __name__ == "__main__":
    main()
