"""How a SENA round's time grows with the number of images, stage by stage (100 / 200 / 400 images).

    python -m benchmarks.bench_round                      # ~3 min on 1 thread
    python -m benchmarks.bench_round --sizes 50,100 --max-new-tokens 8

Each stage runs the project's own code on the benchmark's random ~5M LLaVA:
  images     load, preprocess and diffusion-noise every image (generate.py's loop)
  vision     clean and noised features, once per image (sena.selfplay.encode_images)
  generate   the eight prompts per image through generate.run_prompts (sorted, batched, as generate.py runs them):
             ask, self-check, des/gen on clean and on noised features, two self-enhancement rewrites
  reference  sena.refcache.reference_logps on the round's pairs (one des + one gen pair per image)
  train      sena.trainer.train_round on those pairs (LoRA r=16, batch 16, 1 epoch)
A random model writes no '?' so generate.main would keep no question; the stages are therefore fed fixed prompts and
pairs of SENA's shape instead of the model's own text (same token counts, same code paths). Answers run to
--max-new-tokens (no EOS from a random model), an upper bound on a trained model's generation time.
"""

import argparse
import os
import shutil
import sys
import time

import torch

from benchmarks import common
from sena import prompts
from sena.checkpoint import load_pretrained
from sena.image import load_image, preprocess
from sena.noise import add_diffusion_noise, noise_generator
from sena.refcache import reference_logps
from sena.selfplay import Stages, encode_images, run_prompts
from sena.settings import generation_settings, train_settings
from sena.trainer import train_round


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="100,200,400", help="comma-separated numbers of images per round")
    p.add_argument("--max-new-tokens", type=int, default=16, help="generation limit per answer, in tokens")
    p.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared: 1)")
    p.add_argument("--work-dir", default="/tmp/sena_bench", help="where the model, images and rounds go")
    return p.parse_args(argv)


def one_round(model_dir, img_dir, n, args):
    secs = {}
    model, tok, image_cfg = load_pretrained(model_dir)
    model.eval()
    t = time.perf_counter()
    names = sorted(os.listdir(img_dir))[:n]
    clean = [preprocess(load_image(os.path.join(img_dir, f)), image_cfg) for f in names]
    noised = [add_diffusion_noise(x, 600, generator=noise_generator(0, f, 1)) for x, f in zip(clean, names)]
    secs["images"] = time.perf_counter() - t

    round_dir = os.path.join(args.work_dir, f"round_{n}")
    shutil.rmtree(round_dir, ignore_errors=True)  # run_prompts resumes from its stage files: start clean
    os.makedirs(round_dir)
    t = time.perf_counter()
    gen = generation_settings(batch_size=64, max_new_tokens=args.max_new_tokens)
    stages = Stages(gen, 1, os.path.join(round_dir, "stages"), "bench", None)
    cf = encode_images(model, torch.stack(clean), 64)
    nf = encode_images(model, torch.stack(noised), 64)
    secs["vision"] = time.perf_counter() - t

    t = time.perf_counter()
    rows = common.round_prompts(n)  # per image: ask, self-check, des, gen, improve
    users = [[u for i, u in rows[k::5]] for k in range(5)]
    with torch.no_grad():
        for j, (k, feats) in enumerate(((0, cf), (1, cf), (2, cf), (3, cf), (2, nf), (3, nf), (4, cf), (4, cf))):
            run_prompts(model, tok, feats, users[k], stages, f"stage{j}", names)
    secs["generate"] = time.perf_counter() - t

    pairs = common.pairs(n)
    t = time.perf_counter()
    ref = reference_logps(model, tok, image_cfg, pairs, img_dir, 16)
    secs["reference"] = time.perf_counter() - t

    train = train_settings(epochs=1, batch_size=16, micro_batch_size=16, device="cpu")
    t = time.perf_counter()
    train_round(train, 1, model_dir, round_dir, pairs, img_dir, ref)
    secs["train"] = time.perf_counter() - t
    return secs


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    sizes = [int(s) for s in args.sizes.split(",")]
    model_dir = common.model_dir(os.path.join(args.work_dir, "model"))
    img_dir = common.images(os.path.join(args.work_dir, "images"), max(sizes))
    load_pretrained(model_dir)  # imports (transformers for the tokenizer, diffusers for the noise) outside timing
    add_diffusion_noise(torch.zeros(3, 8, 8), 600, generator=noise_generator(0, "warm-up", 1))
    res = {}
    for n in sizes:
        res[n] = one_round(model_dir, img_dir, n, args)
        print(f"{n} images: " + ", ".join(f"{k} {v:.1f}s" for k, v in res[n].items()), file=sys.stderr)
    stages = list(res[sizes[0]])
    rows = []
    for n in sizes:
        total = sum(res[n].values())
        per = total / n
        rows.append([n] + [f"{res[n][s]:.1f}" for s in stages] + [f"{total:.1f}", f"{1000 * per:.0f}",
                                                                  f"{total / sum(res[sizes[0]].values()):.2f}x"])
    print(f"\none round by stage (seconds), random ~5M LLaVA, 8 prompts/image, max_new_tokens {args.max_new_tokens},"
          f" 2 pairs/image, 1 epoch, {args.threads} thread(s); prompts: {len(prompts.DESCRIBE_PROMPTS)} des variants")
    md = common.table(rows, ["images"] + stages + ["total", "ms/image", f"total vs {sizes[0]}"])
    common.write_json("round_scaling.json", {"machine": common.machine(), "args": vars(args), "seconds": res,
                                             "table": md})


if __name__ == "__main__":
    main()
