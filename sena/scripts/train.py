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

import sys

import torch

from sena import cli, dist, flags
from sena.cli import UserError
from sena.rounds import check_round_order, run
from sena.settings import RunSettings, run_settings


def parse_args(argv) -> RunSettings:
    """The run's settings from the command line. A bad flag, or flags that do not go together (run_settings), is
    refused with one line and exit status 2; a round whose previous one is missing, with a UserError."""
    p = flags.add(cli.Parser(prog="train.py", description=__doc__), flags.train_flags())
    argv = sys.argv[1:] if argv is None else list(argv)
    args = p.parse_args(argv)
    try:
        settings = run_settings(args, argv)  # argv: the commands that refusals suggest keep the user's own flags
    except UserError as e:
        p.error(str(e))
    check_round_order(settings)
    return settings


def main(argv=None):
    settings = parse_args(argv)
    if settings.generation.threads and not settings.generation.device.startswith("cuda"):
        torch.set_num_threads(settings.generation.threads)
    run(settings)


def cli_main():
    """The console script `sena-train` (pip install .), the same as `python train.py`."""
    cli.run(main)
    dist.shutdown()


if __name__ == "__main__":
    cli_main()
