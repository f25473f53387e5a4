"""Settings as values: one small frozen dataclass per concern, built once from the parsed flags at the command-line
edge and handed to library functions beside what they work on (model, tokenizer, paths, caches).

    GenerationSettings   how a round's pairs are made            generate.py, and train.py's round flags
    ImageSource          which images a round reads              generate.py's --images ... --per-source
    TrainSettings        DPO + λ·ICA on a round's pairs          train.py
    AnswerSettings       how a model answers benchmark prompts   evaluate.py --model, pope, amber
    EvalSettings         the world benchmarks of one model       evaluate.py --model
    RunSettings          a SENA run, round after round           train.py

Each flag is declared once, in sena/flags.py (type, default, help); a field is named as argparse names its flag's
value (--noise-step -> noise_step), and tests/test_settings.py checks that every flag of a script lands in exactly
one place. Settings are frozen: nothing is set on one after it is built. What a round computes (a prefix cache, the
stage files' signature) is a local or a return value, never a field.
"""

import os
from dataclasses import dataclass, fields

from sena import flags
from sena.cli import UserError


@dataclass(frozen=True)
class GenerationSettings:
    """How the self-play stages make a round's pairs (sena.selfplay). Greedy answers do not depend on batch_size,
    device, threads or prefix_cache_gb; everything else here is part of what the pairs are a function of."""

    seed: int
    self_check: str  # "image" (paper), "text" (released code) or "off"
    ask_temperature: float  # 0: the self-asked question is greedy too
    keep_yes_no: bool
    noise_step: int  # diffusion step t of the rejected image
    enhance_types: str  # "des,gen" or "gen": the answer types self-enhancement rewrites
    no_enhance: bool
    max_new_tokens: int
    batch_size: int  # prompts per generation batch
    prefix_cache_gb: float
    threads: int | None
    device: str


@dataclass(frozen=True)
class ImageSource:
    """Which images a round reads: a folder, or a LLaVA-style JSON list under a root (sena.io.list_images)."""

    images: str | None
    image_list: str | None
    image_root: str | None
    offset: int
    num_images: int | None
    per_source: int | None


@dataclass(frozen=True)
class TrainSettings:
    """DPO + λ·ICA from θ(k-1) on a round's pairs (sena.trainer). ica_weight is λ as the run uses it: 0 under an
    --ablation without ICA."""

    seed: int
    device: str
    beta: float
    dpop: float
    ica_weight: float
    ica_reduction: str  # "batch" (official) or "des"
    lr: float
    epochs: int
    batch_size: int  # pairs per optimizer step, over all processes
    micro_batch_size: int  # pairs per forward
    schedule: str  # "cosine" or "constant" after warmup
    warmup_ratio: float
    weight_decay: float
    max_grad_norm: float
    full_ft: bool
    lora_r: int
    lora_alpha: float
    lora_dropout: float
    lora_targets: str  # comma-separated Linear names
    save_every: int
    max_bad_steps: int


@dataclass(frozen=True)
class AnswerSettings:
    """How a model answers benchmark prompts: greedy, batched, two token caps (sena.world.evaluation.load_answerer)."""

    batch_size: int
    max_new_tokens: int  # descriptions and SENA's own prompts
    max_new_tokens_short: int  # short answers
    device: str | None  # None: cuda if available, else cpu
    dtype: str


@dataclass(frozen=True)
class EvalSettings:
    """The world benchmarks of one model (sena.world.scorecard.evaluate_model): the test split written when missing,
    the question sampling, and how the model answers."""

    n_test: int
    test_seed: int
    seed: int  # of the question sampling over the test scenes
    pope_k: int
    answer: AnswerSettings


@dataclass(frozen=True)
class RunSettings:
    """A SENA run (sena.rounds.run): where it goes, which rounds, which θ0, and what every round uses. generation and
    train are built from the same flags as the rest, --ablation's switches applied, so each round gets them whole."""

    run_dir: str
    round: int | None  # --iter: run only this round; None: rounds 1..n_rounds
    n_rounds: int  # --n-iters
    base: str | None  # θ0 as a HF LLaVA directory; None: the embedded world's
    theta0: str | None
    rebuild_theta0: bool
    images: str | None
    image_list: str | None
    image_root: str | None
    images_per_round: int  # --images-per-iter
    ablation: str
    reliance_pairs: int
    no_eval: bool
    generation: GenerationSettings
    train: TrainSettings
    argv: tuple[str, ...]  # the flags as typed: a command that a refusal suggests keeps them
    record: tuple[tuple[str, object], ...]  # every flag's value and argv, (name, value): meta.json's "args"


def from_flags(cls, group, ns=None, **given):
    """A cls from parsed flags `ns` (any script's namespace: a field takes the value of its flag's name), the flags'
    defaults in `group` filling what ns lacks; `given` sets fields by name (a round's, a test's or a benchmark's)."""
    names = [f.name for f in fields(cls)]
    unknown = set(given) - set(names)
    if unknown:
        raise TypeError(f"{cls.__name__} has no field(s) {sorted(unknown)}")
    values = flags.defaults(group) | (vars(ns) if ns is not None else {}) | given
    return cls(**{name: values[name] for name in names})


def generation_settings(ns=None, **given) -> GenerationSettings:
    """From generate.py's flags, or their defaults."""
    return from_flags(GenerationSettings, flags.generate_flags(), ns, **given)


def image_source(ns=None, **given) -> ImageSource:
    """From generate.py's flags, or their defaults."""
    return from_flags(ImageSource, flags.generate_flags(), ns, **given)


def train_settings(ns=None, **given) -> TrainSettings:
    """From train.py's flags, or their defaults (as they are: run_settings applies --ablation)."""
    return from_flags(TrainSettings, flags.train_flags(), ns, **given)


def answer_settings(ns=None, **given) -> AnswerSettings:
    """From evaluate.py pope's or amber's flags, or their defaults."""
    return from_flags(AnswerSettings, flags.answering_flags(), ns, **given)


def eval_settings(ns=None, **given) -> EvalSettings:
    """From evaluate.py --model's flags, or their defaults (the test split and token caps a run evaluates with)."""
    answer = from_flags(AnswerSettings, flags.world_eval_flags(), ns)
    return from_flags(EvalSettings, flags.world_eval_flags(), ns, **({"answer": answer} | given))


def micro_batches(batch_size, micro_batch_size, nproc) -> int:
    """Micro-batches per optimizer step on each of nproc processes: each takes an equal slice of every batch, in
    whole micro-batches. A batch that does not split so is a UserError naming both flags."""
    local = batch_size // nproc
    if local * nproc != batch_size or local % micro_batch_size:
        raise UserError(f"--batch-size {batch_size} must split into {nproc} process(es) x whole micro-batches of "
                        f"--micro-batch-size {micro_batch_size}")
    return local // micro_batch_size


def run_settings(ns, argv=()) -> RunSettings:
    """train.py's parsed flags as a run. Refuses (UserError) what single flags cannot say, before θ0 is built, a model
    loaded or a reference pass run: flags that go together, and how a batch splits over the torchrun processes."""
    if ns.images and ns.image_list:
        raise UserError("give one of --images DIR or --image-list JSON, not both")
    if ns.image_root and not ns.image_list:
        raise UserError("--image-root goes with --image-list")
    if ns.base is not None:
        if not os.path.isfile(os.path.join(ns.base, "config.json")):
            raise UserError(f"argument --base: {ns.base} is not a Hugging Face LLaVA directory (no config.json)")
        if not (ns.images or ns.image_list):
            raise UserError("--base needs --images DIR or --image-list JSON")
    micro_batches(ns.batch_size, ns.micro_batch_size, int(os.environ.get("WORLD_SIZE", "1")))  # torchrun's count
    self_check, enhance, ica = flags.ABLATIONS[ns.ablation]
    # Each round's generation takes every round flag as parsed, --gen-batch-size as its batch and generate.py's
    # defaults for the rest: nothing is forwarded field by field, so no flag can be left behind.
    generation = from_flags(GenerationSettings, flags.generate_flags(), ns, batch_size=ns.gen_batch_size,
                            self_check=ns.self_check if self_check == "image" else self_check, no_enhance=not enhance)
    train = train_settings(ns, ica_weight=ns.ica_weight if ica else 0.0)
    return from_flags(RunSettings, flags.train_flags(), ns, generation=generation, train=train, argv=tuple(argv),
                      record=tuple((vars(ns) | {"argv": tuple(argv)}).items()))
