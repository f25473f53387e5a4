"""DPO training throughput (pairs/s) and peak memory: train.py's loop vs TRL's DPOTrainer + PEFT LoRA.

    python -m benchmarks.bench_train                      # batch 8, 24 steps, 1 thread; ~1 min
    pip install -c constraints.txt -r requirements-bench.txt   # TRL and PEFT, benchmark-only

Same ~5M LLaVA weights (our save_pretrained directory, which transformers loads), same pairs and images, same batch
size and number of steps, LoRA r=16 α=32 on the language model's seven Linear kinds for both, fp32, no activation
checkpointing, β=0.1. Every contender runs in its own subprocess, so its peak RSS is its own.
  ours           sena.trainer.train_round (train.py's loop as it is): shared-prefix forward, answer-only LM head, the
                 reference read from the cache (sena.refcache.reference_logps, timed separately and added in "+ref")
  ours-plain     the same loop with the duplicated chosen/rejected forward and full logits (sena.batch.plain_*)
  ours-lora-patch  ours with the LoRA scaling applied to the r-wide activation (a proposed sena/lora.py change)
  trl            DPOTrainer(peft_config=LoRA) from the same directory: recomputes the reference (adapters off) every
                 step, as it must for image data (precompute_ref_log_probs is refused for vision datasets)
"""

import argparse
import json
import os
import shutil
import statistics
import time

from benchmarks import common

HERE = os.path.dirname(os.path.abspath(__file__))

LORA = dict(r=16, alpha=32, targets="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", type=int, default=8, help="pairs per optimizer step (no accumulation)")
    p.add_argument("--steps", type=int, default=24, help="optimizer steps per contender")
    p.add_argument("--threads", type=int, default=1, help="torch threads per contender (the machine is shared)")
    p.add_argument("--repeats", type=int, default=1, help="runs per contender (median reported)")
    p.add_argument("--work-dir", default="/tmp/sena_bench", help="where model, images and pairs go")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def setup(args):
    """Model dir, image folder and round dir with pairs.jsonl for batch_size * steps pairs."""
    import torch  # noqa: F401

    n_pairs = args.batch_size * args.steps
    model = common.model_dir(os.path.join(args.work_dir, "model"))
    imgs = common.images(os.path.join(args.work_dir, "images"), (n_pairs + 1) // 2)
    round_dir = os.path.join(args.work_dir, f"train_{n_pairs}")
    shutil.rmtree(os.path.join(round_dir, "checkpoint"), ignore_errors=True)  # train.py would resume from it
    os.makedirs(round_dir, exist_ok=True)
    with open(os.path.join(round_dir, "pairs.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in common.pairs((n_pairs + 1) // 2)[:n_pairs])
    with open(os.path.join(round_dir, "report.json"), "w") as f:
        json.dump({"image_root": os.path.abspath(imgs)}, f)
    return model, imgs, round_dir


def lora_scale_inside(self, x):
    """Proposed sena/lora.py LoRALinear.forward: α/r scales the r-wide inner activation, not the out-wide result
    (same math; one full-width multiply fewer forward and backward per adapted Linear)."""
    out = self.base_layer(x)
    if self.disabled:
        return out
    z = self.lora_dropout(x).to(self.lora_A.weight.dtype)
    return out + self.lora_B(self.lora_A(z) * self.scaling).to(out.dtype)


def child_ours(args, plain, lora_patch=False):
    import torch

    torch.set_num_threads(args.threads)
    from sena import batch, refcache, trainer
    from sena.lora import LoRALinear

    if lora_patch:
        LoRALinear.forward = lora_scale_inside
    from sena.checkpoint import load_pretrained
    from sena.io import read_jsonl
    from sena.settings import train_settings

    if plain:  # the duplicated layout everywhere: reference pass, live check and training steps
        trainer.pair_batch, trainer.pair_logps = batch.plain_pair_batch, batch.plain_pair_logps
        refcache.pair_batch, refcache.pair_logps = batch.plain_pair_batch, batch.plain_pair_logps
    import transformers  # noqa: F401  (load_pretrained reads the tokenizer through it: import outside the timing)

    model_dir, imgs, round_dir = setup(args)
    pairs, _ = read_jsonl(os.path.join(round_dir, "pairs.jsonl"))
    ref_model, tok, image_cfg = load_pretrained(model_dir)  # loading is not timed (TRL's is not either)
    t0 = time.perf_counter()
    ref = refcache.reference_logps(ref_model, tok, image_cfg, pairs, imgs, args.batch_size)
    del ref_model
    t_ref = time.perf_counter() - t0
    settings = train_settings(epochs=1, batch_size=args.batch_size, micro_batch_size=args.batch_size,
                              lora_r=LORA["r"], lora_alpha=float(LORA["alpha"]), lora_targets=LORA["targets"],
                              device="cpu", warmup_ratio=0.0)
    t0 = time.perf_counter()
    trainer.train_round(settings, 1, model_dir, round_dir, pairs, imgs, ref)
    t_train = time.perf_counter() - t0
    with open(os.path.join(round_dir, "log.jsonl")) as f:
        steps = [json.loads(line) for line in f]
    tokens = sum(s["tokens_per_s"] for s in steps) / len(steps)
    return {"train_s": t_train, "ref_s": t_ref, "steps": len(steps), "pairs": len(steps) * args.batch_size,
            "step0_dpo": steps[0]["dpo"], "mean_tokens_per_s": tokens, "peak_rss_mb": common.peak_rss_mb()}


def child_trl(args):
    import torch

    torch.set_num_threads(args.threads)
    import transformers
    from datasets import Dataset
    from peft import LoraConfig
    from PIL import Image
    from transformers import AutoTokenizer, LlavaForConditionalGeneration, LlavaProcessor
    from trl import DPOConfig, DPOTrainer

    from sena.chat import prompt_text
    from sena.io import read_jsonl

    transformers.utils.logging.set_verbosity_error()
    model_dir, imgs, round_dir = setup(args)
    pairs, _ = read_jsonl(os.path.join(round_dir, "pairs.jsonl"))
    tok = AutoTokenizer.from_pretrained(model_dir)
    # num_additional_image_tokens=1: the processor then expands <image> to 64 tokens, as our encode_prompt does.
    processor = LlavaProcessor.from_pretrained(model_dir, tokenizer=tok, patch_size=8, num_additional_image_tokens=1,
                                               vision_feature_select_strategy="default", image_token="<image>")
    model = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32)
    # Same text as sena.chat: "<s>" + v1 prompt; answers " answer</s>" (the collator adds no special tokens).
    ds = Dataset.from_list([{"images": [Image.open(os.path.join(imgs, p["image"])).convert("RGB")],
                             "prompt": tok.bos_token + prompt_text(p["prompt"]),
                             "chosen": " " + p["chosen"].strip() + tok.eos_token,
                             "rejected": " " + p["rejected"].strip() + tok.eos_token} for p in pairs])
    lora = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=0.0,
                      target_modules=r".*language_model.*\.(" + LORA["targets"].replace(",", "|") + ")")
    cfg = DPOConfig(output_dir=os.path.join(args.work_dir, "trl_out"), per_device_train_batch_size=args.batch_size,
                    max_steps=args.steps, learning_rate=1e-3, lr_scheduler_type="constant", beta=0.1,
                    loss_type=["sigmoid"], gradient_checkpointing=False, bf16=False, fp16=False, use_cpu=True,
                    report_to=[], logging_steps=10**6, save_strategy="no", max_length=None, seed=0,
                    dataloader_num_workers=0, disable_tqdm=True)
    trainer = DPOTrainer(model=model, args=cfg, train_dataset=ds, processing_class=processor, peft_config=lora)
    batch = trainer.data_collator([dict(ds[i]) for i in range(args.batch_size)])
    tokens = int(batch["attention_mask"].sum())
    t0 = time.perf_counter()
    out = trainer.train()
    t_train = time.perf_counter() - t0
    return {"train_s": t_train, "steps": out.global_step, "pairs": out.global_step * args.batch_size,
            "tokens_first_batch": tokens, "peak_rss_mb": common.peak_rss_mb()}


def main(argv=None):
    args = parse_args(argv)
    if args.child:
        res = child_trl(args) if args.child == "trl" else child_ours(args, plain=args.child == "ours-plain",
                                                                    lora_patch=args.child == "ours-lora-patch")
        print(json.dumps(res))
        return res
    setup(args)  # build once, outside the timed children
    flags = ["--batch-size", str(args.batch_size), "--steps", str(args.steps), "--threads", str(args.threads),
             "--work-dir", args.work_dir]
    runs = {k: [] for k in ("ours", "ours-lora-patch", "ours-plain", "trl")}
    for _ in range(args.repeats):  # interleaved, so load changes on the shared machine hit all contenders
        for name in runs:
            runs[name].append(common.run_child("benchmarks.bench_train", flags + ["--child", name]))
            print(f"{name}: {runs[name][-1]}", flush=True)

    def med(name, key):
        return statistics.median(r[key] for r in runs[name])

    pairs = args.batch_size * args.steps
    trl_rate = pairs / med("trl", "train_s")
    rows = []
    for name, label, secs in (("ours", "ours (train.py loop)", med("ours", "train_s")),
                              ("ours", "ours + reference pass", med("ours", "train_s") + med("ours", "ref_s")),
                              ("ours-lora-patch", "ours + proposed lora.py patch", med("ours-lora-patch", "train_s")),
                              ("ours-plain", "ours-plain (duplicated prompt, full logits)",
                               med("ours-plain", "train_s")),
                              ("ours-plain", "ours-plain + reference pass",
                               med("ours-plain", "train_s") + med("ours-plain", "ref_s")),
                              ("trl", "TRL DPOTrainer + PEFT LoRA", med("trl", "train_s"))):
        rate = pairs / secs
        rows.append([label, f"{secs:.2f}", f"{rate:.1f}", f"{rate / trl_rate:.2f}x", f"{med(name, 'peak_rss_mb'):.0f}"])
    print(f"\nDPO training: {pairs} pairs = {args.steps} steps x batch {args.batch_size}, LoRA r={LORA['r']} on the "
          f"LLM, fp32, {args.threads} thread(s), ~5M LLaVA (64 image tokens)")
    md = common.table(rows, ["contender", "seconds", "pairs/s", "vs TRL", "peak RSS MB"])
    common.write_json("train.json", {"machine": common.machine(), "args": vars(args), "runs": runs, "table": md})


if __name__ == "__main__":
    main()
