"""Generate one SENA round's preference pairs from a model θ(k-1) and unlabeled images.

    python generate.py --model runs/world/theta0 --images runs/world/pool/iter_1 --out runs/world/iter_1 --round 1
    python generate.py --model M --image-list llava_v1_5_mix665k.json --image-root /data --per-source 1200 --out D
        (the official runs' pool: 1.2K images from each of coco, gqa, ocr_vqa, textvqa, vg; sena.io.read_image_list)

Runs the self-play stages of sena/selfplay.py on every image: self-questioning with the self-check, answers on the
clean and on a diffusion-noised copy of the image, self-enhancement of the clean answers, the pair filters. Writes
pairs.jsonl (`prompt`/`chosen`/`rejected`/`images`, the fields TRL's preference datasets read) and report.json
(counts per stage and filter). A killed run resumes from <out>/stages/. Reads images only; needs no labels.
"""

import torch

from sena import cli, dist, flags
from sena.selfplay import generate_round
from sena.settings import generation_settings, image_source


def parse_args(argv):
    p = flags.add(cli.Parser(prog="generate.py", description=__doc__), flags.generate_flags())
    args = p.parse_args(argv)
    if bool(args.images) == bool(args.image_list):
        p.error("give one of --images DIR or --image-list JSON")
    if args.image_list is None and (args.per_source is not None or args.image_root):
        p.error("--per-source and --image-root go with --image-list")
    return args


def main(argv=None):
    args = parse_args(argv)
    settings = generation_settings(args)
    if settings.threads and not settings.device.startswith("cuda"):
        torch.set_num_threads(settings.threads)
    return generate_round(settings, args.model, image_source(args), args.out, args.round)


def cli_main():
    """The console script `sena-generate` (pip install .), the same as `python generate.py`."""
    cli.run(main)
    dist.shutdown()


if __name__ == "__main__":
    cli_main()
