"""A SENA run, one round at a time: round k turns θ(k-1) into θ(k).

    run_round:  pairs (sena.selfplay, unless present and current) -> reference log-probs, cached once
                -> DPO + λ·ICA (sena.trainer) -> θ(k) saved whole -> world benchmarks -> meta.json ("done")

Rounds run in order and each is skipped once its meta.json exists, so a killed run continues where it stopped.
Each round writes runs/<name>/iter_<k>/: pairs.jsonl + report.json (the self-play stages), ref_logps.safetensors,
telemetry.json, log.jsonl (one line per step), model/ (θ(k), a Hugging Face LLaVA directory), metrics.json (world
runs) and meta.json (arguments, input hashes, git commit).
"""

import json
import os
import shutil
import subprocess
import time

from sena import cli, dist, seeds, world
from sena.checkpoint import load_pretrained, save_pretrained
from sena.cli import UserError
from sena.io import atomic_write_text, lock_dir, read_json, read_jsonl, read_lines, sha256_file
from sena.refcache import cache_key, cache_problem, load_reference, reference_logps, save_reference
from sena.report import write_report
from sena.selfplay import generate_round, round_images, round_inputs
from sena.settings import ImageSource, RunSettings, eval_settings, image_source
from sena.telemetry import image_reliance, reference_preference, summary_line
from sena.trainer import autocast_dtype, train_round, weight_dtype
from sena.world.evaluation import score_pairs
from sena.world.scorecard import compare, evaluate_model

say = dist.say


def round_done(run_dir, k):
    return os.path.exists(os.path.join(run_dir, f"iter_{k}", "meta.json"))


def command_for(settings: RunSettings, j):
    """'python train.py --iter j ...' with every other flag the user typed."""
    argv = list(settings.argv)
    has_iter = any(a == "--iter" or a.startswith("--iter=") for a in argv)
    argv = argv if has_iter else ["--iter", "0"] + argv
    return f"python train.py {cli.with_flag(argv, '--iter', j)}"


def run_first(settings: RunSettings, k):
    """The command that makes the first missing round before round k, and what follows it."""
    first = next(j for j in range(1, k) if not round_done(settings.run_dir, j))
    if first == k - 1:
        return command_for(settings, first)
    after = f"{first + 1} .. {k - 1}" if first + 1 < k - 1 else f"{first + 1}"
    return f"{command_for(settings, first)} (then --iter {after})"


def check_round_order(settings: RunSettings):
    """--iter k needs round k-1 finished (its meta.json): checked before θ0 is built or anything is loaded."""
    k = settings.round
    if k and k > 1 and not round_done(settings.run_dir, k - 1):
        raise UserError(f"round {k} needs round {k - 1} finished "
                        f"({os.path.join(settings.run_dir, f'iter_{k - 1}', 'meta.json')} is missing); "
                        f"run first: {run_first(settings, k)}")


def git_commit():
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True).stdout.strip()
    except OSError:
        return None


def round_source(settings: RunSettings, k, world_run) -> ImageSource:
    """Round k's images: a fresh world pool, or the k-th slice of --images-per-iter of the user's images."""
    if world_run:
        return image_source(images=world_pool(settings.run_dir, k, settings.images_per_round, settings.generation.seed))
    return image_source(images=settings.images, image_list=settings.image_list, image_root=settings.image_root,
                        offset=(k - 1) * settings.images_per_round, num_images=settings.images_per_round)


def changed_inputs(report, settings: RunSettings, images, k, prev):
    """What changed since generate.py wrote this round's pairs ('' if nothing did, or if they were made by hand and
    carry no record): its settings, θ(k-1)'s weights, the images' bytes (selfplay.round_inputs)."""
    then = report.get("inputs")
    if then is None:
        return ""
    now = round_inputs(settings.generation, images, k, prev, *round_images(images, settings.generation.seed))
    names = {"settings": "generation settings", "model_sha256": f"θ({k - 1}) weights", "images_sha256": "images"}
    return ", ".join(name for key, name in names.items() if then.get(key) != now[key])


def prepare_data(settings: RunSettings, k, prev, round_dir, world_run):
    """Round k's pairs (generated unless present and current) and the image root they refer to.

    Pairs that generate.py wrote are reused only if their inputs are unchanged. Changed inputs with no pairs
    (say, all images were unreadable, and readable ones were added since) lose nothing: the round is generated
    again. Changed inputs with pairs are refused with the way out, as they may have cost hours.
    """
    pairs_path, report_path = (os.path.join(round_dir, n) for n in ("pairs.jsonl", "report.json"))
    images = round_source(settings, k, world_run)
    if os.path.exists(pairs_path):
        if not os.path.exists(report_path):
            raise UserError(f"{report_path} is missing beside pairs.jsonl (it names the image root); "
                            f"delete {pairs_path} to generate the round again")
        changed = changed_inputs(read_json(report_path), settings, images, k, prev)
        has_pairs = any(line.strip() for line in read_lines(pairs_path))
        if changed and has_pairs:
            raise UserError(f"{pairs_path} was generated from other inputs ({changed} changed since); "
                            f"delete {round_dir} to generate the round again, or use another --run-dir")
        if changed:
            say(f"round {k}: {pairs_path} holds no pairs and its inputs changed ({changed}); generating it again")
            if dist.rank() == 0:
                for path in (pairs_path, report_path):
                    os.remove(path)
                shutil.rmtree(os.path.join(round_dir, "stages"), ignore_errors=True)
            dist.barrier()
    if not os.path.exists(pairs_path):
        generate_round(settings.generation, prev, images, round_dir, k)
    report = read_json(report_path)
    pairs, bad = read_jsonl(pairs_path, required=("image", "prompt", "chosen", "rejected", "type"))
    if not pairs:
        counts = ", ".join(f"{key} {report[key]}" for key in ("images", "images_unreadable", "questions_kept",
                                                              "filtered") if key in report)
        raise UserError(f"{pairs_path}: no pairs to train on ({bad} malformed lines; {counts or 'no report'})"
                        f". The round is generated again once its images, θ({k - 1}) or settings change; or delete "
                        f"{round_dir}")
    return pairs_path, pairs, report["image_root"]


def run_round(settings: RunSettings, k, base, world_run):
    """Round k, top to bottom: θ(k-1) -> pairs -> reference log-probs -> DPO + λ·ICA -> θ(k) -> benchmarks -> meta.json.
    base: θ0's directory. Returns θ(k)'s directory."""
    run_dir = settings.run_dir
    round_dir = os.path.join(run_dir, f"iter_{k}")
    out_model = os.path.join(round_dir, "model")
    if os.path.exists(os.path.join(round_dir, "meta.json")):
        say(f"round {k}: done already ({round_dir}/meta.json); skipping")
        return out_model
    prev = base if k == 1 else os.path.join(run_dir, f"iter_{k - 1}", "model")
    dist.barrier()  # θ0, pools and pairs are written by rank 0 or by all ranks together; nobody runs ahead
    if not os.path.exists(os.path.join(prev, "config.json")):  # round k-1 has meta.json (check_round_order)
        raise UserError(f"round {k} needs θ({k - 1}) at {prev}, which is missing; delete "
                        f"{os.path.join(run_dir, f'iter_{k - 1}')} and run: {command_for(settings, k - 1)}"
                        if k > 1 else f"θ0 at {prev} is missing")
    os.makedirs(round_dir, exist_ok=True)
    t0 = time.time()
    pairs_path, pairs, image_root = prepare_data(settings, k, prev, round_dir, world_run)
    if world_run and dist.rank() == 0:
        world_pair_scores(run_dir, k, round_dir, pairs)
    t_data = time.time()

    # Reference log-probs: once per round, keyed by the pairs' and the reference weights' hashes and the precision.
    train = settings.train
    ref_path = os.path.join(round_dir, "ref_logps.safetensors")
    precision = str(weight_dtype(train)).removeprefix("torch.") + ("+autocast" if autocast_dtype(train.device) else "")
    key = cache_key(pairs_path, prev, precision)
    problem = cache_problem(ref_path) if dist.rank() == 0 and os.path.exists(ref_path) else None
    if problem:  # a damaged cache is only a pass over the pairs away; a stale one is refused by load_reference
        say(f"round {k}: {ref_path} is damaged ({problem}); scoring the reference again")
        os.remove(ref_path)
    if dist.rank() == 0 and not os.path.exists(ref_path):
        ref_model, tok, image_cfg = load_pretrained(prev, dtype=weight_dtype(train), device=train.device,
                                                    need_tokenizer=True)
        ref = reference_logps(ref_model, tok, image_cfg, pairs, image_root, train.micro_batch_size, train.device,
                              autocast_dtype(train.device))
        round_telemetry(settings, k, round_dir, ref_model, tok, image_cfg, pairs, image_root, ref)  # before the
        save_reference(ref_path, ref, key)  # cache, whose presence means "done": a kill in between redoes both
        del ref_model
    dist.barrier()
    ref = load_reference(ref_path, key)
    t_ref = time.time()

    model, tok, image_cfg = train_round(train, k, prev, round_dir, pairs, image_root, ref)
    if dist.rank() != 0:
        dist.barrier()  # rank 0 saves θ(k), evaluates it and writes meta.json
        return out_model
    save_pretrained(model, out_model + ".tmp", tokenizer=tok, image_cfg=image_cfg)
    shutil.rmtree(out_model, ignore_errors=True)
    os.replace(out_model + ".tmp", out_model)  # θ(k) appears whole or not at all
    t_train = time.time()
    if world_run and not settings.no_eval:
        evaluate_world(out_model, run_dir)
    meta = {"round": k, "args": dict(settings.record), "git_commit": git_commit(), "reference": prev,
            "inputs": {"pairs_sha256": sha256_file(pairs_path), "reference_cache_key": key},
            "seconds": {"data": round(t_data - t0, 1), "reference": round(t_ref - t_data, 1),
                        "train": round(t_train - t_ref, 1), "eval": round(time.time() - t_train, 1)}}
    atomic_write_text(os.path.join(round_dir, "meta.json"), json.dumps(meta, indent=2))
    shutil.rmtree(os.path.join(round_dir, "checkpoint"), ignore_errors=True)  # the round is done; θ(k) is saved
    dist.barrier()
    return out_model


def evaluate_world(model_dir, run_dir):
    """The world benchmarks of one model on the run's held-out test split, as `evaluate.py --model` gives them."""
    evaluate_model(model_dir, eval_settings(), os.path.join(run_dir, "test"))


def round_telemetry(settings: RunSettings, k, round_dir, ref_model, tok, image_cfg, pairs, image_root, ref):
    """iter_k/telemetry.json (sena.telemetry): how often θ(k-1) already prefers chosen, and how much its chosen and
    rejected answers lean on the image, on --reliance-pairs pairs scored again on generate.py's noised image
    (the same noise only if the pairs came from this run's generate.py: same --seed and --noise-step)."""
    types = [p["type"] for p in pairs]
    tele = {"reference_prefers_chosen": reference_preference(ref, types)}
    if settings.reliance_pairs:
        seed, noise_step, train = settings.generation.seed, settings.generation.noise_step, settings.train
        n = min(len(pairs), settings.reliance_pairs)
        idx = sorted(seeds.rng(seed, "reliance", k).sample(range(len(pairs)), n))
        sub = [pairs[i] for i in idx]
        noised = reference_logps(ref_model, tok, image_cfg, sub, image_root, train.micro_batch_size, train.device,
                                 autocast_dtype(train.device), noise=(noise_step, seed, k))
        tele["image_reliance"] = image_reliance({f: v[idx] for f, v in ref.items()}, noised, [types[i] for i in idx])
        tele["image_reliance_noise_step"] = noise_step
    atomic_write_text(os.path.join(round_dir, "telemetry.json"), json.dumps(tele, indent=2))
    say(summary_line(tele))


def world_pair_scores(run_dir, k, round_dir, pairs):
    """World runs only: the round's pairs against the pool's scene records (sena.world.evaluation.score_pairs), to
    iter_k/pair_scores.json and one line. SENA never reads these labels; they measure what its data teaches."""
    labels = os.path.join(run_dir, "labels", f"pool_iter_{k}.jsonl")
    if not os.path.isfile(labels):
        return
    s = score_pairs(pairs, {sc["image"]: sc for sc in world.load_scenes(labels)})
    atomic_write_text(os.path.join(round_dir, "pair_scores.json"), json.dumps(s, indent=2))
    say(f"round {k} pairs vs labels: chosen correct {s['chosen_correct']:.1%}, rejected wrong {s['rejected_wrong']:.1%}"
        f"; des naming absent buddies / other absent shapes: chosen {s['des_chosen_buddies']} / "
        f"{s['des_chosen_others']}, rejected {s['des_rejected_buddies']} / {s['des_rejected_others']}")


def world_pool(run_dir, k, n, seed):
    """Round k's fresh unlabeled world images; their scene records go to a folder SENA never reads from.

    write_split reuses a pool only if its labels are those of these n images from this seed, and finishes one a
    kill interrupted; a pool made under other settings (another --images-per-iter or --seed) is made again, its
    other images removed. Pairs made from the old pool are then refused by prepare_data, naming the images."""
    pool = os.path.join(run_dir, "pool", f"iter_{k}")
    if dist.rank() == 0:
        labels = os.path.join(run_dir, "labels", f"pool_iter_{k}.jsonl")
        os.makedirs(os.path.dirname(labels), exist_ok=True)
        world.write_split(pool, n, seed=seed, prefix=f"pool{k}", labels_path=labels, remove_others=True)
    dist.barrier()
    return pool


def run(settings: RunSettings):
    """A SENA run: θ0 (the shipped world θ0, a rebuilt one, or --base), then rounds --iter or 1..--n-iters, each
    followed by the report; on the world, the benchmark table θ0 → round k at the end."""
    dist.setup()
    world_run = settings.base is None  # the embedded world: θ0, image pools and the labeled test set
    os.makedirs(settings.run_dir, exist_ok=True)
    if dist.rank() == 0:  # one run per directory: a second one would train on, and delete, the first one's files
        lock_dir(settings.run_dir, "--run-dir")
    base = settings.base
    if world_run:  # θ0: a checked copy of the shipped one (or a fresh build) in the run directory
        base = os.path.join(settings.run_dir, "theta0")
        if dist.rank() == 0:  # a θ0 of another recipe there, or a damaged copy: a UserError naming the file
            if settings.rebuild_theta0:
                world.build_theta0(base, seed=settings.train.seed, device=settings.train.device)
            else:
                world.install_theta0(settings.run_dir, settings.theta0 or world.SHIPPED_THETA0)
        dist.barrier()
    rounds = [settings.round] if settings.round else list(range(1, settings.n_rounds + 1))
    t0 = time.time()
    evaluate = world_run and not settings.no_eval and dist.rank() == 0
    if evaluate and not os.path.exists(os.path.join(base, "metrics.json")):
        evaluate_world(base, settings.run_dir)  # θ0's column
    for k in rounds:
        run_round(settings, k, base, world_run)
        if dist.rank() == 0:
            write_report(settings.run_dir)  # runs/<name>/report.html: pairs gallery, curves, table
    if evaluate:
        models = [base] + [os.path.join(settings.run_dir, f"iter_{k}", "model") for k in range(1, max(rounds) + 1)]
        compare([m for m in models if os.path.exists(m)])
    say(f"done in {time.time() - t0:.0f} s")
