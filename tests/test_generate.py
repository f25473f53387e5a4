"""generate.py through the scripted decoding of tests/scripted.py (a model that says something): files, report
bookkeeping, determinism with non-empty pairs of both types, that it reads images only, and --enhance-types."""

import builtins
import json
import os

import pytest
import torch

import generate
from sena import selfplay, tiny
from sena.checkpoint import load_pretrained
from sena.image import load_image, preprocess
from sena.noise import noised_image
from tests import scripted

MIN_PAIRS = 4  # of each type; the scripted model gives 11 des and 5 gen pairs on these 20 images


@pytest.fixture(autouse=True)
def scripted_decoding(monkeypatch):
    monkeypatch.setattr(selfplay, "generate", scripted.scripted_generate)


def run(tmp_path, out, extra=()):
    base = scripted.model_dir(tmp_path / "base") if not (tmp_path / "base").exists() else str(tmp_path / "base")
    imgs = tiny.images(tmp_path / "pool", 20) if not (tmp_path / "pool").exists() else str(tmp_path / "pool")
    return generate.main(["--model", base, "--images", imgs, "--out", str(tmp_path / out), "--round", "2",
                          "--max-new-tokens", "96", *extra])


def read_pairs(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_generate_is_deterministic_and_counts_add_up(tmp_path):
    a = run(tmp_path, "a")
    b = run(tmp_path, "b", ["--batch-size", "3"])  # batching must not change a single answer
    pairs = read_pairs(tmp_path / "a" / "pairs.jsonl")
    assert a["pairs_des"] >= MIN_PAIRS and a["pairs_gen"] >= MIN_PAIRS, a  # the comparison below is not vacuous
    assert (tmp_path / "a" / "pairs.jsonl").read_bytes() == (tmp_path / "b" / "pairs.jsonl").read_bytes()
    assert a["images"] == 20 and a["images_unreadable"] == 0
    # Every branch of stage 1 ran: questions without '?', dropped by the self-check, rewritten, asking for a name.
    assert a["questions_raw"] < 20 and a["self_check_dropped"] > 0 and a["self_check_rewritten"] > 0
    assert a["questions_name_dropped"] > 0
    assert a["questions_kept"] == a["questions_raw"] - a["self_check_dropped"] - a["questions_name_dropped"]
    assert a["candidate_pairs"] == 2 * a["questions_kept"]
    assert a["pairs"] + sum(a["filtered"].values()) == a["candidate_pairs"] == len(pairs) + sum(a["filtered"].values())
    assert a["filtered"]["yes_no"] > 0 and a["filtered"]["identical"] + a["filtered"]["rejected_in_chosen"] > 0
    assert 0 < a["se_accepted_des"] < a["questions_kept"] and 0 < a["se_accepted_gen"] < a["questions_kept"]
    assert all(p["chosen"] != p["rejected"] for p in pairs)
    assert {k: v for k, v in a.items() if k not in ("seconds", "settings")} == {
        k: v for k, v in b.items() if k not in ("seconds", "settings")}
    with open(tmp_path / "a" / "report.json") as f:
        report = json.load(f)
    assert report["pairs"] == len(pairs) and report["pairs_des"] == sum(p["type"] == "des" for p in pairs)


def test_each_answer_belongs_to_its_image_and_prompt(tmp_path):
    """Stages sort prompts by length and resume from files; every answer must still land on its own image: each
    pair's clean and noised answers equal the scripted reply computed here, image by image, from scratch."""
    run(tmp_path, "a")
    model, _, image_cfg = load_pretrained(str(tmp_path / "base"))
    pairs = read_pairs(tmp_path / "a" / "pairs.jsonl")
    assert len(pairs) >= 2 * MIN_PAIRS
    for p in pairs:
        x = preprocess(load_image(tmp_path / "pool" / p["image"]), image_cfg)
        noised = noised_image(x, 600, 0, p["image"], 2)
        with torch.no_grad():
            clean_key, noised_key = (scripted.image_key(model.encode_images(t[None])[0]) for t in (x, noised))
        assert p["chosen_raw"] == scripted.reply(p["prompt"], clean_key)[:96], p["id"]
        assert p["rejected"] == scripted.reply(p["prompt"], noised_key)[:96], p["id"]


def test_generate_reads_only_images_and_skips_bad_ones(tmp_path, monkeypatch, capsys):
    tiny.images(tmp_path / "pool", 20)
    (tmp_path / "pool" / "broken.png").write_bytes(b"not a png")
    (tmp_path / "labels.jsonl").write_text("{}\n")  # labels exist on disk but must never be opened
    opened = []
    real_open = builtins.open

    def spy(file, *a, **k):
        opened.append(os.path.abspath(str(file)))
        return real_open(file, *a, **k)

    monkeypatch.setattr(builtins, "open", spy)
    report = run(tmp_path, "c")
    assert report["images"] == 20 and report["images_unreadable"] == 1 and report["pairs"] > 0
    assert "broken.png" in capsys.readouterr().err
    assert not any(p.endswith((".jsonl",)) and "labels" in p for p in opened)
    assert not any(p.endswith("labels.jsonl") for p in opened)


def test_enhance_types_gen_leaves_descriptions_raw(tmp_path):
    """--enhance-types gen: the description rewrite stage never runs, des pairs keep the raw clean answer."""
    report = run(tmp_path, "g", ["--enhance-types", "gen"])
    stages = sorted(os.listdir(tmp_path / "g" / "stages"))
    assert any("enhance_gen" in s for s in stages) and not any("enhance_des" in s for s in stages), stages
    pairs = read_pairs(tmp_path / "g" / "pairs.jsonl")
    des = [p for p in pairs if p["type"] == "des"]
    gen = [p for p in pairs if p["type"] == "gen"]
    assert len(des) >= MIN_PAIRS and len(gen) >= MIN_PAIRS, (len(des), len(gen))
    assert all(p["chosen"] == p["chosen_raw"] and not p["se_accepted"] for p in des)
    assert any(p["chosen"] != p["chosen_raw"] for p in gen)  # the short answers were rewritten
    with open(tmp_path / "g" / "report.json") as f:
        assert report["se_accepted_des"] == 0 and json.load(f)["se_accept_rate_des"] is None
    run(tmp_path, "b")  # the default rewrites descriptions too: the check above can fail
    assert any("enhance_des" in s for s in os.listdir(tmp_path / "b" / "stages"))
    assert any(p["chosen"] != p["chosen_raw"] for p in read_pairs(tmp_path / "b" / "pairs.jsonl") if p["type"] == "des")


def test_sampled_questions_depend_on_seed_round_and_image_not_on_batching(tmp_path, monkeypatch):
    """--ask-temperature: the self-asked question is drawn, not argmaxed, from a stream seeded by (seed, round, image),
    so batch size (and hence sharding or a resume) cannot change it, while another seed or round does."""
    from glob import glob

    from sena import prompts
    from sena.generation import generate as real_generate
    from sena.settings import generation_settings

    monkeypatch.setattr(selfplay, "generate", real_generate)
    model, tok, cfg = load_pretrained(tiny.model_dir(tmp_path / "m"), need_tokenizer=True)
    paths = sorted(glob(os.path.join(tiny.images(tmp_path / "img", 6), "*")))
    feats = selfplay.encode_images(model, torch.stack([preprocess(load_image(p), cfg) for p in paths]), 4)
    keys = [os.path.basename(p) for p in paths]

    def ask(out, batch, seed=0, rnd=1, temperature=1.0):
        settings = generation_settings(batch_size=batch, max_new_tokens=12, seed=seed)
        stages = selfplay.Stages(settings, rnd, str(tmp_path / out), "s", None)
        return selfplay.run_prompts(model, tok, feats, [prompts.ASK_QUESTION] * len(keys), stages, "ask", keys,
                                    temperature=temperature)

    a = ask("a", 4)
    assert all(a) and len(set(a)) > 1  # non-empty, and not one string for every image
    assert ask("b", 1) == a
    assert ask("c", 4, seed=1) != a and ask("d", 4, rnd=2) != a
    assert ask("e", 4, temperature=0.0) != a
