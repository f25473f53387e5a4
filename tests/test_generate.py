"""generate.py on a tiny random model: files, report bookkeeping, determinism, and that it reads images only."""

import builtins
import json
import os

import generate
from tests import tiny


def run(tmp_path, out, extra=()):
    base = tiny.model_dir(tmp_path / "base") if not (tmp_path / "base").exists() else str(tmp_path / "base")
    imgs = tiny.images(tmp_path / "pool", 5) if not (tmp_path / "pool").exists() else str(tmp_path / "pool")
    return generate.main(["--model", base, "--images", imgs, "--out", str(tmp_path / out), "--round", "2",
                          "--max-new-tokens", "12", *extra])


def test_generate_is_deterministic_and_counts_add_up(tmp_path):
    a = run(tmp_path, "a")
    b = run(tmp_path, "b")
    assert (tmp_path / "a" / "pairs.jsonl").read_bytes() == (tmp_path / "b" / "pairs.jsonl").read_bytes()
    assert a["images"] == 5 and a["images_unreadable"] == 0
    assert a["questions_kept"] <= a["questions_raw"] <= a["images"]
    assert a["candidate_pairs"] == 2 * a["questions_kept"]
    assert a["pairs"] + sum(a["filtered"].values()) == a["candidate_pairs"]
    assert {k: v for k, v in a.items() if k not in ("seconds", "settings")} == {
        k: v for k, v in b.items() if k not in ("seconds", "settings")}
    report = json.load(open(tmp_path / "a" / "report.json"))
    assert report["pairs"] == len(open(tmp_path / "a" / "pairs.jsonl").readlines())


def test_generate_reads_only_images_and_skips_bad_ones(tmp_path, monkeypatch, capsys):
    tiny.images(tmp_path / "pool", 5)
    (tmp_path / "pool" / "broken.png").write_bytes(b"not a png")
    (tmp_path / "labels.jsonl").write_text("{}\n")  # labels exist on disk but must never be opened
    opened = []
    real_open = builtins.open

    def spy(file, *a, **k):
        opened.append(os.path.abspath(str(file)))
        return real_open(file, *a, **k)

    monkeypatch.setattr(builtins, "open", spy)
    report = run(tmp_path, "c")
    assert report["images"] == 5 and report["images_unreadable"] == 1
    assert "broken.png" in capsys.readouterr().err
    assert not any(p.endswith((".jsonl",)) and "labels" in p for p in opened)
    assert not any(p.endswith("labels.jsonl") for p in opened)


def test_enhance_types_gen_leaves_descriptions_raw(tmp_path):
    """--enhance-types gen: the description rewrite stage never runs, des pairs keep the raw clean answer."""
    report = run(tmp_path, "g", ["--enhance-types", "gen"])
    stages = sorted(os.listdir(tmp_path / "g" / "stages"))
    assert any("enhance_gen" in s for s in stages) and not any("enhance_des" in s for s in stages), stages
    pairs = [json.loads(line) for line in open(tmp_path / "g" / "pairs.jsonl")]  # (the tiny model's des pairs are
    assert all(p["chosen"] == p["chosen_raw"] for p in pairs if p["type"] == "des")  # often all filtered)
    assert report["se_accepted_des"] == 0 and json.load(open(tmp_path / "g" / "report.json"))[
        "se_accept_rate_des"] is None
    run(tmp_path, "b")
    assert any("enhance_des" in s for s in os.listdir(tmp_path / "b" / "stages"))  # the default does run it
