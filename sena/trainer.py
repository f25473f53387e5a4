"""The training half of a round: DPO + λ·ICA on the round's pairs, from θ(k-1), with the reference log-probs cached.

    L = mean_b[-log σ(β·((log π(c) - log π(r)) - (log π_ref(c) - log π_ref(r))))] + λ · ICA     (sena.losses)

One loop, written out: a warmup + cosine (or constant) schedule, micro-batches that accumulate gradients, gradient
averaging over torchrun ranks (or FSDP sharding under full fine-tuning), clipping, AdamW, one log.jsonl line per
step, and a checkpoint every --save-every steps from which a killed run resumes at the same data position.
Precision: fp32 on CPU; on CUDA a bf16 frozen base, fp32 trainable weights and a bf16-autocast forward.
"""

import json
import os
import shutil
import time

import torch
from safetensors.torch import load_file

from sena import dist, seeds
from sena.batch import load_pixels, pair_batch, pair_logps, tokenize_pair
from sena.checkpoint import load_pretrained
from sena.cli import UserError
from sena.io import atomic_write_text, read_json, read_jsonl, save_tensors
from sena.lora import apply_lora, lora_disabled, merge_lora
from sena.losses import dpo_loss, ica_loss, ica_reduce
from sena.schedule import lr_at
from sena.settings import TrainSettings, micro_batches

say = dist.say


def micro_batch(model, tok, image_cfg, image_root, pairs, idx, ref, device):
    """One micro-batch on the device: the packed token rows of pairs[idx] (sena.batch), their pixels, their cached
    reference log-probs and which of them are des pairs."""
    chunk = [pairs[i] for i in idx]
    rows = pair_batch([tokenize_pair(tok, model.config, p) for p in chunk], tok.pad_token_id)
    return {"batch": {k: v.to(device) for k, v in rows.items()},
            "pixels": load_pixels(chunk, image_root, image_cfg).to(device, next(model.parameters()).dtype),
            "refs": [ref[f][idx].to(device) for f in ("ref_chosen_logps", "ref_rejected_logps")],
            "is_des": torch.tensor([p["type"] == "des" for p in chunk], device=device, dtype=torch.float32)}


def pair_loss(model, mb, settings: TrainSettings, check=False):
    """DPO + λ·ICA of one micro-batch (micro_batch), and the detached statistics every DPO user expects. check: first
    compare the cached reference with a live one (check_reference)."""
    cuda = settings.device.startswith("cuda")
    batch, refs, is_des = mb["batch"], mb["refs"], mb["is_des"]
    with torch.autocast(device_type=settings.device.split(":")[0], dtype=torch.bfloat16, enabled=cuda):
        with torch.set_grad_enabled(settings.full_ft):
            feats = model.encode_images(mb["pixels"])  # frozen tower (+ frozen projector under LoRA)
        if check:
            check_reference(model, batch, feats, refs, cuda)
        pc, pr, pc_mean, _ = pair_logps(model, batch, feats)
    losses, r_c, r_r = dpo_loss(pc, pr, refs[0], refs[1], settings.beta, settings.dpop)
    ica = ica_reduce(ica_loss(pc_mean, is_des), is_des, settings.ica_reduction)
    loss = losses.mean() + settings.ica_weight * ica
    stats = {"loss": loss, "dpo": losses.mean(), "ica": ica, "rewards/chosen": r_c.mean(),
             "rewards/rejected": r_r.mean(), "rewards/margins": (r_c - r_r).mean(),
             "rewards/accuracies": (r_c > r_r).float().mean(), "logps/chosen": pc.mean(),
             "logps/rejected": pr.mean(), "logps/ref_chosen": refs[0].mean(), "logps/ref_rejected": refs[1].mean()}
    return loss, {k: v.item() for k, v in stats.items()}, int(batch["attention_mask"].sum())


def weight_dtype(settings: TrainSettings):
    """Precision in three lines: fp32 everywhere on CPU; on CUDA the frozen base is bf16 (full FT: fp32 master
    weights), the trainable weights stay fp32, and the forward runs under bf16 autocast (pair_loss). The reference
    is scored with the same weights dtype, so that at step 0 policy and reference are the same numbers (DPO = ln 2)."""
    return torch.bfloat16 if settings.device.startswith("cuda") and not settings.full_ft else torch.float32


def autocast_dtype(device):
    """bf16 autocast on CUDA, none on CPU: the forward's precision, for the reference and telemetry passes."""
    return torch.bfloat16 if device.startswith("cuda") else None


def train_round(settings: TrainSettings, k, prev, round_dir, pairs, image_root, ref):
    """DPO + λ·ICA (λ = settings.ica_weight) from θ(k-1) in `prev` on round k's pairs and their cached reference
    log-probs; returns the trained (merged) model, tokenizer and image config."""
    dev = settings.device
    rank, nproc = dist.rank(), dist.size()
    base_dtype = weight_dtype(settings)
    # Full fine-tuning under torchrun shards the model with FSDP (sena/dist.py): each rank loads it on the CPU and
    # keeps only its 1/N shard on the device; LoRA replicates the model and averages the adapter gradients.
    fsdp = settings.full_ft and nproc > 1
    model, tok, image_cfg = load_pretrained(prev, dtype=base_dtype, device="cpu" if fsdp else dev)
    torch.manual_seed(seeds.derive(settings.seed, "lora-init", k))
    if settings.full_ft:
        for name, p in model.named_parameters():
            p.requires_grad = "vision_tower" not in name  # the vision tower stays frozen (official)
    else:
        apply_lora(model, settings.lora_targets.split(","), r=settings.lora_r, alpha=settings.lora_alpha,
                   dropout=settings.lora_dropout)
    if fsdp:
        dist.shard_model(model, mixed_precision=dev.startswith("cuda"))
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay, betas=(0.9, 0.999))
    model.train()

    order_rng = seeds.rng(settings.seed, "order", k)
    order = []
    for _ in range(settings.epochs):
        epoch = list(range(len(pairs)))
        order_rng.shuffle(epoch)
        order += epoch
    total = max(1, len(order) // settings.batch_size)
    # Each rank takes an equal slice of every global batch, in micro-batches; gradients are then averaged over
    # ranks, so N processes take the same steps as one (tests/test_distributed.py).
    accum = micro_batches(settings.batch_size, settings.micro_batch_size, nproc)
    local = settings.batch_size // nproc

    # Resume: a checkpoint of this round continues where it stopped; the data order is a function of the seed,
    # so the step number is the data position. log.jsonl keeps only the lines of steps before the resumed one.
    ckpt_dir = os.path.join(round_dir, "checkpoint")
    start, bad_steps = 0, 0
    os.makedirs(ckpt_dir, exist_ok=True)
    if os.path.exists(os.path.join(ckpt_dir, "latest.json")):
        start, bad_steps = load_checkpoint(ckpt_dir, model, opt)
        say(f"round {k}: resuming from {ckpt_dir} at step {start}")
    log_path = os.path.join(round_dir, "log.jsonl")
    if rank == 0:
        kept = []
        if start and os.path.exists(log_path):  # a damaged line is reported and dropped, not fatal
            kept = [json.dumps(r) + "\n" for r in read_jsonl(log_path, required=("step",))[0] if r["step"] < start]
        atomic_write_text(log_path, "".join(kept))
    log = open(log_path, "a") if rank == 0 else None
    warmup = max(1, int(settings.warmup_ratio * total))  # linear warmup over this share of the steps
    t_start = time.time()
    for step in range(start, total):
        t0, ntok, stats, finite = time.time(), 0, {}, True
        lr = lr_at(step, total, settings.lr, warmup, constant=settings.schedule == "constant")
        for g in opt.param_groups:
            g["lr"] = lr
        mine = order[step * settings.batch_size + rank * local:][:local]
        for m in range(accum):
            idx = mine[m * settings.micro_batch_size:][: settings.micro_batch_size]
            mb = micro_batch(model, tok, image_cfg, image_root, pairs, idx, ref, dev)
            loss, st, n = pair_loss(model, mb, settings, check=step == 0 and m == 0)
            # Ranks agree before any backward: under FSDP a backward communicates, so all ranks run it or none does.
            finite = finite and dist.all_ranks(bool(torch.isfinite(loss)))
            if finite:
                (loss / accum).backward()
            ntok += n
            for key, v in st.items():
                stats[key] = stats.get(key, 0.0) + v / accum
        if not dist.all_ranks(finite):
            # A non-finite loss skips the step (no update) and is counted; too many stop the run, checkpoint kept.
            opt.zero_grad(set_to_none=True)
            bad_steps += 1
            say(f"iter {k} step {step}: non-finite loss, step skipped ({bad_steps} so far)")
            if bad_steps > settings.max_bad_steps:
                save_checkpoint(ckpt_dir, model, opt, step, bad_steps)
                if log:
                    log.close()
                raise UserError(f"round {k}: {bad_steps} non-finite losses (> --max-bad-steps "
                                f"{settings.max_bad_steps}); stopped at step {step}, checkpoint in {ckpt_dir}")
            continue
        if not fsdp:  # FSDP has reduce-scattered the averaged gradients during backward
            dist.average_gradients(params)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm).item()  # DTensors: the global norm
        opt.step()
        opt.zero_grad(set_to_none=True)
        stats = dist.average(stats | {"tokens": ntok})
        stats.update(iter=k, step=step, lr=lr, grad_norm=grad_norm, bad_steps=bad_steps,
                     tokens_per_s=stats.pop("tokens") * nproc / (time.time() - t0))
        if rank == 0:
            log.write(json.dumps(stats) + "\n")
            log.flush()
        say(f"iter {k} step {step:03d}/{total:03d} | loss {stats['loss']:.4f} | dpo {stats['dpo']:.4f} | "
            f"ica {stats['ica']:.4f} | acc {stats['rewards/accuracies']:.2f} | "
            f"margin {stats['rewards/margins']:.3f} | gnorm {grad_norm:.3f} | lr {lr:.2e} | "
            f"tok/s {stats['tokens_per_s']:.0f}")
        if (step + 1) % settings.save_every == 0 and step + 1 < total:
            save_checkpoint(ckpt_dir, model, opt, step, bad_steps)
    if log:
        log.close()
    say(f"round {k}: {total - start} steps in {time.time() - t_start:.1f} s")
    if fsdp:
        model = dist.gather_model(model)  # θ(k) whole on rank 0's CPU, None on the other ranks
    elif not settings.full_ft:
        merge_lora(model)
    return model and model.float(), tok, image_cfg


def save_checkpoint(ckpt_dir, model, opt, step, bad_steps):
    """Trainable weights, AdamW moments, RNG and the step, by rank 0. Each checkpoint is a new folder step_<n>;
    latest.json is switched to it atomically and only then are older folders removed, so a kill at any moment
    leaves a complete checkpoint that latest.json names."""
    weights, moments = dist.trainable_state(model, opt)  # under FSDP all ranks gather the shards to rank 0
    if dist.rank() != 0:
        dist.barrier()
        return
    name = f"step_{step:06d}"
    path = os.path.join(ckpt_dir, name)
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)
    save_tensors({n: v.contiguous() for n, v in weights.items()}, os.path.join(path, "trainable.safetensors"))
    state = {f"{i}.{k}": v.contiguous() for i, st in moments.items() for k, v in st.items()}
    state["torch_rng"] = torch.get_rng_state()  # LoRA dropout draws from it (on CUDA, from the device's generator;
    if torch.cuda.is_available():                # every rank seeds and draws alike, so rank 0's state is everyone's)
        state["cuda_rng"] = torch.cuda.get_rng_state()
    save_tensors(state, os.path.join(path, "optimizer.safetensors"))
    atomic_write_text(os.path.join(ckpt_dir, "latest.json"),
                      json.dumps({"dir": name, "step": step, "bad_steps": bad_steps}))
    for old in os.listdir(ckpt_dir):
        if old.startswith("step_") and old != name:
            shutil.rmtree(os.path.join(ckpt_dir, old), ignore_errors=True)
    dist.barrier()


def load_checkpoint(ckpt_dir, model, opt):
    """Restore the checkpoint latest.json names into the model and optimizer; returns (next step, bad steps)."""
    state = read_json(os.path.join(ckpt_dir, "latest.json"))
    path = os.path.join(ckpt_dir, state["dir"])
    flat = load_file(os.path.join(path, "optimizer.safetensors"))
    torch.set_rng_state(flat.pop("torch_rng"))
    cuda_rng = flat.pop("cuda_rng", None)
    if cuda_rng is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda_rng)
    moments = {}
    for key, v in flat.items():
        i, name = key.split(".", 1)
        moments.setdefault(int(i), {})[name] = v
    dist.load_trainable_state(model, opt, load_file(os.path.join(path, "trainable.safetensors")), moments)
    return state["step"] + 1, state["bad_steps"]


@torch.no_grad()
def check_reference(model, batch, feats, refs, cuda):
    """Step 0: the cached reference must equal a live reference forward (adapters off) on the first batch."""
    with lora_disabled(model):
        live = pair_logps(model, batch, feats)
    # fp32: only summation order differs (batch padding), so 1e-3 on summed log-probs of tens of tokens.
    # bf16 autocast: ~3 significant digits per logit, so the tolerance scales with the magnitude.
    tol = (0.5 + 0.02 * refs[0].abs().max().item()) if cuda else 1e-3
    diff = max((live[0].float() - refs[0]).abs().max().item(), (live[1].float() - refs[1]).abs().max().item())
    if diff > tol:
        raise UserError(f"cached reference log-probs differ from a live forward by {diff:.2e} > {tol:.1e}")
    say(f"reference check: cached vs live max |Δ logp| = {diff:.2e} (tol {tol:.1e})")
