"""The self-play stages of one SENA round (the paper, Sec. 3), each batched over all images:

  1. self-questioning: ask a question, then the self-check turn (with the image by default, text-only as the
     released code does with --self-check text, skipped with --self-check off); keep the '?' sentences;
  2. a description prompt drawn per image (seeded);
  3. answers on the clean image (chosen candidates): type des (description) and gen (question), greedy;
  4. the same prompts on a diffusion-noised copy of the image (rejected), noise seeded per (image, round);
  5. self-enhancement: every clean answer is rewritten given the description (--no-enhance keeps the raw one;
     --enhance-types gen rewrites only the short answers);
  6. the pair filters, each counted.

generate_round writes pairs.jsonl (one pair a line; `prompt`/`chosen`/`rejected`/`images` are the fields TRL's
preference datasets read) and report.json (counts per stage and filter, rewrite and acceptance rates, mean lengths).
Each stage appends finished batches to <out>/stages/<stage>.jsonl, so a killed round resumes where it stopped.
"""

import hashlib
import json
import os
import sys
import time
from dataclasses import asdict, dataclass

import torch
from tqdm import tqdm

from sena import dist, prompts, seeds
from sena.chat import encode_prompt
from sena.checkpoint import ModelDirError, load_pretrained
from sena.cli import UserError
from sena.generation import generate
from sena.image import load_image, preprocess
from sena.io import atomic_write_text, list_images, read_json, sha256_file, sha256_weights
from sena.noise import noised_image
from sena.pairs import FILTERS, STAGE_COUNTS, extract_questions, mentions_name, pair_filter, parse_improved
from sena.settings import GenerationSettings, ImageSource


@dataclass(frozen=True)
class Stages:
    """What the stages of one shard share: the generation settings and round k; the folder of their resumable stage
    files and the signature those are written under (a hash of round_inputs); the prefix cache of keys/values
    (sena.generation: {} to fill, or None when the shard's images do not fit in --prefix-cache-gb)."""

    settings: GenerationSettings
    round: int
    folder: str
    signature: str
    prefix_cache: dict | None


@torch.no_grad()
def encode_images(model, pixels, batch_size):
    """Vision tower + projector once per image; every stage reuses these features. (N, n_tok, D)"""
    feats = [model.encode_images(pixels[i : i + batch_size]) for i in range(0, len(pixels), batch_size)]
    return torch.cat(feats)


@torch.no_grad()
def run_prompts(model, tok, feats, users, stages: Stages, stage, keys, with_image=True, temperature=0.0):
    """Greedy answers to users[i] about image feats[i], batched and sorted by prompt length (temperature > 0: sampled,
    one prompt at a time with a generator seeded by (seed, round, stage, key), so a draw does not depend on batching,
    sharding or a resume).

    Resumable: each finished batch is appended to <stages.folder>/<stage>.jsonl under its key (image name), and a
    rerun generates only the keys not there yet, so a killed 6K-image round loses at most one batch per stage.
    """
    settings = stages.settings
    path = os.path.join(stages.folder, f"{stage}.jsonl")
    done = load_stage(path, stages.signature)
    todo = [i for i, k in enumerate(keys) if k not in done]
    cfg = model.config
    ids = {i: encode_prompt(tok, users[i], cfg.n_image_tokens, cfg.image_token_index, with_image) for i in todo}
    order = sorted(todo, key=lambda i: len(ids[i]))
    with open(path, "a", encoding="utf-8") as f:
        for s in tqdm(range(0, len(order), settings.batch_size), desc=stage, leave=False, disable=None):
            idx = order[s : s + settings.batch_size]
            kw = dict(max_new_tokens=settings.max_new_tokens, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, prefix_cache=stages.prefix_cache)
            if temperature > 0:
                new = [generate(model, [ids[i]], image_features=feats[i : i + 1] if with_image else None,
                                do_sample=True, temperature=temperature,
                                generator=draw_generator(stages, stage, keys[i], feats.device), **kw)[0] for i in idx]
            else:
                new = generate(model, [ids[i] for i in idx], image_features=feats[idx] if with_image else None, **kw)
            for i, toks in zip(idx, new):
                done[keys[i]] = tok.decode(toks, skip_special_tokens=True).strip()
                f.write(json.dumps({"key": keys[i], "text": done[keys[i]]}) + "\n")
            f.flush()
    return [done[k] for k in keys]


def draw_generator(stages: Stages, stage, key, device):
    """The random stream of one sampled answer: a function of (seed, round, stage, image name) only."""
    return seeds.generator(stages.settings.seed, "sample", stages.round, stage, key, device=device)


def load_stage(path, signature):
    """Texts a stage already produced, {key: text}; a stage file written under other settings is refused."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    text = ""
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            text = f.read()
    # A kill inside a write leaves the last line cut short. It is dropped from the file, not just skipped: the
    # next append would otherwise join the first new record to it and lose that record.
    whole = text[: text.rfind("\n") + 1]
    if not whole:  # a new stage, or one whose header never got written whole
        whole = json.dumps({"signature": signature}) + "\n"
    if whole != text:
        atomic_write_text(path, whole)
    lines = whole.split("\n")
    try:
        head = json.loads(lines[0])
    except json.JSONDecodeError:
        head = {}
    if not isinstance(head, dict) or head.get("signature") != signature:
        raise UserError(f"{path}: written with other settings, model weights or images, or damaged "
                        f"({head.get('signature') if isinstance(head, dict) else None} != {signature}); delete the "
                        "round's stages/ folder to regenerate")
    # A damaged line (a disk error, an edit) costs one answer: it is dropped and that answer generated again.
    done, bad = {}, []
    for n, line in enumerate(lines[1:-1], 2):
        try:
            rec = json.loads(line)
            done[rec["key"]] = rec["text"]
        except (json.JSONDecodeError, TypeError, KeyError):
            bad.append(n)
    if bad:
        shown = ", ".join(map(str, bad[:5])) + (" ..." if len(bad) > 5 else "")
        print(f"{path}: {len(bad)} damaged line(s) (line {shown}) dropped; their answers are generated again",
              file=sys.stderr)
        atomic_write_text(path, "".join(line + "\n" for i, line in enumerate(lines[:-1], 1) if i not in bad))
    return done


def ask_questions(model, tok, feats, names, stages: Stages, counts):
    """Stage 1: one question per image, then the self-check. Returns (raw, checked) lists, None where dropped."""
    settings = stages.settings
    asked = run_prompts(model, tok, feats, [prompts.ASK_QUESTION] * len(feats), stages, "ask", names,
                        temperature=settings.ask_temperature)
    raw = [extract_questions(t) for t in asked]
    counts["questions_raw"] = sum(q is not None for q in raw)
    if settings.self_check == "off":
        checked = list(raw)
    else:
        keep = [i for i, q in enumerate(raw) if q is not None]
        outs = run_prompts(model, tok, feats[keep], [prompts.SELF_CHECK.format(question=raw[i]) for i in keep],
                           stages, "self_check", [names[i] for i in keep], with_image=settings.self_check == "image")
        checked = [None] * len(raw)
        for i, text in zip(keep, outs):
            checked[i] = extract_questions(text)
        counts["self_check_dropped"] = sum(checked[i] is None for i in keep)
        counts["self_check_rewritten"] = sum(checked[i] is not None and checked[i] != raw[i] for i in keep)
    named = [i for i, q in enumerate(checked) if q is not None and mentions_name(q)]
    for i in named:
        checked[i] = None
    counts["questions_name_dropped"] = len(named)
    counts["questions_kept"] = sum(q is not None for q in checked)
    return raw, checked


def enhance(model, tok, feats, descriptions, questions, answers, stages: Stages, stage, keys):
    """Stage 5: rewrite each answer given the image, its description, the question; None where refused."""
    users = [prompts.improve_prompt(d, q, a) for d, q, a in zip(descriptions, questions, answers)]
    return [parse_improved(t) for t in run_prompts(model, tok, feats, users, stages, stage, keys)]


def prefix_cache_bytes(model, tok, n_images):
    """Bytes of keys and values the prefix cache holds for n_images (system text + image block each)."""
    cfg, t = model.config, model.config.text
    n_pos = len(encode_prompt(tok, "", cfg.n_image_tokens, cfg.image_token_index))
    hs = t.head_dim or t.hidden_size // t.num_attention_heads
    bytes_per = model.model.language_model.embed_tokens.weight.element_size()
    return n_images * n_pos * t.num_hidden_layers * 2 * t.num_key_value_heads * hs * bytes_per


def enhanced(settings: GenerationSettings) -> tuple:
    """The answer types self-enhancement rewrites: none under --no-enhance, else --enhance-types."""
    return () if settings.no_enhance else tuple(settings.enhance_types.split(","))


def run_shard(settings: GenerationSettings, model_dir, paths, root, out, k, signature):
    """Every stage of round k on one list of images, with the model in model_dir; stage files go to out/stages,
    written under `signature`. Returns (pairs, counts)."""
    device = settings.device
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    model, tok, image_cfg = load_pretrained(model_dir, dtype=dtype, device=device, need_tokenizer=True)
    model.eval()
    counts = dict.fromkeys(STAGE_COUNTS, 0)

    # Images: unreadable files are skipped and counted, never fatal (a 6K-image round must not die on one JPEG).
    names, clean, noised = [], [], []
    for path in tqdm(paths, desc="images", leave=False, disable=None):
        name = os.path.relpath(path, root)
        try:
            if any("\udc80" <= c <= "\udcff" for c in name):  # how Python spells a name's bytes that are not UTF-8
                raise ValueError("its name is not valid UTF-8, which pairs.jsonl cannot hold")
            x = preprocess(load_image(path), image_cfg)
        except (OSError, ValueError) as e:
            shown = path.encode("utf-8", "backslashreplace").decode()  # a name's bytes that are not UTF-8, escaped
            print(f"skipping image {shown}: {e}", file=sys.stderr)
            counts["images_unreadable"] += 1
            continue
        names.append(name)
        clean.append(x)
        # Noise goes on the normalized, padded tensor, as in the released code; seeded per (image, round).
        noised.append(noised_image(x, settings.noise_step, settings.seed, name, k))
    counts["images"] = len(names)
    if not names:
        return [], counts
    clean_feats = encode_images(model, torch.stack(clean).to(device, dtype), settings.batch_size)
    noised_feats = encode_images(model, torch.stack(noised).to(device, dtype), settings.batch_size)
    # Keys/values of the system text and of each image (clean and noised) are computed at the first stage that sees
    # them and reused by all later ones (sena.generation): later prompts prefill their own words only.
    fits = prefix_cache_bytes(model, tok, 2 * len(names)) <= settings.prefix_cache_gb * 2**30
    stages = Stages(settings, k, os.path.join(out, "stages"), signature, {} if fits else None)

    raw_q, questions = ask_questions(model, tok, clean_feats, names, stages, counts)
    keep = [i for i, q in enumerate(questions) if q is not None]
    rng = [seeds.rng(settings.seed, "describe-prompt", k, names[i]) for i in keep]
    des_users = [r.choice(prompts.DESCRIBE_PROMPTS) + prompts.DES_SUFFIX for r in rng]
    gen_users = [questions[i] + prompts.GEN_SUFFIX for i in keep]

    # Stages 3-4: the same two prompts on the clean image (chosen) and the noised image (rejected).
    cf, nf = clean_feats[keep], noised_feats[keep]
    kept = [names[i] for i in keep]
    des_clean = run_prompts(model, tok, cf, des_users, stages, "des_clean", kept)
    gen_clean = run_prompts(model, tok, cf, gen_users, stages, "gen_clean", kept)
    des_noised = run_prompts(model, tok, nf, des_users, stages, "des_noised", kept)
    gen_noised = run_prompts(model, tok, nf, gen_users, stages, "gen_noised", kept)

    des_se = gen_se = [None] * len(keep)
    if "des" in enhanced(settings):
        des_se = enhance(model, tok, cf, des_clean, des_users, des_clean, stages, "enhance_des", kept)
    if "gen" in enhanced(settings):
        gen_se = enhance(model, tok, cf, des_clean, gen_users, gen_clean, stages, "enhance_gen", kept)
    counts["se_accepted_des"] = sum(s is not None for s in des_se)
    counts["se_accepted_gen"] = sum(s is not None for s in gen_se)
    counts["candidate_pairs"] = 2 * len(keep)

    pairs = []
    for j, i in enumerate(keep):
        for kind, user, raw, se, rej in (("des", des_users[j], des_clean[j], des_se[j], des_noised[j]),
                                          ("gen", gen_users[j], gen_clean[j], gen_se[j], gen_noised[j])):
            chosen = se if se is not None else raw
            pairs.append({"id": f"r{k}/{names[i]}/{kind}", "image": names[i], "images": [names[i]],
                          "type": kind, "prompt": user, "chosen": chosen, "rejected": rej,
                          "question_raw": raw_q[i], "question": questions[i], "description": des_clean[j],
                          "chosen_raw": raw, "se_accepted": se is not None})
    return pairs, counts


def round_images(images: ImageSource, seed):
    """(sorted image paths, root) of this round: a folder, or an image list with its root, offset and counts."""
    return list_images(images.images, images.image_list, images.image_root, images.offset, images.num_images,
                       images.per_source, seed)


def round_inputs(settings: GenerationSettings, images: ImageSource, k, model_dir, paths, root):
    """What round k's pairs are a function of: the settings, the model's weights and the images' names and bytes.

    Batch size, device, threads and the prefix cache's memory are left out: greedy answers do not depend on how
    prompts are batched (tests/test_generation.py). Paths are left out too: the model and the images count by their
    bytes. Stage files are reused only under the same inputs, and report.json keeps this record so that train.py can
    tell a round's pairs from stale ones before it trains on them.
    """
    unused = ("batch_size", "device", "prefix_cache_gb", "threads")
    what = {key: v for key, v in asdict(settings).items() if key not in unused}
    what |= {"offset": images.offset, "num_images": images.num_images, "per_source": images.per_source, "round": k}
    digest = hashlib.sha256()
    for p in paths:
        # An entry that cannot be read (a folder named x.png, a dangling symlink or a loop) counts as unreadable here
        # and is skipped and counted by run_shard; a name that is not UTF-8 is hashed by its bytes.
        try:
            content = sha256_file(p)
        except OSError as e:
            content = f"unreadable {e.errno}"
        digest.update(os.fsencode(os.path.relpath(p, root)) + f"\0{content}\n".encode())
    try:
        weights = sha256_weights(model_dir)
    except FileNotFoundError:  # before load_pretrained would say the same
        raise ModelDirError(f"{model_dir}: no model.safetensors or model.safetensors.index.json") from None
    return {"settings": hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16],
            "model_sha256": weights, "images_sha256": digest.hexdigest(), "n_images": len(paths)}


def generate_round(settings: GenerationSettings, model_dir, images: ImageSource, out, k):
    """Round k's pairs: every stage on the images with the model in model_dir, then the filters; writes pairs.jsonl
    and report.json to `out` and returns the report."""
    t0 = time.time()
    rank, nproc = dist.setup()
    os.makedirs(out, exist_ok=True)
    paths, root = round_images(images, settings.seed)
    # Stage files from an interrupted run are reused only under the same inputs (round_inputs).
    inputs = round_inputs(settings, images, k, model_dir, paths, root)
    signature = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]

    # Under torchrun each rank takes every nproc-th image and keeps its own stage files; rank 0 merges. Answers
    # depend only on (model, image, seed, round), so N processes give the same pairs as one.
    shard_out = out if nproc == 1 else os.path.join(out, f"rank_{rank}")
    pairs, counts = run_shard(settings, model_dir, paths[rank::nproc], root, shard_out, k, signature)
    if nproc > 1:
        atomic_write_text(os.path.join(shard_out, "shard.json"), json.dumps({"pairs": pairs, "counts": counts}))
        dist.barrier()
        shards = [read_json(os.path.join(out, f"rank_{r}", "shard.json")) for r in range(nproc)]
        pairs = sorted((p for s in shards for p in s["pairs"]), key=lambda p: (p["image"], p["type"]))
        counts = {key: sum(s["counts"][key] for s in shards) for key in STAGE_COUNTS}
    if counts["images"] == 0:
        dist.shutdown()
        raise UserError(f"no readable images in {images.images or images.image_list} "
                        f"(skipped {counts['images_unreadable']})")

    # Stage 6: the pair filters, each counted.
    filtered = dict.fromkeys(FILTERS, 0)
    kept = []
    for p in pairs:
        reason = pair_filter(p["chosen"], p["rejected"], settings.keep_yes_no)
        if reason is None:
            kept.append(p)
        else:
            filtered[reason] += 1
    n_q = max(counts["questions_kept"], 1)
    report = {"round": k, "model": model_dir, **counts, "image_root": os.path.abspath(root),
              "se_accept_rate_des": counts["se_accepted_des"] / n_q if "des" in enhanced(settings) else None,
              "se_accept_rate_gen": counts["se_accepted_gen"] / n_q if "gen" in enhanced(settings) else None,
              "filtered": filtered, "pairs": len(kept),
              "pairs_des": sum(p["type"] == "des" for p in kept), "pairs_gen": sum(p["type"] == "gen" for p in kept),
              "mean_words_chosen": sum(len(p["chosen"].split()) for p in kept) / max(len(kept), 1),
              "mean_words_rejected": sum(len(p["rejected"].split()) for p in kept) / max(len(kept), 1),
              "settings": {"model": model_dir, "out": out, "round": k, **asdict(images), **asdict(settings)},
              "inputs": inputs, "processes": nproc,
              "seconds": round(time.time() - t0, 1)}
    if rank == 0:
        atomic_write_text(os.path.join(out, "pairs.jsonl"), "".join(json.dumps(p) + "\n" for p in kept))
        atomic_write_text(os.path.join(out, "report.json"), json.dumps(report, indent=2))
        print(f"round {k}: {report['images']} images -> {report['questions_kept']} questions -> "
              f"{len(kept)} pairs ({report['pairs_des']} des, {report['pairs_gen']} gen); filtered {filtered}; "
              f"{report['seconds']} s")
    dist.barrier()
    return report
