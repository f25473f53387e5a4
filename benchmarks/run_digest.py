"""A digest of everything a small world run produces, to show that a change to the code changes no result.

    python -m benchmarks.run_digest --out /tmp/digest_a          # in one checkout
    python -m benchmarks.run_digest --out /tmp/digest_b          # in another (or after the change)
    diff /tmp/digest_a/digest.json /tmp/digest_b/digest.json   # empty: byte-identical behaviour

It builds a tiny θ0 (sena.world.build_theta0 at toy size, seed 3) and records its weights hash; then runs
`python train.py` for 2 rounds of 16 images from the shipped θ0 (seed 5, 1 thread) and records, per round, the
sha256 of pairs.jsonl, of θ(k)'s weights and of the reference cache, every step's loss, the hash of the generation
settings, and hashes of the benchmark metrics and the telemetry. About a minute on one core.
"""

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys

import torch

from sena.io import sha256_file
from sena.world import build_theta0

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(vision_hidden=32, vision_layers=2, vision_heads=2, text_hidden=32, text_layers=1, text_heads=2,
            text_kv_heads=1, text_intermediate=64)
TINY_TRAIN = dict(steps=40, n_scenes=200, per_image=2, batch_size=8, vision_steps=20, vision_batch=8, warmup=4)
TRAIN_ARGS = ["--seed", "5", "--n-iters", "2", "--images-per-iter", "16", "--batch-size", "4", "--micro-batch-size",
              "2", "--gen-batch-size", "16", "--threads", "1", "--save-every", "3"]


def read_json(path):  # sena.io has one too; this file also runs on checkouts older than it
    with open(path) as f:
        return json.load(f)


def json_hash(obj):
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def digest(out):
    d = {"tiny_theta0_weights_sha256": read_json(os.path.join(out, "theta0", "meta.json"))["weights_sha256"]}
    m0 = read_json(os.path.join(out, "run", "theta0", "metrics.json"))
    m0.pop("meta")  # paths and seconds
    d["theta0/metrics"] = json_hash(m0)
    for k in (1, 2):
        r = os.path.join(out, "run", f"iter_{k}")
        d[f"iter_{k}/pairs.jsonl"] = sha256_file(os.path.join(r, "pairs.jsonl"))[:16]
        with open(os.path.join(r, "pairs.jsonl")) as f:
            d[f"iter_{k}/n_pairs"] = sum(1 for _ in f)
        d[f"iter_{k}/model.safetensors"] = sha256_file(os.path.join(r, "model", "model.safetensors"))[:16]
        d[f"iter_{k}/ref_logps"] = sha256_file(os.path.join(r, "ref_logps.safetensors"))[:16]
        with open(os.path.join(r, "log.jsonl")) as f:
            d[f"iter_{k}/losses"] = [round(json.loads(line)["loss"], 10) for line in f]
        m = read_json(os.path.join(r, "model", "metrics.json"))
        m.pop("meta")
        d[f"iter_{k}/metrics"] = json_hash(m)
        d[f"iter_{k}/report_inputs"] = read_json(os.path.join(r, "report.json"))["inputs"]["settings"]
        d[f"iter_{k}/telemetry"] = json_hash(read_json(os.path.join(r, "telemetry.json")))
    return d


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="work folder (emptied first); digest.json is written inside")
    args = p.parse_args(argv)
    out = os.path.abspath(args.out)
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    torch.set_num_threads(1)
    build_theta0(os.path.join(out, "theta0"), seed=3, threads=1, log_every=0, model_over=TINY, evaluate=False,
                 **TINY_TRAIN)
    with open(os.path.join(out, "train.log"), "w") as log:
        subprocess.run([sys.executable, "train.py", "--run-dir", os.path.join(out, "run"), *TRAIN_ARGS], cwd=ROOT,
                       stdout=log, stderr=subprocess.STDOUT, check=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    d = digest(out)
    with open(os.path.join(out, "digest.json"), "w") as f:
        json.dump(d, f, indent=1)
    print(json.dumps(d, indent=1))


if __name__ == "__main__":
    main()
