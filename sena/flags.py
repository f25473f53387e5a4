"""Every flag of train.py, generate.py and evaluate.py --model, each defined once (type, default, help), with what
--ablation means.

A group is a list of (flag, argparse keywords). `add` puts a group on a parser; `defaults` gives the values argparse
parses when no flag is typed. sena/settings.py builds its frozen settings from the parsed flags, one field per flag.
Flags that train.py passes on to generation are one group (round_flags), so the two scripts cannot drift apart.
evaluate.py's subcommands (pope, amber, report) define their file arguments where they parse them.
"""

import argparse

from sena import cli, noise


def _default_device():
    import torch  # here, not at import: evaluate.py's file scorers do not need torch

    return "cuda" if torch.cuda.is_available() else "cpu"


IMAGES = [
    ("--images", dict(help="folder of unlabeled images (png/jpg/...), read in sorted order")),
    ("--image-list", dict(help="LLaVA-style JSON list of {'image': relative path}; paths under --image-root")),
    ("--image-root", dict(help="root folder for --image-list paths (default: the JSON's folder)")),
]

# What --ablation switches: name -> (self-check, self-enhancement, ICA). "image" keeps --self-check as given.
ABLATIONS = {"none": ("image", True, True), "no-sq": ("off", True, True), "no-se": ("image", False, True),
             "no-ica": ("image", True, False), "seva": ("off", False, False)}

# The language model's Linear layers (sena/model.py; LLaVA-1.5's Llama has the same names), which LoRA may adapt.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# Prompts per generation batch: generate.py's --batch-size and train.py's --gen-batch-size.
GEN_BATCH_SIZE = dict(type=cli.positive_int, default=64, help="prompts per generation batch")


def round_flags():
    """The flags of a round that train.py passes on to generation."""
    return [
        ("--seed", dict(type=cli.non_negative_int, default=0,
                        help="base seed of the run: the world, the noise, prompt draws, data order and LoRA init")),
        ("--self-check", dict(choices=["image", "text", "off"], default="image",
                              help="self-check turn with the image (paper), text-only (released code) or skipped "
                                   "(the no-sq ablation)")),
        ("--ask-temperature", dict(type=cli.non_negative_float, default=0.0,
                                   help="sample the self-asked question at this temperature, seeded per (seed, round, "
                                        "image); 0: greedy like every other stage")),
        ("--keep-yes-no", dict(action="store_true",
                               help="keep pairs whose answer is exactly Yes or No (the released code drops them)")),
        ("--noise-step", dict(type=cli.int_in(0, noise.STEPS - 1), default=noise.REJECTED_STEP,
                              help=f"diffusion step t of the rejected image, of the schedule's {noise.STEPS} "
                                   f"(0..{noise.STEPS - 1})")),
        ("--enhance-types", dict(choices=["des,gen", "gen"], default="des,gen", metavar="{des,gen | gen}",
                                 help="answers that self-enhancement rewrites: 'des,gen' both (paper), 'gen' the short "
                                      "answers only (descriptions stay raw)")),
        ("--threads", dict(type=cli.positive_int, default=None,
                           help="torch CPU threads (default: torch's choice; use 1 per process when runs share the "
                                "cores)")),
        ("--device", dict(type=cli.device, default=_default_device(), help="torch device")),
    ]


def train_flags():
    """train.py's flags: a SENA run, round after round."""
    return [
        *IMAGES,
        *round_flags(),
        ("--gen-batch-size", GEN_BATCH_SIZE),
        # Users type --iter, --n-iters and --images-per-iter (and find rounds in iter_<k>/); the code says round.
        ("--iter", dict(type=cli.positive_int, default=None, dest="round", metavar="ITER",
                        help="run only round k (default: rounds 1..--n-iters)")),
        ("--n-iters", dict(type=cli.positive_int, default=3, dest="n_rounds", metavar="N_ITERS",
                           help="number of rounds when --iter is not given")),
        ("--run-dir", dict(type=cli.directory, default="runs/world",
                           help="run directory; rounds go to <run-dir>/iter_<k>")),
        ("--base", dict(default=None, help="θ0 as a HF LLaVA dir, for real runs (default: the world's θ0)")),
        ("--images-per-iter", dict(type=cli.positive_int, default=400, dest="images_per_round",
                                   metavar="IMAGES_PER_ITER", help="fresh unlabeled images per round")),
        ("--theta0", dict(default=None, help="world θ0 directory to start from (default: the one the repository "
                                             "ships, sena/world/theta0)")),
        ("--rebuild-theta0", dict(action="store_true",
                                  help="build a fresh world θ0 from --seed in the run directory instead (python -m "
                                       "sena.world.build; about 25 minutes on 2 CPU cores)")),
        ("--ablation", dict(choices=list(ABLATIONS), default="none",
                            help="no-sq: no self-check; no-se: no self-enhancement; no-ica: λ=0; seva: all three off")),
        ("--beta", dict(type=cli.positive_float, default=0.1,
                        help="DPO β, the inverse temperature of the implicit reward (> 0)")),
        ("--dpop", dict(type=cli.non_negative_float, default=0.0,
                        help="ours, not SENA's: DPO-Positive μ, penalising a chosen log-prob below the reference "
                             "(0 = DPO)")),
        ("--ica-weight", dict(type=cli.non_negative_float, default=1.0,
                              help="λ, the weight of the image-content alignment NLL")),
        ("--ica-reduction", dict(choices=["batch", "des"], default="batch",
                                 help="average the ICA term over the whole batch (official) or over des pairs only")),
        ("--lr", dict(type=cli.positive_float, default=1e-4,
                      help="peak learning rate (world LoRA: 1e-4; 1e-3 collapses θ0. Official 7B full FT: 2e-6)")),
        ("--epochs", dict(type=cli.positive_int, default=2, help="passes over a round's pairs (official: 1)")),
        ("--batch-size", dict(type=cli.positive_int, default=16, help="pairs per optimizer step (official: 128)")),
        ("--micro-batch-size", dict(type=cli.positive_int, default=16,
                                    help="pairs per forward; steps accumulate gradients")),
        ("--schedule", dict(choices=["cosine", "constant"], default="cosine",
                            help="after warmup: cosine decay to 0, or constant (what the official DeepSpeed config "
                                 "does)")),
        ("--warmup-ratio", dict(type=cli.fraction, default=0.1, help="share of steps with linear warmup")),
        ("--weight-decay", dict(type=cli.non_negative_float, default=0.0, help="AdamW weight decay")),
        ("--max-grad-norm", dict(type=cli.positive_float, default=1.0, help="gradient clipping norm")),
        ("--full-ft", dict(action="store_true", help="full fine-tuning of LLM + projector instead of LoRA")),
        ("--lora-r", dict(type=cli.positive_int, default=16, help="LoRA rank (peers: 128 on 7B)")),
        ("--lora-alpha", dict(type=cli.positive_float, default=32.0, help="LoRA α (scale α/r)")),
        ("--lora-dropout", dict(type=cli.float_in(0, 1, hi_open=True), default=0.0,
                                help="dropout on the LoRA input")),
        ("--lora-targets", dict(type=cli.names_in(LORA_TARGETS), default=",".join(LORA_TARGETS),
                                help="comma-separated language-model Linear names to adapt")),
        ("--reliance-pairs", dict(type=cli.non_negative_int, default=256,
                                  help="pairs scored again on their noised image for the image-reliance telemetry "
                                       "(0: off)")),
        ("--no-eval", dict(action="store_true", help="skip the world benchmarks after each round")),
        ("--save-every", dict(type=cli.positive_int, default=50,
                              help="checkpoint trainable weights + optimizer every N steps")),
        ("--max-bad-steps", dict(type=cli.non_negative_int, default=10,
                                 help="skip a step with a non-finite loss; stop the run after this many")),
    ]


def generate_flags():
    """generate.py's flags: one round's pairs from θ(k-1) and unlabeled images."""
    return [
        ("--model", dict(required=True, help="Hugging Face LLaVA directory of θ(k-1)")),
        *IMAGES,
        ("--offset", dict(type=cli.non_negative_int, default=0,
                          help="skip this many images of the sorted list (rounds take disjoint slices)")),
        ("--num-images", dict(type=cli.positive_int, default=None, help="use at most this many images (default: all)")),
        ("--per-source", dict(type=cli.positive_int, default=None,
                              help="with --image-list: take this many images from each source (a path's first folder: "
                                   "coco, gqa, ocr_vqa, textvqa, vg in LLaVA-665K), seeded by --seed; --offset then "
                                   "counts per source")),
        ("--out", dict(type=cli.directory, required=True,
                       help="round directory; pairs.jsonl and report.json go here")),
        ("--round", dict(type=cli.positive_int, default=1, help="round index k; seeds the noise and prompt draws")),
        *round_flags(),
        ("--no-enhance", dict(action="store_true", help="ablation: chosen = the raw clean answer (no SE)")),
        ("--batch-size", GEN_BATCH_SIZE),
        ("--max-new-tokens", dict(type=cli.positive_int, default=48, help="generation limit per answer, in tokens")),
        ("--prefix-cache-gb", dict(type=cli.non_negative_float, default=2.0,
                                   help="memory (GB) for reusing the system text's and each image's keys/values "
                                        "across stages; used only when a shard's images fit (0: off)")),
    ]


def world_eval_flags():
    """evaluate.py --model's flags: the world benchmarks of one model."""
    return [
        ("--model", dict(help="Hugging Face LLaVA directory to evaluate (metrics.json is written inside)")),
        ("--test-dir", dict(default="runs/world/test", help="held-out world images (labels: <dir>_labels.jsonl)")),
        ("--test-labels", dict(default=None, help="scene records of --test-dir (default <dir>_labels.jsonl)")),
        ("--n-test", dict(type=cli.positive_int, default=1000,
                          help="number of test scenes written when the split is missing")),
        ("--test-seed", dict(type=cli.non_negative_int, default=424242,
                             help="seed of the test split (keep apart from training)")),
        ("--seed", dict(type=cli.non_negative_int, default=0,
                        help="seed of the question sampling over the test scenes")),
        ("--pope-k", dict(type=cli.positive_int, default=3,
                          help="POPE positives per image (official 3); images with fewer objects are left out of "
                               "POPE, as in the official builder")),
        ("--out", dict(default=None, help="metrics.json path (default: <model>/metrics.json)")),
        ("--batch-size", dict(type=cli.positive_int, default=32, help="prompts per generate call")),
        ("--max-new-tokens", dict(type=cli.positive_int, default=96,
                                  help="new-token cap for descriptions and SENA prompts")),
        ("--max-new-tokens-short", dict(type=cli.positive_int, default=16, help="new-token cap for short answers")),
        *model_run_flags(),
    ]


def answering_flags():
    """evaluate.py pope/amber --model's flags: a model answers an official benchmark's questions on its images."""
    from sena.pope import LLAVA_SHORT_ANSWER

    return [
        ("--model", dict(help="Hugging Face LLaVA directory that answers the questions")),
        ("--image-dir", dict(help="folder holding the benchmark's images (COCO val2014 for POPE, AMBER's)")),
        ("--out-dir", dict(help="folder for the answer files and metrics")),
        ("--suffix", dict(default=LLAVA_SHORT_ANSWER,
                          help="appended to each yes/no question (default: %(default)r, LLaVA-1.5's)")),
        ("--batch-size", dict(type=cli.positive_int, default=32, help="prompts per generate call")),
        ("--max-new-tokens", dict(type=cli.positive_int, default=512, help="new-token cap for AMBER's descriptions")),
        ("--max-new-tokens-short", dict(type=cli.positive_int, default=128,
                                        help="new-token cap for yes/no answers (LLaVA's model_vqa_loader default)")),
        *model_run_flags(),
    ]


def model_run_flags():
    """Where and in what precision an evaluated model runs (world benchmarks, POPE and AMBER answering)."""
    return [
        ("--device", dict(type=cli.device, default=None, help="torch device (default: cuda if available, else cpu)")),
        ("--dtype", dict(default="float32", choices=["float32", "bfloat16", "float16"], help="model dtype")),
    ]


def add(parser, group):
    for flag, kw in group:
        parser.add_argument(flag, **kw)
    return parser


def defaults(group) -> dict:
    """{name: value} that argparse parses for this group when no flag is typed (a required flag's is None)."""
    parser = argparse.ArgumentParser(add_help=False)
    for flag, kw in group:
        parser.add_argument(flag, **(kw | {"required": False}))
    return vars(parser.parse_args([]))
