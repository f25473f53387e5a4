"""Generation throughput (sequences/s) on one SENA round's prompts: ours vs transformers vs one sample at a time.

    python -m benchmarks.bench_generation --n-images 64   # 64 images x 8 prompts, 24 new tokens, 1 thread, ~4 min
    python -m benchmarks.bench_generation --model runs/world/theta0 --images runs/world/pool/iter_1

Workload per image, as generate.py runs it: ask, self-check, des + gen on the clean image, des + gen on a second
("noised") image, two self-enhancement prompts; each stage is sorted by prompt length and cut into batches of
--batch-size, exactly as generate.run_prompts does. Contenders, all greedy on the same weights:
  ours           sena.generation.generate with image features computed once per image (generate.py's way),
                 shared prefix and finished-row compaction on
  ours-plain     the same without shared prefix / compaction (what each of the two saves)
  ours-prefix-cache  ours with one prefix_cache dict across the stages (the generate.py patch): system text
                 and image keys/values computed once per image per round, each later prompt prefills its own text only
  hf-batched     transformers' LlavaForConditionalGeneration.generate on the same batches, pixel_values per batch
  one-at-a-time  the released code's loop: one prompt per generate call, its image through CLIP every call (run on
                 every --loop-every'th prompt in each repeat and scaled up: its cost per prompt is independent)
Every contender must return the same tokens as ours (checked), so they do the same work. A random model never
says EOS, so every answer runs to --max-new-tokens; with a trained θ0 (--model) answers stop early.
"""

import argparse
import os
import statistics
import time

import torch

from benchmarks import common
from sena.chat import encode_prompt
from sena.checkpoint import load_pretrained
from sena.generation import generate
from sena.image import load_image, preprocess


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="HF LLaVA dir (default: the benchmark's random ~5M LLaVA)")
    p.add_argument("--images", default=None, help="image folder (default: random benchmark images)")
    p.add_argument("--n-images", type=int, default=16, help="images in the round (8 prompts each)")
    p.add_argument("--max-new-tokens", type=int, default=24, help="generation limit per answer, in tokens")
    p.add_argument("--batch-size", type=int, default=64, help="prompts per batch (generate.py's default)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per contender; the median is reported")
    p.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared: 1)")
    p.add_argument("--work-dir", default="/tmp/sena_bench", help="where the random model and images go")
    p.add_argument("--skip-loop", action="store_true", help="skip the slow one-at-a-time contender")
    p.add_argument("--loop-every", type=int, default=4,
                   help="the one-at-a-time loop runs every k-th prompt of each stage, timed x k (it is ~10x slower)")
    return p.parse_args(argv)


def stages(tok, cfg, n_images):
    """[(image index, prompt ids)] per stage; images n..2n-1 stand in for the noised copies."""
    rows = common.round_prompts(n_images)  # 5 per image: ask, check, des, gen, improve

    def enc(u):
        return encode_prompt(tok, u, cfg.n_image_tokens, cfg.image_token_index)

    out = []
    for k in range(5):
        out.append([(i, enc(u)) for i, u in rows[k::5]])
        if k in (2, 3):  # des and gen again on the noised image
            out.append([(i + n_images, enc(u)) for i, u in rows[k::5]])
    return out + [[(i, enc(u)) for i, u in rows[4::5]]]  # the second enhancement prompt (gen answer)


def batches(stage, batch_size):
    order = sorted(range(len(stage)), key=lambda j: len(stage[j][1]))
    return [[stage[j] for j in order[s : s + batch_size]] for s in range(0, len(order), batch_size)]


def run_ours(model, pixels, work, args, **kw):
    feats = torch.cat([model.encode_images(pixels[s : s + 64]) for s in range(0, len(pixels), 64)])  # once per image
    out = []
    for stage in work:
        for b in batches(stage, args.batch_size):
            out += generate(model, [p for _, p in b], image_features=feats[[i for i, _ in b]],
                            max_new_tokens=args.max_new_tokens, eos_token_id=2, pad_token_id=3, **kw)
    return out


def run_ours_cached(model, pixels, work, args):
    """Ours with one prefix cache kept across the round's stages (the generate.py patch): the system text and each
    image's keys and values are computed at the first stage that sees the image and reused by all later ones."""
    return run_ours(model, pixels, work, args, prefix_cache={})


def run_hf(hf, pixels, work, args, pad_id, eos_id):
    out = []
    for stage in work:
        for b in batches(stage, args.batch_size):
            T = max(len(p) for _, p in b)
            ids = torch.tensor([[pad_id] * (T - len(p)) + p for _, p in b])
            mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for _, p in b])
            gen = hf.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels[[i for i, _ in b]],
                              max_new_tokens=args.max_new_tokens, do_sample=False, eos_token_id=eos_id,
                              pad_token_id=pad_id)
            out += [strip(g[T:].tolist(), eos_id, pad_id) for g in gen]
    return out


def run_loop(hf, pixels, work, args, pad_id, eos_id):
    """One generate call per prompt, on every --loop-every'th prompt (its cost per prompt does not depend on the
    others, so the subset's seconds are scaled up to the whole workload)."""
    out = []
    for stage in work:
        for i, p in stage[:: args.loop_every]:  # one prompt, one image through CLIP, per call
            gen = hf.generate(input_ids=torch.tensor([p]), pixel_values=pixels[i : i + 1],
                              max_new_tokens=args.max_new_tokens, do_sample=False, eos_token_id=eos_id,
                              pad_token_id=pad_id)
            out.append(strip(gen[0, len(p):].tolist(), eos_id, pad_id))
    return out


def strip(toks, eos_id, pad_id):
    return toks[: toks.index(eos_id)] if eos_id in toks else toks


def flat_order(work, batch_size):
    """The prompts in the order run_ours / run_hf return them, for comparing with the loop's order."""
    return [p for stage in work for b in batches(stage, batch_size) for p in b]


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers import LlavaForConditionalGeneration
    from transformers.utils import logging

    logging.set_verbosity_error()
    path = args.model or common.model_dir(os.path.join(args.work_dir, "model"))
    img_dir = args.images or common.images(os.path.join(args.work_dir, "images"), 2 * args.n_images)
    model, tok, image_cfg = load_pretrained(path)
    model.eval()
    hf = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    names = sorted(os.listdir(img_dir))[: 2 * args.n_images]
    pixels = torch.stack([preprocess(load_image(os.path.join(img_dir, n)), image_cfg) for n in names])
    work = stages(tok, model.config, args.n_images)
    n_seq = sum(len(s) for s in work)
    eos_id, pad_id = tok.eos_token_id, tok.pad_token_id

    contenders = {"ours": lambda: run_ours(model, pixels, work, args),
                  "ours-plain": lambda: run_ours(model, pixels, work, args, share_prefix=False, compact=False),
                  "ours-prefix-cache": lambda: run_ours_cached(model, pixels, work, args),
                  "hf-batched": lambda: run_hf(hf, pixels, work, args, pad_id, eos_id)}
    if not args.skip_loop:
        contenders["one-at-a-time"] = lambda: run_loop(hf, pixels, work, args, pad_id, eos_id)
    times, outputs = {k: [] for k in contenders}, {}
    with torch.no_grad():
        for _ in range(args.repeats):  # interleaved, so load changes on the shared machine hit all contenders
            for name, fn in contenders.items():
                t0 = time.perf_counter()
                outputs[name] = fn()
                times[name].append(time.perf_counter() - t0)
                if name == "one-at-a-time":  # a subset of the prompts: scale to the whole workload
                    times[name][-1] *= n_seq / len(outputs[name])
    # Same work: the batched contenders return the same tokens as ours; the loop too once reordered.
    for name in ("ours-plain", "ours-prefix-cache", "hf-batched"):
        assert outputs[name] == outputs["ours"], f"{name} generated different tokens from ours"
    if "one-at-a-time" in outputs:
        loop = {id(p): o for (_, p), o in zip([x for s in work for x in s[:: args.loop_every]],
                                               outputs["one-at-a-time"])}
        ours = {id(p): o for (_, p), o in zip(flat_order(work, args.batch_size), outputs["ours"])}
        assert all(ours[k] == o for k, o in loop.items()), "the one-at-a-time loop generated different tokens"
    new_tokens = sum(len(o) for o in outputs["ours"])
    med = {k: statistics.median(v) for k, v in times.items()}
    rows = [[k, f"{med[k]:.2f}", f"{n_seq / med[k]:.1f}", f"{med[k] / med['ours']:.2f}x"] for k in contenders]
    print(f"\ngeneration: {n_seq} sequences ({args.n_images} images x 8 prompts), {new_tokens} new tokens, "
          f"batch {args.batch_size}, max_new_tokens {args.max_new_tokens}, {args.threads} thread(s), "
          f"model {'random ~5M' if args.model is None else args.model}")
    md = common.table(rows, ["contender", "seconds (median)", "sequences/s", "ours is faster by"])
    common.write_json("generation.json", {"machine": common.machine(), "args": vars(args), "sequences": n_seq,
                                          "new_tokens": new_tokens, "seconds": times, "median_s": med,
                                          "speedup_vs": {k: med[k] / med["ours"] for k in med}, "table": md})


if __name__ == "__main__":
    main()
