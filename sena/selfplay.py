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

import argparse
import hashlib
import json
import os
import sys
import time

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


@torch.no_grad()
def encode_images(model, pixels, batch_size):
    """Vision tower + projector once per image; every stage reuses these features. (N, n_tok, D)"""
    feats = [model.encode_images(pixels[i : i + batch_size]) for i in range(0, len(pixels), batch_size)]
    return torch.cat(feats)


@torch.no_grad()
def run_prompts(model, tok, feats, users, args, stage, keys, with_image=True, temperature=0.0):
    """Greedy answers to users[i] about image feats[i], batched and sorted by prompt length (temperature > 0: sampled,
    one prompt at a time with a generator seeded by (seed, round, stage, key), so a draw does not depend on batching,
    sharding or a resume).

    Resumable: each finished batch is appended to <out>/stages/<stage>.jsonl under its key (image name), and a rerun
    generates only the keys not there yet, so a killed 6K-image round loses at most one batch per stage.
    """
    path = os.path.join(args.out, "stages", f"{stage}.jsonl")
    done = load_stage(path, args.signature)
    todo = [i for i, k in enumerate(keys) if k not in done]
    cfg = model.config
    ids = {i: encode_prompt(tok, users[i], cfg.n_image_tokens, cfg.image_token_index, with_image) for i in todo}
    order = sorted(todo, key=lambda i: len(ids[i]))
    with open(path, "a", encoding="utf-8") as f:
        for s in tqdm(range(0, len(order), args.batch_size), desc=stage, leave=False, disable=None):
            idx = order[s : s + args.batch_size]
            kw = dict(max_new_tokens=args.max_new_tokens, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      prefix_cache=getattr(args, "prefix_cache", None))
            if temperature > 0:
                new = [generate(model, [ids[i]], image_features=feats[i : i + 1] if with_image else None,
                                do_sample=True, temperature=temperature,
                                generator=draw_generator(args, stage, keys[i], feats.device), **kw)[0] for i in idx]
            else:
                new = generate(model, [ids[i] for i in idx], image_features=feats[idx] if with_image else None, **kw)
            for i, toks in zip(idx, new):
                done[keys[i]] = tok.decode(toks, skip_special_tokens=True).strip()
                f.write(json.dumps({"key": keys[i], "text": done[keys[i]]}) + "\n")
            f.flush()
    return [done[k] for k in keys]


def draw_generator(args, stage, key, device):
    """The random stream of one sampled answer: a function of (seed, round, stage, image name) only."""
    return seeds.generator(args.seed, "sample", args.round, stage, key, device=device)


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


def ask_questions(model, tok, feats, names, args, counts):
    """Stage 1: one question per image, then the self-check. Returns (raw, checked) lists, None where dropped."""
    asked = run_prompts(model, tok, feats, [prompts.ASK_QUESTION] * len(feats), args, "ask", names,
                        temperature=args.ask_temperature)
    raw = [extract_questions(t) for t in asked]
    counts["questions_raw"] = sum(q is not None for q in raw)
    if args.self_check == "off":
        checked = list(raw)
    else:
        keep = [i for i, q in enumerate(raw) if q is not None]
        outs = run_prompts(model, tok, feats[keep], [prompts.SELF_CHECK.format(question=raw[i]) for i in keep], args,
                           "self_check", [names[i] for i in keep], with_image=args.self_check == "image")
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


def enhance(model, tok, feats, descriptions, questions, answers, args, stage, keys):
    """Stage 5: rewrite each answer given the image, its description, the question; None where refused."""
    users = [prompts.improve_prompt(d, q, a) for d, q, a in zip(descriptions, questions, answers)]
    return [parse_improved(t) for t in run_prompts(model, tok, feats, users, args, stage, keys)]


def prefix_cache_bytes(model, tok, n_images):
    """Bytes of keys and values the prefix cache holds for n_images (system text + image block each)."""
    cfg, t = model.config, model.config.text
    n_pos = len(encode_prompt(tok, "", cfg.n_image_tokens, cfg.image_token_index))
    hs = t.head_dim or t.hidden_size // t.num_attention_heads
    bytes_per = model.model.language_model.embed_tokens.weight.element_size()
    return n_images * n_pos * t.num_hidden_layers * 2 * t.num_key_value_heads * hs * bytes_per


def enhanced(args) -> tuple:
    """The answer types self-enhancement rewrites: none under --no-enhance, else --enhance-types."""
    return () if args.no_enhance else tuple(args.enhance_types.split(","))


def run_shard(args, paths, root, out):
    """Every stage on one list of images; stage files go to out/stages. Returns (pairs, counts)."""
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    model, tok, image_cfg = load_pretrained(args.model, dtype=dtype, device=args.device, need_tokenizer=True)
    model.eval()
    args = argparse.Namespace(**{**vars(args), "out": out})
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
        noised.append(noised_image(x, args.noise_step, args.seed, name, args.round))
    counts["images"] = len(names)
    if not names:
        return [], counts
    clean_feats = encode_images(model, torch.stack(clean).to(args.device, dtype), args.batch_size)
    noised_feats = encode_images(model, torch.stack(noised).to(args.device, dtype), args.batch_size)
    # Keys/values of the system text and of each image (clean and noised) are computed at the first stage that sees
    # them and reused by all later ones (sena.generation): later prompts prefill their own words only.
    fits = prefix_cache_bytes(model, tok, 2 * len(names)) <= args.prefix_cache_gb * 2**30
    args.prefix_cache = {} if fits else None

    raw_q, questions = ask_questions(model, tok, clean_feats, names, args, counts)
    keep = [i for i, q in enumerate(questions) if q is not None]
    rng = [seeds.rng(args.seed, "describe-prompt", args.round, names[i]) for i in keep]
    des_users = [r.choice(prompts.DESCRIBE_PROMPTS) + prompts.DES_SUFFIX for r in rng]
    gen_users = [questions[i] + prompts.GEN_SUFFIX for i in keep]

    # Stages 3-4: the same two prompts on the clean image (chosen) and the noised image (rejected).
    cf, nf = clean_feats[keep], noised_feats[keep]
    kept = [names[i] for i in keep]
    des_clean = run_prompts(model, tok, cf, des_users, args, "des_clean", kept)
    gen_clean = run_prompts(model, tok, cf, gen_users, args, "gen_clean", kept)
    des_noised = run_prompts(model, tok, nf, des_users, args, "des_noised", kept)
    gen_noised = run_prompts(model, tok, nf, gen_users, args, "gen_noised", kept)

    des_se = gen_se = [None] * len(keep)
    if "des" in enhanced(args):
        des_se = enhance(model, tok, cf, des_clean, des_users, des_clean, args, "enhance_des", kept)
    if "gen" in enhanced(args):
        gen_se = enhance(model, tok, cf, des_clean, gen_users, gen_clean, args, "enhance_gen", kept)
    counts["se_accepted_des"] = sum(s is not None for s in des_se)
    counts["se_accepted_gen"] = sum(s is not None for s in gen_se)
    counts["candidate_pairs"] = 2 * len(keep)

    pairs = []
    for j, i in enumerate(keep):
        for kind, user, raw, se, rej in (("des", des_users[j], des_clean[j], des_se[j], des_noised[j]),
                                          ("gen", gen_users[j], gen_clean[j], gen_se[j], gen_noised[j])):
            chosen = se if se is not None else raw
            pairs.append({"id": f"r{args.round}/{names[i]}/{kind}", "image": names[i], "images": [names[i]],
                          "type": kind, "prompt": user, "chosen": chosen, "rejected": rej,
                          "question_raw": raw_q[i], "question": questions[i], "description": des_clean[j],
                          "chosen_raw": raw, "se_accepted": se is not None})
    return pairs, counts


def round_images(args):
    """(sorted image paths, root) of this round: a folder, or an image list with its root, offset and counts."""
    return list_images(args.images, args.image_list, args.image_root, args.offset, args.num_images, args.per_source,
                       args.seed)


def round_inputs(args, paths, root):
    """What a round's pairs are a function of: the settings, the model's weights and the images' names and bytes.

    Batch size, device, output folder and threads are left out: greedy answers do not depend on how prompts are
    batched (tests/test_generation.py). Paths are left out too: the model and the images count by their bytes.
    Stage files are reused only under the same inputs, and report.json keeps this record so that train.py can tell
    a round's pairs from stale ones before it trains on them.
    """
    settings = {k: v for k, v in vars(args).items() if k not in ("batch_size", "device", "out", "prefix_cache_gb",
                                                                "threads", "signature", "model", "images",
                                                                "image_list", "image_root")}
    images = hashlib.sha256()
    for p in paths:
        # An entry that cannot be read (a folder named x.png, a dangling symlink or a loop) counts as unreadable here
        # and is skipped and counted by run_shard; a name that is not UTF-8 is hashed by its bytes.
        try:
            content = sha256_file(p)
        except OSError as e:
            content = f"unreadable {e.errno}"
        images.update(os.fsencode(os.path.relpath(p, root)) + f"\0{content}\n".encode())
    try:
        weights = sha256_weights(args.model)
    except FileNotFoundError:  # before load_pretrained would say the same
        raise ModelDirError(f"{args.model}: no model.safetensors or model.safetensors.index.json") from None
    return {"settings": hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16],
            "model_sha256": weights, "images_sha256": images.hexdigest(), "n_images": len(paths)}


def generate_round(args):
    """One round's pairs: every stage on args' images with args.model, then the filters; writes pairs.jsonl and
    report.json to args.out and returns the report. args: generate.py's flags (sena.flags.generate_flags)."""
    t0 = time.time()
    rank, world = dist.setup()
    os.makedirs(args.out, exist_ok=True)
    paths, root = round_images(args)
    # Stage files from an interrupted run are reused only under the same inputs (round_inputs).
    inputs = round_inputs(args, paths, root)
    args.signature = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]

    # Under torchrun each rank takes every world-th image and keeps its own stage files; rank 0 merges. Answers
    # depend only on (model, image, seed, round), so N processes give the same pairs as one.
    out = args.out if world == 1 else os.path.join(args.out, f"rank_{rank}")
    pairs, counts = run_shard(args, paths[rank::world], root, out)
    if world > 1:
        atomic_write_text(os.path.join(out, "shard.json"), json.dumps({"pairs": pairs, "counts": counts}))
        dist.barrier()
        shards = [read_json(os.path.join(args.out, f"rank_{r}", "shard.json")) for r in range(world)]
        pairs = sorted((p for s in shards for p in s["pairs"]), key=lambda p: (p["image"], p["type"]))
        counts = {k: sum(s["counts"][k] for s in shards) for k in STAGE_COUNTS}
    if counts["images"] == 0:
        dist.shutdown()
        raise UserError(f"no readable images in {args.images or args.image_list} "
                        f"(skipped {counts['images_unreadable']})")

    # Stage 6: the pair filters, each counted.
    filtered = dict.fromkeys(FILTERS, 0)
    kept = []
    for p in pairs:
        reason = pair_filter(p["chosen"], p["rejected"], args.keep_yes_no)
        if reason is None:
            kept.append(p)
        else:
            filtered[reason] += 1
    n_q = max(counts["questions_kept"], 1)
    report = {"round": args.round, "model": args.model, **counts, "image_root": os.path.abspath(root),
              "se_accept_rate_des": counts["se_accepted_des"] / n_q if "des" in enhanced(args) else None,
              "se_accept_rate_gen": counts["se_accepted_gen"] / n_q if "gen" in enhanced(args) else None,
              "filtered": filtered, "pairs": len(kept),
              "pairs_des": sum(p["type"] == "des" for p in kept), "pairs_gen": sum(p["type"] == "gen" for p in kept),
              "mean_words_chosen": sum(len(p["chosen"].split()) for p in kept) / max(len(kept), 1),
              "mean_words_rejected": sum(len(p["rejected"].split()) for p in kept) / max(len(kept), 1),
              "settings": {k: v for k, v in vars(args).items() if k != "signature"}, "inputs": inputs,
              "processes": world,
              "seconds": round(time.time() - t0, 1)}
    if rank == 0:
        atomic_write_text(os.path.join(args.out, "pairs.jsonl"), "".join(json.dumps(p) + "\n" for p in kept))
        atomic_write_text(os.path.join(args.out, "report.json"), json.dumps(report, indent=2))
        print(f"round {args.round}: {report['images']} images -> {report['questions_kept']} questions -> "
              f"{len(kept)} pairs ({report['pairs_des']} des, {report['pairs_gen']} gen); filtered {filtered}; "
              f"{report['seconds']} s")
    dist.barrier()
    return report
