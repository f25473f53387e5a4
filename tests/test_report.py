"""sena/report.py and `evaluate.py report`: a synthetic two-round world run (no model) rendered to one HTML file that
holds no external reference, marks answers right/wrong from the scene labels, shows the noised copy generate.py made,
survives missing pieces, and renders in headless chromium to a screenshot with images in it."""

import base64
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate
from sena.image import default_image_cfg
from sena.noise import noise_generator
from sena.report import build_report, curves_png, noised_rgb
from sena.world import write_split
from sena.world.evaluation import run_benchmarks
from sena.world.language import describe
from sena.world.scenes import COLORS, SHAPES, sample_scenes

N_IMAGES = 4  # per round; the gallery shows them all (images-per-round 6)


def _answerer(good):
    """Scripted answers for the benchmarks: gold answers (good) or 'Yes' to everything."""

    def answer(reqs):
        for r in reqs:
            r["answer"] = {"ask": "How many objects are there?", "self_check": "QUESTION: How many objects are there?",
                           "improve": "Improved Answer: red"}.get(r["task"], r["gold"] if good else "Yes")
            r["answer"] = r["answer"] or "Yes"

    return answer


def _pairs(scenes):
    """Per scene a gen pair (right colour vs a wrong one) and a des pair (gold vs an absent shape)."""
    out = []
    for sc in scenes:
        o = sc["objects"][0]
        absent = next(s for s in SHAPES if s not in {x["shape"] for x in sc["objects"]})
        wrong = next(c for c in COLORS if c != o["color"])
        q = f"What color is the {o['shape']}?"
        common = {"image": sc["image"], "question_raw": "What is in the image?", "question": q,
                  "description": describe(sc)}
        out.append(common | {"type": "gen", "prompt": q + " Answer briefly.", "chosen_raw": f"It is {o['color']}.",
                             "chosen": o["color"], "rejected": wrong, "se_accepted": True})
        out.append(common | {"type": "des", "prompt": "Describe the image.", "chosen_raw": describe(sc),
                             "chosen": describe(sc), "rejected": f"There is a {absent}.", "se_accepted": False})
    return out


def make_run(root):
    """runs/<name> as train.py leaves it after two rounds; round 2 has no labels, log, meta or metrics."""
    run = os.path.join(root, "run")
    theta0, model1 = os.path.join(run, "theta0"), os.path.join(run, "iter_1", "model")
    test_scenes = sample_scenes(6, seed=5, prefix="test")
    for d, good in ((theta0, False), (model1, True)):
        os.makedirs(d)
        with open(os.path.join(d, "preprocessor_config.json"), "w") as f:
            json.dump(default_image_cfg(72), f)
        with open(os.path.join(d, "metrics.json"), "w") as f:
            json.dump(run_benchmarks(test_scenes, _answerer(good))[0], f)
    for k in (1, 2):
        pool, labels = os.path.join(run, "pool", f"iter_{k}"), os.path.join(run, "labels", f"pool_iter_{k}.jsonl")
        scenes = write_split(pool, N_IMAGES, seed=k, prefix=f"pool{k}", labels_path=labels)
        pairs = _pairs(scenes)
        d = os.path.join(run, f"iter_{k}")
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "pairs.jsonl"), "w") as f:
            f.writelines(json.dumps(p) + "\n" for p in pairs)
        report = {"round": k, "images": N_IMAGES, "questions_raw": N_IMAGES, "self_check_rewritten": N_IMAGES,
                  "questions_kept": N_IMAGES, "candidate_pairs": 2 * N_IMAGES, "pairs": len(pairs),
                  "filtered": {"identical": 0, "yes_no": 0}, "se_accept_rate_des": 0.0, "se_accept_rate_gen": 1.0,
                  "image_root": os.path.abspath(pool),
                  "settings": {"seed": 0, "round": k, "noise_step": 600, "model": theta0 if k == 1 else model1}}
        with open(os.path.join(d, "report.json"), "w") as f:
            json.dump(report, f)
    os.remove(os.path.join(run, "labels", "pool_iter_2.jsonl"))
    with open(os.path.join(run, "iter_1", "log.jsonl"), "w") as f:
        for s in range(5):
            f.write(json.dumps({"iter": 1, "step": s, "loss": 0.7 - 0.1 * s, "dpo": 0.69 - 0.1 * s, "ica": 0.01,
                                "rewards/margins": 0.1 * s, "rewards/accuracies": min(1.0, 0.5 + 0.1 * s),
                                "rewards/chosen": 0.05 * s, "rewards/rejected": -0.05 * s, "logps/chosen": -10 + s,
                                "logps/rejected": -12 - s, "grad_norm": 1.0}) + "\n")
    with open(os.path.join(run, "iter_1", "telemetry.json"), "w") as f:  # as train.py writes it (round 1 only)
        json.dump({"reference_prefers_chosen": {"des": {"n": 4, "summed": 0.75, "per_token": 0.5}},
                   "image_reliance": {"des": {"n": 4, "chosen": 0.25, "rejected": -0.125}}}, f)
    with open(os.path.join(run, "iter_1", "meta.json"), "w") as f:
        json.dump({"round": 1, "args": {"beta": 0.1, "seed": 0}, "git_commit": "abc123", "reference": theta0,
                   "seconds": {"reference": 1.0, "train": 2.0, "eval": 3.0}}, f)
    return run


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = make_run(str(tmp_path_factory.mktemp("report")))
    evaluate.main(["report", run])
    return run


def test_report_is_self_contained_and_marks_answers(run_dir):
    page = Path(run_dir, "report.html").read_text(encoding="utf-8")
    assert not re.search(r"https?:", page) and not re.search(r"""(src|href)\s*=\s*["']?//""", page)
    assert "<script" not in page and "<link" not in page and "url(" not in page and "@import" not in page
    srcs = re.findall(r"<img\b[^>]*?\bsrc=\"([^\"]*)\"", page)
    n_curves = 1 if curves_png([{"k": 1, "logs": [{"loss": 1.0}]}]) else 0
    assert len(srcs) == 2 * 2 * N_IMAGES + n_curves == page.count("<img")  # image + noised copy, per image, 2 rounds
    for src in srcs:
        assert src.startswith("data:image/png;base64,")
        Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).verify()
    # Round 1 has labels: every chosen answer is right and every rejected one wrong (2 pairs per image); the raw
    # question is not a template (unanswerable), the checked one is. Round 2 has no labels, hence no marks.
    r1, r2 = page.split("<h3>iter 2")[0], page.split("<h3>iter 2")[1].split("<h2>")[0]
    assert r1.count("✓ right") == r1.count("✗ wrong") == 2 * N_IMAGES
    assert r1.count("✗ unanswerable") == r1.count("✓ answerable") == N_IMAGES
    assert "no labels" in r2 and "✓" not in r2 and "✗" not in r2
    assert "It is red." in page or any(f"It is {c}." in page for c in COLORS)  # chosen raw → enhanced
    assert "noised t=600" in page
    # Data report: world correctness of round 1 and an empty cell for round 2; rates from the counts.
    row = re.search(r"world: chosen correct</td>(.*?)</tr>", page).group(1)
    assert "100.0%" in row and "—" in row
    assert re.search(r"pair acceptance</td><td[^>]*>100.0%", page)
    row = re.search(r"reference prefers chosen \(des\)</td>(.*?)</tr>", page).group(1)
    assert "75.0%" in row and "—" in row  # round 2 has no telemetry.json
    assert re.search(r"image reliance chosen / rejected \(des, nats/token\)</td><td[^>]*>\+0.250 / -0.125", page)
    # Benchmarks: θ0 answers 'Yes' to all, round 1 the gold: POPE accuracy 50 → 100 (+50.00), round 2 missing.
    row = re.search(r"pope_random_acc</td>(.*?)</tr>", page).group(1)
    assert re.findall(r"<td[^>]*>(.*?)</td>", row) == ["50.00", '100.00 <span class="up">(+50.00)</span>',
                                                       '<span class="muted">—</span>']


def test_noised_copy_is_generates_image(run_dir):
    """The gallery's noised copy, re-derived by hand: x_t = sqrt(ᾱ)·x0 + sqrt(1-ᾱ)·ε, ε from the (seed, image, round)
    generator, then ·std + mean. ᾱ_600 = 0.539118 (sena/noise.py). A 72 px world image needs no resize or pad."""
    cfg = default_image_cfg(72)
    name = sorted(os.listdir(os.path.join(run_dir, "pool", "iter_2")))[0]
    path = os.path.join(run_dir, "pool", "iter_2", name)
    got = np.asarray(noised_rgb(path, name, {"seed": 0, "round": 2, "noise_step": 600}, cfg), dtype=np.float64)
    x = np.asarray(Image.open(path).convert("RGB"), dtype=np.float64).transpose(2, 0, 1) / 255  # (3, 72, 72)
    mean, std = np.array(cfg["image_mean"])[:, None, None], np.array(cfg["image_std"])[:, None, None]
    eps = torch.randn((3, 72, 72), generator=noise_generator(0, name, 2)).double().numpy()
    a = 0.539118
    want = np.clip((math.sqrt(a) * (x - mean) / std + math.sqrt(1 - a) * eps) * std + mean, 0, 1) * 255
    assert np.abs(got.transpose(2, 0, 1) - want).max() <= 1.0  # rounding to uint8 (+ fp32)
    other = np.asarray(noised_rgb(path, name, {"seed": 0, "round": 3, "noise_step": 600}, cfg), dtype=np.float64)
    assert np.abs(other - got).mean() > 20  # another round draws other noise


def test_report_shows_what_exists(tmp_path, monkeypatch):
    """Pairs only: no report.json, labels, logs, metrics, image files or matplotlib; the tables still render."""
    d = tmp_path / "bare" / "iter_1"
    d.mkdir(parents=True)
    (d / "pairs.jsonl").write_text(json.dumps({"image": "a.png", "type": "gen", "chosen": "red", "rejected": "blue",
                                               "prompt": "q?"}) + "\nnot json\n")
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import fails as if matplotlib were absent
    page = build_report(str(tmp_path / "bare"))
    assert "image unavailable" in page and "no training logs" in page and "no metrics.json yet" in page
    assert "install matplotlib" in page and "<img" not in page and "stage / filter" in page
    assert build_report(str(tmp_path / "missing")).count("<table>") == 1  # no rounds: an empty data table


CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (Debian: apt-get install -y chromium)")
def test_report_renders_in_headless_chromium(run_dir, tmp_path):
    shot = tmp_path / "shot.png"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1200,1600",
           "file://" + os.path.abspath(os.path.join(run_dir, "report.html"))]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and shot.exists(), proc.stderr[-2000:]
    img = np.asarray(Image.open(shot).convert("RGB")).astype(np.int64)
    assert img.shape == (1600, 1200, 3)
    assert len(np.unique(img.reshape(-1, 3), axis=0)) > 100  # not a blank page
    # Text, tables and borders are grey; saturated pixels come from the images (world shapes, coloured noise) and
    # the marks. Two 132 px images per card are ~35k pixels each, most of them saturated noise.
    sat = img.max(axis=2) - img.min(axis=2) > 60
    assert sat.sum() > 20_000 and len(np.unique(img[sat], axis=0)) > 1000
