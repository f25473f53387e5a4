"""Round telemetry (sena/telemetry.py): hand-made values, and the noised scoring that image reliance rests on."""

import json

import pytest
import torch

import train
from sena import tiny
from sena.batch import pair_features
from sena.checkpoint import load_pretrained
from sena.image import load_image, preprocess
from sena.noise import add_diffusion_noise, noise_generator, noised_image
from sena.refcache import reference_logps
from sena.telemetry import image_reliance, reference_preference


def test_reference_preference_by_hand():
    # 4 pairs, des/gen/des/gen. Summed: chosen above rejected on pairs 0, 1, 3; per token only on pair 1.
    ref = {"ref_chosen_logps": torch.tensor([-5.0, -2.0, -9.0, -1.0]),
           "ref_rejected_logps": torch.tensor([-6.0, -3.0, -8.0, -4.0]),
           "ref_chosen_mean_logps": torch.tensor([-1.0, -0.5, -1.0, -1.0]),
           "ref_rejected_mean_logps": torch.tensor([-0.5, -1.0, -0.5, -0.5])}
    out = reference_preference(ref, ["des", "gen", "des", "gen"])
    assert out == {"all": {"n": 4, "summed": 0.75, "per_token": 0.25},
                   "des": {"n": 2, "summed": 0.5, "per_token": 0.0},
                   "gen": {"n": 2, "summed": 1.0, "per_token": 0.5}}


def test_image_reliance_by_hand():
    def f(c, r):
        return {"ref_chosen_mean_logps": torch.tensor(c), "ref_rejected_mean_logps": torch.tensor(r)}

    clean, noised = f([-1.0, -2.0, -0.5], [-3.0, -1.0, -2.0]), f([-2.0, -2.5, -1.5], [-3.0, -1.5, -1.0])
    out = image_reliance(clean, noised, ["des", "des", "gen"])
    # chosen: 1.0, 0.5, 1.0; rejected: 0.0, 0.5, -1.0
    assert out["all"] == pytest.approx({"n": 3, "chosen": 2.5 / 3, "rejected": -0.5 / 3})
    assert out["des"] == pytest.approx({"n": 2, "chosen": 0.75, "rejected": 0.25})
    assert out["gen"] == pytest.approx({"n": 1, "chosen": 1.0, "rejected": -1.0})


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("tele")
    return root, tiny.model_dir(root / "base"), tiny.images(root / "images", 4)


def test_noised_features_are_generate_py_noise(setup):
    root, base, imgs = setup
    model, tok, image_cfg = load_pretrained(base)
    rows = tiny.pairs(root / "r", imgs, 4)
    name = rows[0]["image"]
    # generate.py's rejected image: the preprocessed tensor, noised at t with the (seed, image, round) generator
    x = add_diffusion_noise(preprocess(load_image(f"{imgs}/{name}"), image_cfg), 600,
                            generator=noise_generator(3, name, 2))
    with torch.no_grad():
        want = model.encode_images(x[None])[0]
        got = pair_features(model, rows[:1], imgs, image_cfg, noise=(600, 3, 2))[0]
        clean = pair_features(model, rows[:1], imgs, image_cfg)[0]
    assert torch.equal(got, want)
    assert torch.equal(noised_image(preprocess(load_image(f"{imgs}/{name}"), image_cfg), 600, 3, name, 2), x)
    assert (got - clean).abs().max() > 1e-3  # the noise reached the features


def test_image_blind_model_relies_on_nothing(setup):
    root, base, imgs = setup
    model, tok, image_cfg = load_pretrained(base)
    rows = tiny.pairs(root / "r2", imgs, 4)
    noise = (999, 0, 1)
    seeing = image_reliance(reference_logps(model, tok, image_cfg, rows, imgs),
                            reference_logps(model, tok, image_cfg, rows, imgs, noise=noise), [r["type"] for r in rows])
    assert abs(seeing["all"]["chosen"]) > 1e-4  # a random model's answers do depend on its image tokens
    with torch.no_grad():  # every image becomes the same features: the projector's last bias
        last = model.model.multi_modal_projector.linear_2
        last.weight.zero_()
    blind = image_reliance(reference_logps(model, tok, image_cfg, rows, imgs),
                           reference_logps(model, tok, image_cfg, rows, imgs, noise=noise), [r["type"] for r in rows])
    assert blind["all"]["chosen"] == 0.0 and blind["all"]["rejected"] == 0.0


def test_round_writes_telemetry(setup, capsys):
    root, base, imgs = setup
    run = root / "run"
    rows = tiny.pairs(run / "iter_1", imgs, 4)
    train.main(["--iter", "1", "--base", base, "--images", imgs, "--run-dir", str(run), "--batch-size", "4",
                "--micro-batch-size", "4", "--epochs", "1", "--no-eval", "--reliance-pairs", "5"])
    assert "telemetry: reference prefers chosen" in capsys.readouterr().out
    tele = json.loads((run / "iter_1" / "telemetry.json").read_text())
    n_des = sum(r["type"] == "des" for r in rows)
    assert tele["reference_prefers_chosen"]["all"]["n"] == len(rows)
    assert tele["reference_prefers_chosen"]["des"]["n"] == n_des
    assert tele["image_reliance"]["all"]["n"] == 5 and tele["image_reliance_noise_step"] == 600
