"""SENA self-evolution: round k turns θ(k-1) into θ(k) with DPO + λ·ICA on the model's own preference pairs.

    python train.py                 # the embedded world: the shipped θ0, rounds 1..3, the table
    python train.py --iter 2        # one round (round 1 must exist); then --iter 3, ...
    python train.py --base /models/llava-1.5-7b-hf --images /data/coco --iter 1 --run-dir runs/coco

Each round (sena/rounds.py) writes runs/<name>/iter_<k>/: pairs.jsonl + report.json (the self-play stages),
ref_logps.safetensors (the reference log-probs, once), log.jsonl (one line per step), model/ (θ(k), a Hugging Face
LLaVA directory), metrics.json (world runs) and meta.json (arguments, input hashes, git commit).

Loss of a batch of B pairs (DPO plus λ times the image-content alignment NLL of the chosen descriptions):
    L = mean_b[-log σ(β·((log π(c) - log π(r)) - (log π_ref(c) - log π_ref(r))))] + λ · ICA
    ICA = mean_b[des_b · (-(1/|c|)·log π(c))]      (--ica-reduction batch, official)
        = the same sum / number of des pairs        (--ica-reduction des)
"""

import os
import sys

import torch

from sena import cli, dist, flags
from sena.rounds import check_round_order, run


def parse_args(argv):
    p = flags.add(cli.Parser(prog="train.py", description=__doc__), flags.train_flags())
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


def main(argv=None):
    args = parse_args(argv)
    if args.threads and not args.device.startswith("cuda"):
        torch.set_num_threads(args.threads)
    run(args)


def cli_main():
    """The console script `sena-train` (pip install .), the same as `python train.py`."""
    cli.run(main)
    dist.shutdown()


if __name__ == "__main__":
    cli_main()
