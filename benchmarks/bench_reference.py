"""Reference-scoring pass (pairs/s): sena.refcache.reference_logps vs the plain pass it replaced.

    python -m benchmarks.bench_reference                  # 256 pairs (128 images), batch 16, 1 thread

  plain  per batch: every pair's image through CLIP, prompt+chosen and prompt+rejected as two rows, logits over the
         whole vocabulary at every position, then log-softmax (the released code's way, and ours before)
  ours   reference_logps: each image of a batch encoded once, one shared-prefix row per pair, the last layer and the LM
         head only where answer tokens are scored
Both on the ~5M LLaVA with the tokenizer's 149-token vocabulary and again with Vicuna's 32064 (LM head weighs as in
a real model); the two passes must agree to 1e-4.
"""

import argparse
import os
import statistics
import time

import torch

from benchmarks import common
from sena.batch import load_pixels, plain_pair_batch, plain_pair_logps, tokenize_pair
from sena.checkpoint import load_pretrained
from sena.refcache import FIELDS, reference_logps


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-images", type=int, default=128, help="images (2 pairs each)")
    p.add_argument("--batch-size", type=int, default=16, help="pairs per forward")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats (median reported)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared: 1)")
    p.add_argument("--work-dir", default="/tmp/sena_bench", help="where models and images go")
    return p.parse_args(argv)


@torch.no_grad()
def plain_score(model, tok, image_cfg, pairs, image_root, batch_size):
    out = {f: [] for f in FIELDS}
    for s in range(0, len(pairs), batch_size):
        chunk = pairs[s : s + batch_size]
        batch = plain_pair_batch([tokenize_pair(tok, model.config, p) for p in chunk], tok.pad_token_id)
        values = plain_pair_logps(model, batch, model.encode_images(load_pixels(chunk, image_root, image_cfg)))
        for f, v in zip(FIELDS, values):
            out[f].append(v)
    return {f: torch.cat(v) for f, v in out.items()}


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    imgs = common.images(os.path.join(args.work_dir, "images"), args.n_images)
    pairs = common.pairs(args.n_images)
    rows, res = [], {}
    for vocab in (None, 32064):
        path = common.model_dir(os.path.join(args.work_dir, f"model_v{vocab or 'tok'}"), vocab_size=vocab)
        model, tok, image_cfg = load_pretrained(path)
        model.eval()
        V = model.config.text.vocab_size
        fns = {"plain": plain_score, "ours": reference_logps}
        times, out = {k: [] for k in fns}, {}
        for _ in range(args.repeats):  # interleaved against load changes on the shared machine
            for name, fn in fns.items():
                t0 = time.perf_counter()
                out[name] = fn(model, tok, image_cfg, pairs, imgs, args.batch_size)
                times[name].append(time.perf_counter() - t0)
        diff = max((out["ours"][f] - out["plain"][f]).abs().max().item() for f in FIELDS)
        assert diff < 1e-4, f"optimized reference pass differs from the plain one by {diff}"
        med = {k: statistics.median(v) for k, v in times.items()}
        for name in fns:
            rows.append([V, name, f"{med[name]:.2f}", f"{len(pairs) / med[name]:.1f}",
                         f"{med['plain'] / med[name]:.2f}x"])
        res[V] = {"seconds": times, "median_s": med, "max_abs_diff": diff}
    print(f"\nreference scoring: {len(pairs)} pairs ({args.n_images} images), batch {args.batch_size}, "
          f"{args.threads} thread(s), ~5M LLaVA")
    md = common.table(rows, ["vocab", "pass", "seconds", "pairs/s", "speedup vs plain"])
    common.write_json("reference.json", {"machine": common.machine(), "args": vars(args), "results": res,
                                         "table": md})


if __name__ == "__main__":
    main()
