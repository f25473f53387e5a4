"""train.py on a tiny random model: step-0 loss ln 2, every step's loss and learning rate by hand, the reference
cache, its key and its step-0 check, gradient accumulation, the saved θ(1)."""

import json
import math
import os
import shutil

import pytest
import torch

import train
from sena import tiny
from sena.batch import pair_batch, pair_logps, tokenize_pair
from sena.checkpoint import load_pretrained, save_pretrained
from sena.cli import UserError
from sena.refcache import cache_key, load_reference, reference_logps, save_reference
from sena.schedule import lr_at


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    base = tiny.model_dir(root / "base")
    imgs = tiny.images(root / "images", 6)
    return root, base, imgs


def test_cached_reference_equals_per_pair_forward(setup):
    root, base, imgs = setup
    rows = tiny.pairs(root / "r", imgs, 6)
    model, tok, image_cfg = load_pretrained(base)
    cached = reference_logps(model, tok, image_cfg, rows, imgs, batch_size=5)  # padded batches of mixed lengths
    for i in (0, 3, 11):  # one pair at a time: no padding at all
        batch = pair_batch([tokenize_pair(tok, model.config, rows[i])], tok.pad_token_id)
        from sena.batch import load_pixels
        with torch.no_grad():
            live = pair_logps(model, batch, model.encode_images(load_pixels([rows[i]], imgs, image_cfg)))
        assert abs(live[0].item() - cached["ref_chosen_logps"][i].item()) < 1e-4
        assert abs(live[1].item() - cached["ref_rejected_logps"][i].item()) < 1e-4
        assert abs(live[2].item() - cached["ref_chosen_mean_logps"][i].item()) < 1e-5
    assert cached["ref_chosen_logps"].shape == (12,)


def test_round_trains_from_step0_ln2_and_saves(setup, capsys):
    root, base, imgs = setup
    run = root / "run_a"
    tiny.pairs(run / "iter_1", imgs, 6)
    train.main(["--iter", "1", "--base", base, "--images", imgs, "--run-dir", str(run), "--batch-size", "4",
                "--micro-batch-size", "2", "--epochs", "2", "--lr", "1e-2", "--no-eval"])
    out = capsys.readouterr().out
    assert "reference check: cached vs live" in out
    log = [json.loads(line) for line in (run / "iter_1" / "log.jsonl").read_text().splitlines()]
    assert len(log) == 6  # 12 pairs x 2 epochs / 4 pairs per step
    assert abs(log[0]["dpo"] - math.log(2)) < 1e-5  # policy == reference at step 0
    assert abs(log[0]["rewards/margins"]) < 1e-5
    for key in ("loss", "ica", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "logps/chosen",
                "logps/rejected", "grad_norm", "lr", "tokens_per_s"):
        assert key in log[0]
    assert log[-1]["rewards/margins"] > 0.05  # DPO moved the policy toward chosen
    model, _, _ = load_pretrained(str(run / "iter_1" / "model"))
    ref, _, _ = load_pretrained(base)
    diff = max((a - b).abs().max().item() for a, b in zip(model.state_dict().values(), ref.state_dict().values()))
    assert diff > 0  # the merged LoRA changed the weights
    meta = json.loads((run / "iter_1" / "meta.json").read_text())
    assert meta["round"] == 1 and meta["inputs"]["reference_cache_key"].startswith("pairs:")
    # A rerun finds the round done; round 3 without round 2 says what to run.
    train.main(["--iter", "1", "--base", base, "--images", imgs, "--run-dir", str(run), "--no-eval"])
    assert "done already" in capsys.readouterr().out
    with pytest.raises(UserError, match="python train.py --iter 2"):
        train.main(["--iter", "3", "--base", base, "--images", imgs, "--run-dir", str(run), "--no-eval"])


def test_mismatched_reference_cache_is_refused(setup):
    root, base, imgs = setup
    run = root / "run_b"
    rows = tiny.pairs(run / "iter_1", imgs, 6)
    pairs_path = run / "iter_1" / "pairs.jsonl"
    model, tok, image_cfg = load_pretrained(base)
    from sena.refcache import save_reference
    save_reference(str(run / "iter_1" / "ref_logps.safetensors"),
                   reference_logps(model, tok, image_cfg, rows, imgs), cache_key(str(pairs_path), base))
    with pytest.raises(ValueError, match=r"key does not match \(the precision changed"):  # scored in another precision
        load_reference(str(run / "iter_1" / "ref_logps.safetensors"),
                       cache_key(str(pairs_path), base, "bfloat16+autocast"))
    with open(pairs_path, "a") as f:  # the pairs change after the cache was written
        f.write(json.dumps(rows[0]) + "\n")
    with pytest.raises(ValueError, match=r"key does not match \(the pairs changed since it was scored\)"):
        load_reference(str(run / "iter_1" / "ref_logps.safetensors"), cache_key(str(pairs_path), base))
    with pytest.raises(ValueError, match="reference cache key does not match"):
        train.main(["--iter", "1", "--base", base, "--images", imgs, "--run-dir", str(run), "--no-eval"])
    assert not os.path.exists(run / "iter_1" / "model")


def uniform_model(path, base):
    """The tiny model with lm_head = 0: every next-token distribution is uniform over its V words, so every answer
    token has log-prob −ln V whatever the other weights, and no gradient reaches them (∂L/∂h = lm_headᵀ·∂L/∂logits
    = 0): every step computes the same loss. Returns (directory, V)."""
    model, tok, image_cfg = load_pretrained(base, need_tokenizer=True)
    torch.nn.init.zeros_(model.lm_head.weight)
    save_pretrained(model, path, tokenizer=tok, image_cfg=image_cfg)
    return str(path), model.config.text.vocab_size


@pytest.mark.parametrize("reduction", ["batch", "des"])
def test_every_step_loss_and_lr_by_hand(setup, reduction):
    """The composed loss and the schedule, by hand. 4 pairs (3 des, 1 gen), all in every step (batch 4, 2
    micro-batches of 2), 6 epochs = 6 steps, λ = 0.5, warmup 0.5 · 6 = 3 steps, lr 1e-3. With every log-prob
    −|answer|·ln V (uniform_model), policy = reference at every step:
        dpo  = −log σ(0) = ln 2                          (mean over the batch; a sum would give 2 ln 2 per micro-batch)
        ica  = (3 des · ln V) / 4 pairs = 0.75 ln V      (--ica-reduction batch; on the gen pair instead: 0.25 ln V)
             = (ln V per des pair) averaged over des  = ln V   (--ica-reduction des; each micro-batch holds a des)
        loss = ln 2 + 0.5 · ica
        lr   = 1e-3 · (1/3, 2/3, 1)  warmup, then 1e-3 · ½(1 + cos(π·p)), p = 0, 1/3, 2/3: 1e-3 · (1, 0.75, 0.25)
    """
    root, base, imgs = setup
    model_dir, V = uniform_model(root / f"uniform_{reduction}", base)
    run = root / f"run_hand_{reduction}"
    rows = tiny.pairs(run / "iter_1", imgs, 3)
    rows = [r for r in rows if r["type"] == "des"] + [rows[1]]  # des0, des1, des2, gen0
    (run / "iter_1" / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    train.main(["--iter", "1", "--base", model_dir, "--images", imgs, "--run-dir", str(run), "--batch-size", "4",
                "--micro-batch-size", "2", "--epochs", "6", "--warmup-ratio", "0.5", "--ica-weight", "0.5",
                "--lr", "1e-3", "--ica-reduction", reduction, "--no-eval"])
    log = [json.loads(line) for line in (run / "iter_1" / "log.jsonl").read_text().splitlines()]
    ica = {"batch": 0.75, "des": 1.0}[reduction] * math.log(V)
    assert [r["step"] for r in log] == list(range(6))
    for r, lr in zip(log, [1 / 3, 2 / 3, 1, 1, 0.75, 0.25]):
        assert abs(r["dpo"] - math.log(2)) < 1e-6 and abs(r["rewards/margins"]) < 1e-6, r
        assert abs(r["ica"] - ica) < 1e-5, (r["ica"], ica)
        assert abs(r["loss"] - (math.log(2) + 0.5 * ica)) < 1e-5, (r["loss"], math.log(2) + 0.5 * ica)
        assert abs(r["lr"] - 1e-3 * lr) < 1e-12, (r["step"], r["lr"], lr)
        assert r["grad_norm"] == 0.0


def test_lr_schedule_by_hand():
    """lr_at with warmup 4 of 10 steps, peak 2, floor 0.1: (step+1)/4 of the peak while warming up, then
    2·(0.1 + 0.9·½(1 + cos(π·p))), p = (step − 4)/6; constant holds the peak after warmup."""
    got = [lr_at(s, 10, 2.0, 4, floor=0.1) for s in range(10)]
    cos = [2 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p / 6))) for p in range(6)]
    want = [0.5, 1.0, 1.5, 2.0] + cos
    assert cos[0] == 2.0 and abs(cos[3] - 1.1) < 1e-12  # p = 0: the peak; p = 1/2: halfway to the floor
    assert max(abs(a - b) for a, b in zip(got, want)) < 1e-12, got
    assert [lr_at(s, 10, 2.0, 4, constant=True) for s in (0, 3, 4, 9)] == [0.5, 2.0, 2.0, 2.0]
    assert lr_at(0, 1, 2.0, 1) == 2.0  # one step, one warmup step: the peak at once


def test_reference_cache_key_follows_the_reference_weights(setup):
    """The key changes with the reference's bytes (one weight changed), not with where it lies; train.py refuses a
    cache scored by another reference before it trains."""
    root, base, imgs = setup
    model, tok, image_cfg = load_pretrained(base, need_tokenizer=True)
    with torch.no_grad():
        model.lm_head.weight[0, 0] += 1.0
    other = str(root / "other_ref")
    save_pretrained(model, other, tokenizer=tok, image_cfg=image_cfg)
    copy = shutil.copytree(base, root / "base_copy")
    run = root / "run_key"
    rows = tiny.pairs(run / "iter_1", imgs, 2)
    pairs_path = str(run / "iter_1" / "pairs.jsonl")
    assert cache_key(pairs_path, base) != cache_key(pairs_path, other)
    assert cache_key(pairs_path, base) == cache_key(pairs_path, str(copy))
    ref_model, _, _ = load_pretrained(base)
    save_reference(str(run / "iter_1" / "ref_logps.safetensors"),
                   reference_logps(ref_model, tok, image_cfg, rows, imgs), cache_key(pairs_path, base))
    with pytest.raises(ValueError, match=r"key does not match \(the reference weights changed since it was scored\)"):
        train.main(["--iter", "1", "--base", other, "--images", imgs, "--run-dir", str(run), "--no-eval"])


def test_step0_check_refuses_a_cache_that_differs_from_the_reference(setup):
    """A cache under the right key whose chosen log-probs are off by 0.01 (a tenth of a nat per hundred tokens) is
    refused at step 0: the live reference forward differs by exactly that, above the fp32 tolerance 1e-3."""
    root, base, imgs = setup
    run = root / "run_check"
    rows = tiny.pairs(run / "iter_1", imgs, 2)
    model, tok, image_cfg = load_pretrained(base, need_tokenizer=True)
    ref = reference_logps(model, tok, image_cfg, rows, imgs)
    ref["ref_chosen_logps"] += 0.01
    pairs_path = str(run / "iter_1" / "pairs.jsonl")
    save_reference(str(run / "iter_1" / "ref_logps.safetensors"), ref, cache_key(pairs_path, base))
    with pytest.raises(UserError, match=r"log-probs differ from a live forward by 1\.00e-02 > 1\.0e-03"):
        train.main(["--iter", "1", "--base", base, "--images", imgs, "--run-dir", str(run), "--no-eval"])
    assert not os.path.exists(run / "iter_1" / "log.jsonl") or not (run / "iter_1" / "log.jsonl").read_text()


def test_gradient_accumulation_equals_one_big_batch(setup):
    """One process, 4 pairs a step as 4 micro-batches of 1 or 1 of 4: each micro-batch's loss is divided by the
    number of micro-batches, so the summed gradients are the big batch's mean. Same losses, gradient norms (before
    clipping; AdamW itself hides a gradient scaled by a constant) and weights."""
    root, base, imgs = setup
    logs, weights = {}, {}
    for micro in (1, 4):
        run = root / f"run_accum_{micro}"
        tiny.pairs(run / "iter_1", imgs, 6)
        train.main(["--iter", "1", "--base", base, "--images", imgs, "--run-dir", str(run), "--batch-size", "4",
                    "--micro-batch-size", str(micro), "--epochs", "1", "--lr", "1e-2", "--no-eval"])
        logs[micro] = [json.loads(line) for line in (run / "iter_1" / "log.jsonl").read_text().splitlines()]
        weights[micro] = load_pretrained(str(run / "iter_1" / "model"))[0].state_dict()
    assert len(logs[1]) == len(logs[4]) == 3
    for a, b in zip(logs[1], logs[4]):
        for key in ("loss", "dpo", "ica", "grad_norm"):
            assert abs(a[key] - b[key]) <= 1e-5 * abs(b[key]), (key, a[key], b[key])
    assert min(r["grad_norm"] for r in logs[4]) > 0.01  # the comparison is not of zeros
    for name, w in weights[4].items():
        assert (weights[1][name] - w).abs().max() < 1e-5, name
