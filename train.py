"""SENA self-evolution: round k turns θ(k-1) into θ(k) with DPO + λ·ICA on the model's own preference pairs.

    python train.py                 # the embedded world: the shipped θ0, rounds 1..3, the table
    python train.py --iter 2        # one round (round 1 must exist); then --iter 3, ...
    python train.py --base /models/llava-1.5-7b-hf --images /data/coco --iter 1 --run-dir runs/coco

Each round writes runs/<name>/iter_<k>/: pairs.jsonl + report.json (generate.py), ref_logps.safetensors (the
reference log-probs, once), log.jsonl (one line per step), model/ (θ(k), a Hugging Face LLaVA directory),
metrics.json (evaluate.py, world runs) and meta.json (arguments, input hashes, git commit).

Loss of a batch of B pairs (DPO plus λ times the image-content alignment NLL of the chosen descriptions):
    L = mean_b[-log σ(β·((log π(c) - log π(r)) - (log π_ref(c) - log π_ref(r))))] + λ · ICA
    ICA = mean_b[des_b · (-(1/|c|)·log π(c))]      (--ica-reduction batch, official)
        = the same sum / number of des pairs        (--ica-reduction des)
"""

import json
import math
import os
import random
import shutil
import subprocess
import sys
import time

import torch
from safetensors.torch import load_file, save_file

import evaluate
import generate
from sena import cli, dist
from sena.batch import load_pixels, pair_batch, pair_logps, tokenize_pair
from sena.io import atomic_write_text, read_jsonl, sha256_file
from sena.lora import apply_lora, lora_disabled, merge_lora
from sena.losses import dpo_loss, ica_loss
from sena.model import load_pretrained, save_pretrained
from sena.refcache import cache_key, load_reference, save_reference, score_pairs
from sena.telemetry import image_reliance, reference_preference, summary_line

ABLATIONS = {  # name -> (self-check, self-enhancement, ICA)
    "none": ("image", True, True), "no-sq": ("off", True, True), "no-se": ("image", False, True),
    "no-ica": ("image", True, False), "seva": ("off", False, False),
}


def parse_args(argv):
    p = cli.Parser(prog="train.py", description=__doc__)
    p.add_argument("--iter", type=cli.positive_int, default=None,
                   help="run only round k (default: rounds 1..--n-iters)")
    p.add_argument("--n-iters", type=cli.positive_int, default=3, help="number of rounds when --iter is not given")
    p.add_argument("--run-dir", default="runs/world", help="run directory; rounds go to <run-dir>/iter_<k>")
    p.add_argument("--base", default=None, help="θ0 as a HF LLaVA dir, for real runs (default: the world's θ0)")
    p.add_argument("--images", default=None, help="unlabeled image folder for real runs (rounds take disjoint slices)")
    p.add_argument("--image-list", default=None, help="LLaVA-style JSON image list for real runs")
    p.add_argument("--image-root", default=None, help="root folder of --image-list paths")
    p.add_argument("--images-per-iter", type=cli.positive_int, default=400, help="fresh unlabeled images per round")
    p.add_argument("--seed", type=cli.non_negative_int, default=0,
                   help="seed of the world, the noise, data order and LoRA init")
    p.add_argument("--theta0", default=None,
                   help="world θ0 directory to start from (default: the one the repository ships, sena/world/theta0)")
    p.add_argument("--rebuild-theta0", action="store_true",
                   help="build a fresh world θ0 from --seed in the run directory instead (python -m sena.world.build; "
                        "minutes on a GPU, about an hour on 2 CPU cores)")
    p.add_argument("--ablation", choices=list(ABLATIONS), default="none",
                   help="no-sq: no self-check; no-se: no self-enhancement; no-ica: λ=0; seva: all three off")
    p.add_argument("--self-check", choices=["image", "text"], default="image",
                   help="self-check turn with the image (paper) or text-only (released code)")
    p.add_argument("--noise-step", type=cli.int_in(0, 999), default=600,
                   help="diffusion step t of the rejected image, of the schedule's 1000 (0..999)")
    p.add_argument("--enhance-types", choices=["des,gen", "gen"], default="des,gen", metavar="{des,gen | gen}",
                   help="answers self-enhancement rewrites: 'des,gen' both (paper), 'gen' the short answers only "
                        "(descriptions stay raw, README)")
    p.add_argument("--beta", type=cli.positive_float, default=0.1,
                   help="DPO β, the inverse temperature of the implicit reward (> 0)")
    p.add_argument("--dpop", type=cli.non_negative_float, default=0.0,
                   help="ours, not SENA's: DPO-Positive μ, penalising a chosen log-prob below the reference (0 = DPO)")
    p.add_argument("--ica-weight", type=cli.non_negative_float, default=1.0,
                   help="λ, the weight of the image-content alignment NLL")
    p.add_argument("--ica-reduction", choices=["batch", "des"], default="batch",
                   help="average the ICA term over the whole batch (official) or over des pairs only")
    p.add_argument("--lr", type=cli.positive_float, default=1e-4,
                   help="peak learning rate (world LoRA: 1e-4; 1e-3 collapses θ0. Official 7B full FT: 2e-6)")
    p.add_argument("--epochs", type=cli.positive_int, default=2, help="passes over a round's pairs (official: 1)")
    p.add_argument("--batch-size", type=cli.positive_int, default=16, help="pairs per optimizer step (official: 128)")
    p.add_argument("--micro-batch-size", type=cli.positive_int, default=16,
                   help="pairs per forward; steps accumulate gradients")
    p.add_argument("--schedule", choices=["cosine", "constant"], default="cosine",
                   help="after warmup: cosine decay to 0, or constant (what the official DeepSpeed config does)")
    p.add_argument("--warmup-ratio", type=cli.fraction, default=0.1, help="share of steps with linear warmup")
    p.add_argument("--weight-decay", type=cli.non_negative_float, default=0.0, help="AdamW weight decay")
    p.add_argument("--max-grad-norm", type=cli.positive_float, default=1.0, help="gradient clipping norm")
    p.add_argument("--full-ft", action="store_true", help="full fine-tuning of LLM + projector instead of LoRA")
    p.add_argument("--lora-r", type=cli.positive_int, default=16, help="LoRA rank (peers: 128 on 7B)")
    p.add_argument("--lora-alpha", type=cli.positive_float, default=32.0, help="LoRA α (scale α/r)")
    p.add_argument("--lora-dropout", type=cli.float_in(0, 1, hi_open=True), default=0.0,
                   help="dropout on the LoRA input")
    p.add_argument("--lora-targets", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
                   help="comma-separated language-model Linear names to adapt")
    p.add_argument("--gen-batch-size", type=cli.positive_int, default=64, help="prompts per generation batch")
    p.add_argument("--device", type=cli.device, default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device")
    p.add_argument("--reliance-pairs", type=cli.non_negative_int, default=256,
                   help="pairs scored again on their noised image for the image-reliance telemetry (0: off)")
    p.add_argument("--no-eval", action="store_true", help="skip evaluate.py after each round")
    p.add_argument("--threads", type=cli.positive_int, default=None,
                   help="torch CPU threads (default: torch's choice; use 1 per process when runs share the cores)")
    p.add_argument("--save-every", type=cli.positive_int, default=50,
                   help="checkpoint trainable weights + optimizer every N steps")
    p.add_argument("--max-bad-steps", type=cli.non_negative_int, default=10,
                   help="skip a step with a non-finite loss; stop the run after this many")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = p.parse_args(argv)
    args.argv = argv  # for the commands that refusals suggest: the user's own flags
    check_flags(p, args)
    check_round_order(args)
    return args


def check_flags(p, args):
    """What single flags cannot say: flags that go together, and how a batch splits. Refused here, before θ0 is
    built, a model loaded or a reference pass run."""
    if args.images and args.image_list:
        p.error("give one of --images DIR or --image-list JSON, not both")
    if args.image_root and not args.image_list:
        p.error("--image-root goes with --image-list")
    if args.base is not None:
        if not os.path.isfile(os.path.join(args.base, "config.json")):
            p.error(f"argument --base: {args.base} is not a Hugging Face LLaVA directory (no config.json)")
        if not (args.images or args.image_list):
            p.error("--base needs --images DIR or --image-list JSON")
    # Each of the torchrun processes takes an equal slice of every batch, in whole micro-batches (train_round).
    nproc = int(os.environ.get("WORLD_SIZE", "1"))
    if args.batch_size % (nproc * args.micro_batch_size):
        p.error(f"--batch-size {args.batch_size} must split into {nproc} process(es) x whole micro-batches of "
                f"--micro-batch-size {args.micro_batch_size}")


def round_done(run_dir, k):
    return os.path.exists(os.path.join(run_dir, f"iter_{k}", "meta.json"))


def command_for(args, j):
    """'python train.py --iter j ...' with every other flag the user typed."""
    has_iter = any(a == "--iter" or a.startswith("--iter=") for a in args.argv)
    argv = args.argv if has_iter else ["--iter", "0"] + args.argv
    return f"python train.py {cli.with_flag(argv, '--iter', j)}"


def run_first(args, k):
    """The command that makes the first missing round before round k, and what follows it."""
    first = next(j for j in range(1, k) if not round_done(args.run_dir, j))
    then = f" (then --iter {first + 1}{f' .. {k - 1}' if first + 1 < k - 1 else ''})" if first < k - 1 else ""
    return command_for(args, first) + then


def check_round_order(args):
    """--iter k needs round k-1 finished (its meta.json): checked before θ0 is built or anything is loaded."""
    k = args.iter
    if k and k > 1 and not round_done(args.run_dir, k - 1):
        raise SystemExit(f"error: round {k} needs round {k - 1} finished "
                         f"({os.path.join(args.run_dir, f'iter_{k - 1}', 'meta.json')} is missing); "
                         f"run first: {run_first(args, k)}")


def git_commit():
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True).stdout.strip()
    except OSError:
        return None


def say(msg):
    """Print on rank 0 only (every rank computes the same global statistics)."""
    if dist.rank() == 0:
        print(msg, flush=True)


def lr_at(step, total, args):
    """Linear warmup over warmup_ratio·total steps, then cosine decay to 0 or constant."""
    warmup = max(1, int(args.warmup_ratio * total))
    if step < warmup:
        return args.lr * (step + 1) / warmup
    if args.schedule == "constant":
        return args.lr
    progress = (step - warmup) / max(1, total - warmup)
    return args.lr * 0.5 * (1 + math.cos(math.pi * progress))


def generation_args(args, k, prev, round_dir, world):
    """generate.py's flags for round k: θ(k-1), this round's slice of the images, the ablation's switches."""
    self_check, enhance, _ = ABLATIONS[args.ablation]
    self_check = args.self_check if self_check == "image" else self_check
    gen_args = ["--model", prev, "--out", round_dir, "--round", str(k), "--seed", str(args.seed),
                "--self-check", self_check, "--noise-step", str(args.noise_step),
                "--batch-size", str(args.gen_batch_size), "--device", args.device]
    if world:
        gen_args += ["--images", world_pool(world, args.run_dir, k, args.images_per_iter, args.seed)]
    elif args.images:
        gen_args += ["--images", args.images, "--offset", str((k - 1) * args.images_per_iter),
                     "--num-images", str(args.images_per_iter)]
    else:
        gen_args += ["--image-list", args.image_list, "--offset", str((k - 1) * args.images_per_iter),
                     "--num-images", str(args.images_per_iter)] + (
                        ["--image-root", args.image_root] if args.image_root else [])
    if not enhance:
        gen_args.append("--no-enhance")
    return gen_args + ["--enhance-types", args.enhance_types]


def changed_inputs(report, gen_args, k):
    """What changed since generate.py wrote this round's pairs ('' if nothing did, or if they were made by hand and
    carry no record): its settings, θ(k-1)'s weights, the images' bytes (generate.round_inputs)."""
    then = report.get("inputs")
    if then is None:
        return ""
    gargs = generate.parse_args(gen_args)
    now = generate.round_inputs(gargs, *generate.round_images(gargs))
    names = {"settings": "generation settings", "model_sha256": f"θ({k - 1}) weights", "images_sha256": "images"}
    return ", ".join(name for key, name in names.items() if then.get(key) != now[key])


def prepare_data(args, k, prev, round_dir, world):
    """Round k's pairs (generate.py unless present and current) and the image root they refer to.

    Pairs that generate.py wrote are reused only if their inputs are unchanged. Changed inputs with no pairs
    (say, all images were unreadable, and readable ones were added since) lose nothing: the round is generated
    again. Changed inputs with pairs are refused with the way out, as they may have cost hours.
    """
    pairs_path, report_path = (os.path.join(round_dir, n) for n in ("pairs.jsonl", "report.json"))
    gen_args = generation_args(args, k, prev, round_dir, world)
    if os.path.exists(pairs_path):
        if not os.path.exists(report_path):
            raise SystemExit(f"error: {report_path} is missing beside pairs.jsonl (it names the image root); "
                             f"delete {pairs_path} to generate the round again")
        changed = changed_inputs(read_json(report_path), gen_args, k)
        has_pairs = any(line.strip() for line in open_lines(pairs_path))
        if changed and has_pairs:
            raise SystemExit(f"error: {pairs_path} was generated from other inputs ({changed} changed since); "
                             f"delete {round_dir} to generate the round again, or use another --run-dir")
        if changed:
            say(f"round {k}: {pairs_path} holds no pairs and its inputs changed ({changed}); generating it again")
            if dist.rank() == 0:
                for path in (pairs_path, report_path):
                    os.remove(path)
                shutil.rmtree(os.path.join(round_dir, "stages"), ignore_errors=True)
            dist.barrier()
    if not os.path.exists(pairs_path):
        generate.main(gen_args)
    report = read_json(report_path)
    pairs, bad = read_jsonl(pairs_path, required=("image", "prompt", "chosen", "rejected", "type"))
    if not pairs:
        counts = ", ".join(f"{key} {report[key]}" for key in ("images", "images_unreadable", "questions_kept",
                                                              "filtered") if key in report)
        raise SystemExit(f"error: {pairs_path}: no pairs to train on ({bad} malformed lines; {counts or 'no report'})"
                         f". The round is generated again once its images, θ({k - 1}) or settings change; or delete "
                         f"{round_dir}")
    return pairs_path, pairs, report["image_root"]


def read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def open_lines(path):
    with open(path, encoding="utf-8") as f:
        return f.read().splitlines()


def pair_loss(model, chunk, idx, ref, tok, image_root, image_cfg, args, check):
    """DPO + λ·ICA of one micro-batch of pairs, and the detached statistics every DPO user expects."""
    dev, cuda = args.device, args.device.startswith("cuda")
    batch = {k: v.to(dev) for k, v in pair_batch([tokenize_pair(tok, model.config, p) for p in chunk],
                                                  tok.pad_token_id).items()}
    refs = [ref[f][idx].to(dev) for f in ("ref_chosen_logps", "ref_rejected_logps")]
    is_des = torch.tensor([p["type"] == "des" for p in chunk], device=dev, dtype=torch.float32)
    with torch.autocast(device_type=dev.split(":")[0], dtype=torch.bfloat16, enabled=cuda):
        pixels = load_pixels(chunk, image_root, image_cfg).to(dev, next(model.parameters()).dtype)
        with torch.set_grad_enabled(args.full_ft):
            feats = model.encode_images(pixels)  # frozen tower (+ frozen projector under LoRA)
        if check:
            check_reference(model, batch, feats, refs, cuda)
        pc, pr, pc_mean, _ = pair_logps(model, batch, feats)
    losses, r_c, r_r = dpo_loss(pc, pr, refs[0], refs[1], args.beta, args.dpop)
    ica = ica_loss(pc_mean, is_des)
    # The visible reduction choice: official = mean over the whole batch, switch = mean over des pairs only.
    ica = ica.sum() / (len(chunk) if args.ica_reduction == "batch" else is_des.sum().clamp(min=1))
    ica_w = args.ica_weight if ABLATIONS[args.ablation][2] else 0.0
    loss = losses.mean() + ica_w * ica
    stats = {"loss": loss, "dpo": losses.mean(), "ica": ica, "rewards/chosen": r_c.mean(),
             "rewards/rejected": r_r.mean(), "rewards/margins": (r_c - r_r).mean(),
             "rewards/accuracies": (r_c > r_r).float().mean(), "logps/chosen": pc.mean(),
             "logps/rejected": pr.mean(), "logps/ref_chosen": refs[0].mean(), "logps/ref_rejected": refs[1].mean()}
    return loss, {k: v.item() for k, v in stats.items()}, int(batch["attention_mask"].sum())


def weight_dtype(args):
    """Precision in three lines: fp32 everywhere on CPU; on CUDA the frozen base is bf16 (full FT: fp32 master
    weights), the trainable weights stay fp32, and the forward runs under bf16 autocast (pair_loss). The reference
    is scored with the same weights dtype, so that at step 0 policy and reference are the same numbers (DPO = ln 2)."""
    return torch.bfloat16 if args.device.startswith("cuda") and not args.full_ft else torch.float32


def autocast_dtype(args):
    """bf16 autocast on CUDA, none on CPU: the forward's precision, for the reference and telemetry passes."""
    return torch.bfloat16 if args.device.startswith("cuda") else None


def train_round(args, k, prev, round_dir, pairs, image_root, ref):
    """DPO + λ·ICA from θ(k-1); returns the trained (merged) model, tokenizer and image config."""
    dev = args.device
    rank, nproc = dist.rank(), dist.size()
    base_dtype = weight_dtype(args)
    # Full fine-tuning under torchrun shards the model with FSDP (sena/dist.py): each rank loads it on the CPU and
    # keeps only its 1/N shard on the device; LoRA replicates the model and averages the adapter gradients.
    fsdp = args.full_ft and nproc > 1
    model, tok, image_cfg = load_pretrained(prev, dtype=base_dtype, device="cpu" if fsdp else dev)
    torch.manual_seed(args.seed * 1000 + k)
    if args.full_ft:
        for name, p in model.named_parameters():
            p.requires_grad = "vision_tower" not in name  # the vision tower stays frozen (official)
    else:
        apply_lora(model, args.lora_targets.split(","), r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout)
    if fsdp:
        dist.shard_model(model, mixed_precision=dev.startswith("cuda"))
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.999))
    model.train()

    order_rng = random.Random(args.seed * 1000 + k)
    order = []
    for _ in range(args.epochs):
        epoch = list(range(len(pairs)))
        order_rng.shuffle(epoch)
        order += epoch
    total = max(1, len(order) // args.batch_size)
    # Each rank takes an equal slice of every global batch, in micro-batches; gradients are then averaged over
    # ranks, so N processes take the same steps as one (tests/test_distributed.py).
    local = args.batch_size // nproc
    if local * nproc != args.batch_size or local % args.micro_batch_size:
        raise SystemExit(f"--batch-size {args.batch_size} must split into {nproc} processes x whole micro-batches "
                         f"of --micro-batch-size {args.micro_batch_size}")
    accum = local // args.micro_batch_size

    # Resume: a checkpoint of this round continues where it stopped; the data order is a function of the seed,
    # so the step number is the data position. log.jsonl keeps only the lines of steps before the resumed one.
    ckpt_dir = os.path.join(round_dir, "checkpoint")
    start, bad_steps = 0, 0
    os.makedirs(ckpt_dir, exist_ok=True)
    if os.path.exists(os.path.join(ckpt_dir, "latest.json")):
        start, bad_steps = load_checkpoint(ckpt_dir, model, opt)
        say(f"iter {k}: resuming from {ckpt_dir} at step {start}")
    log_path = os.path.join(round_dir, "log.jsonl")
    if rank == 0:
        kept = []
        if start and os.path.exists(log_path):
            kept = [line + "\n" for line in open_lines(log_path) if line.strip() and json.loads(line)["step"] < start]
        atomic_write_text(log_path, "".join(kept))
    log = open(log_path, "a") if rank == 0 else None
    t_start = time.time()
    for step in range(start, total):
        t0, ntok, stats, finite = time.time(), 0, {}, True
        lr = lr_at(step, total, args)
        for g in opt.param_groups:
            g["lr"] = lr
        mine = order[step * args.batch_size + rank * local:][:local]
        for m in range(accum):
            idx = mine[m * args.micro_batch_size:][: args.micro_batch_size]
            loss, st, n = pair_loss(model, [pairs[i] for i in idx], idx, ref, tok, image_root, image_cfg, args,
                                    check=step == 0 and m == 0)
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
            if bad_steps > args.max_bad_steps:
                save_checkpoint(ckpt_dir, model, opt, step, bad_steps)
                if log:
                    log.close()
                raise SystemExit(f"round {k}: {bad_steps} non-finite losses (> --max-bad-steps "
                                 f"{args.max_bad_steps}); stopped at step {step}, checkpoint in {ckpt_dir}")
            continue
        if not fsdp:  # FSDP has reduce-scattered the averaged gradients during backward
            dist.average_gradients(params)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm).item()  # DTensors: the global norm
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
        if (step + 1) % args.save_every == 0 and step + 1 < total:
            save_checkpoint(ckpt_dir, model, opt, step, bad_steps)
    if log:
        log.close()
    say(f"iter {k}: {total - start} steps in {time.time() - t_start:.1f} s")
    if fsdp:
        model = dist.gather_model(model)  # θ(k) whole on rank 0's CPU, None on the other ranks
    elif not args.full_ft:
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
    save_file({n: v.contiguous() for n, v in weights.items()}, os.path.join(path, "trainable.safetensors"))
    state = {f"{i}.{k}": v.contiguous() for i, st in moments.items() for k, v in st.items()}
    state["torch_rng"] = torch.get_rng_state()  # LoRA dropout draws from it (on CUDA, from the device's generator;
    if torch.cuda.is_available():                # every rank seeds and draws alike, so rank 0's state is everyone's)
        state["cuda_rng"] = torch.cuda.get_rng_state()
    save_file(state, os.path.join(path, "optimizer.safetensors"))
    atomic_write_text(os.path.join(ckpt_dir, "latest.json"),
                      json.dumps({"dir": name, "step": step, "bad_steps": bad_steps}))
    for old in os.listdir(ckpt_dir):
        if old.startswith("step_") and old != name:
            shutil.rmtree(os.path.join(ckpt_dir, old), ignore_errors=True)
    dist.barrier()


def load_checkpoint(ckpt_dir, model, opt):
    """Restore the checkpoint latest.json names into the model and optimizer; returns (next step, bad steps)."""
    with open(os.path.join(ckpt_dir, "latest.json")) as f:
        state = json.load(f)
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
        raise SystemExit(f"cached reference log-probs differ from a live forward by {diff:.2e} > {tol:.1e}")
    say(f"reference check: cached vs live max |Δ logp| = {diff:.2e} (tol {tol:.1e})")


def run_round(args, k, world):
    run_dir = args.run_dir
    round_dir = os.path.join(run_dir, f"iter_{k}")
    out_model = os.path.join(round_dir, "model")
    if os.path.exists(os.path.join(round_dir, "meta.json")):
        say(f"round {k}: done already ({round_dir}/meta.json); skipping")
        return out_model
    prev = args.base if k == 1 else os.path.join(run_dir, f"iter_{k - 1}", "model")
    dist.barrier()  # θ0, pools and pairs are written by rank 0 or by all ranks together; nobody runs ahead
    if not os.path.exists(os.path.join(prev, "config.json")):  # round k-1 has meta.json (check_round_order)
        raise SystemExit(f"error: round {k} needs θ({k - 1}) at {prev}, which is missing; delete "
                         f"{os.path.join(run_dir, f'iter_{k - 1}')} and run: {command_for(args, k - 1)}"
                         if k > 1 else f"error: θ0 at {prev} is missing")
    os.makedirs(round_dir, exist_ok=True)
    t0 = time.time()
    pairs_path, pairs, image_root = prepare_data(args, k, prev, round_dir, world)
    if world and dist.rank() == 0:
        world_pair_scores(world, args.run_dir, k, round_dir, pairs)
    t_data = time.time()

    # Reference log-probs: once per round, keyed by the pairs' and the reference weights' hashes and the precision.
    ref_path = os.path.join(round_dir, "ref_logps.safetensors")
    precision = str(weight_dtype(args)).removeprefix("torch.") + ("+autocast" if autocast_dtype(args) else "")
    key = cache_key(pairs_path, prev, precision)
    if dist.rank() == 0 and not os.path.exists(ref_path):
        ref_model, tok, image_cfg = load_pretrained(prev, dtype=weight_dtype(args), device=args.device,
                                                    need_tokenizer=True)
        ref = score_pairs(ref_model, tok, image_cfg, pairs, image_root, args.micro_batch_size, args.device,
                          autocast_dtype(args))
        round_telemetry(args, k, round_dir, ref_model, tok, image_cfg, pairs, image_root, ref)  # before the cache,
        save_reference(ref_path, ref, key)  # whose presence means "done": a kill in between redoes both
        del ref_model
    dist.barrier()
    ref = load_reference(ref_path, key)
    t_ref = time.time()

    model, tok, image_cfg = train_round(args, k, prev, round_dir, pairs, image_root, ref)
    if dist.rank() != 0:
        dist.barrier()  # rank 0 saves θ(k), evaluates it and writes meta.json
        return out_model
    save_pretrained(model, out_model + ".tmp", tokenizer=tok, image_cfg=image_cfg)
    shutil.rmtree(out_model, ignore_errors=True)
    os.replace(out_model + ".tmp", out_model)  # θ(k) appears whole or not at all
    t_train = time.time()
    if world and not args.no_eval:
        evaluate.main(["--model", out_model, "--test-dir", os.path.join(run_dir, "test")])
    meta = {"round": k, "args": vars(args), "git_commit": git_commit(), "reference": prev,
            "inputs": {"pairs_sha256": sha256_file(pairs_path), "reference_cache_key": key},
            "seconds": {"data": round(t_data - t0, 1), "reference": round(t_ref - t_data, 1),
                        "train": round(t_train - t_ref, 1), "eval": round(time.time() - t_train, 1)}}
    atomic_write_text(os.path.join(round_dir, "meta.json"), json.dumps(meta, indent=2))
    shutil.rmtree(os.path.join(round_dir, "checkpoint"), ignore_errors=True)  # the round is done; θ(k) is saved
    dist.barrier()
    return out_model


def round_telemetry(args, k, round_dir, ref_model, tok, image_cfg, pairs, image_root, ref):
    """iter_k/telemetry.json (sena.telemetry): how often θ(k-1) already prefers chosen, and how much its chosen and
    rejected answers lean on the image, on --reliance-pairs pairs scored again on generate.py's noised image
    (the same noise only if the pairs came from this run's generate.py: same --seed and --noise-step)."""
    types = [p["type"] for p in pairs]
    tele = {"reference_prefers_chosen": reference_preference(ref, types)}
    if args.reliance_pairs:
        n = min(len(pairs), args.reliance_pairs)
        idx = sorted(random.Random(args.seed * 1000 + k).sample(range(len(pairs)), n))
        sub = [pairs[i] for i in idx]
        noised = score_pairs(ref_model, tok, image_cfg, sub, image_root, args.micro_batch_size, args.device,
                             autocast_dtype(args), noise=(args.noise_step, args.seed, k))
        tele["image_reliance"] = image_reliance({f: v[idx] for f, v in ref.items()}, noised, [types[i] for i in idx])
        tele["image_reliance_noise_step"] = args.noise_step
    atomic_write_text(os.path.join(round_dir, "telemetry.json"), json.dumps(tele, indent=2))
    say(summary_line(tele))


def world_pair_scores(world, run_dir, k, round_dir, pairs):
    """World runs only: the round's pairs against the pool's scene records (sena.world.bench.score_pairs), to
    iter_k/pair_scores.json and one line. SENA never reads these labels; they measure what its data teaches."""
    from sena.world.bench import score_pairs

    labels = os.path.join(run_dir, "labels", f"pool_iter_{k}.jsonl")
    if not os.path.isfile(labels):
        return
    s = score_pairs(pairs, {sc["image"]: sc for sc in world.load_scenes(labels)})
    atomic_write_text(os.path.join(round_dir, "pair_scores.json"), json.dumps(s, indent=2))
    say(f"round {k} pairs vs labels: chosen correct {s['chosen_correct']:.1%}, rejected wrong {s['rejected_wrong']:.1%}"
        f"; des naming absent buddies / other absent shapes: chosen {s['des_chosen_buddies']} / "
        f"{s['des_chosen_others']}, rejected {s['des_rejected_buddies']} / {s['des_rejected_others']}")


def world_pool(world, run_dir, k, n, seed):
    """Round k's fresh unlabeled world images; their scene records go to a folder SENA never reads from."""
    pool = os.path.join(run_dir, "pool", f"iter_{k}")
    if dist.rank() == 0 and (not os.path.isdir(pool) or len(os.listdir(pool)) < n):
        labels = os.path.join(run_dir, "labels", f"pool_iter_{k}.jsonl")
        os.makedirs(os.path.dirname(labels), exist_ok=True)
        world.write_split(pool, n, seed=seed * 1000 + k, prefix=f"pool{k}", labels_path=labels)
    dist.barrier()
    return pool


def main(argv=None):
    args = parse_args(argv)
    if args.threads and not args.device.startswith("cuda"):
        torch.set_num_threads(args.threads)
    dist.setup()
    world = None
    if args.base is None:
        from sena import world  # the embedded world: θ0, image pools and the labeled test set
    elif not (args.images or args.image_list):
        raise SystemExit("--base needs --images DIR or --image-list JSON")
    os.makedirs(args.run_dir, exist_ok=True)
    if world:  # θ0: a checked copy of the shipped one (or a fresh build) in the run directory; then just --base
        theta0 = os.path.join(args.run_dir, "theta0")
        if dist.rank() == 0:
            try:
                if args.rebuild_theta0:
                    world.build_theta0(theta0, seed=args.seed, device=args.device)
                else:
                    world.install_theta0(args.run_dir, args.theta0 or world.SHIPPED_THETA0)
            except (world.RecipeError, world.Theta0Error) as e:  # the message names the file and the fix
                raise SystemExit(f"error: {e}") from None
        args.base = theta0
        dist.barrier()
    rounds = [args.iter] if args.iter else list(range(1, args.n_iters + 1))
    t0 = time.time()
    if world and not args.no_eval and dist.rank() == 0 and not os.path.exists(os.path.join(args.base, "metrics.json")):
        evaluate.main(["--model", args.base, "--test-dir", os.path.join(args.run_dir, "test")])  # θ0's column
    for k in rounds:
        run_round(args, k, world)
        if dist.rank() == 0:
            evaluate.main(["report", args.run_dir])  # runs/<name>/report.html: pairs gallery, curves, table
    if world and not args.no_eval and dist.rank() == 0:
        models = [args.base] + [os.path.join(args.run_dir, f"iter_{k}", "model")
                                             for k in range(1, max(rounds) + 1)]
        evaluate.main(["--compare"] + [m for m in models if os.path.exists(m)])
    say(f"done in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    cli.run(main)
    dist.shutdown()
