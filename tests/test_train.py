"""train.py on a tiny random model: step-0 loss ln 2, the reference cache and its key, the saved θ(1)."""

import json
import math
import os

import pytest
import torch

import train
from sena import tiny
from sena.batch import pair_batch, pair_logps, tokenize_pair
from sena.checkpoint import load_pretrained
from sena.refcache import cache_key, load_reference, score_pairs


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
    cached = score_pairs(model, tok, image_cfg, rows, imgs, batch_size=5)  # padded batches of mixed lengths
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
    with pytest.raises(SystemExit, match="python train.py --iter 2"):
        train.main(["--iter", "3", "--base", base, "--images", imgs, "--run-dir", str(run), "--no-eval"])


def test_mismatched_reference_cache_is_refused(setup):
    root, base, imgs = setup
    run = root / "run_b"
    rows = tiny.pairs(run / "iter_1", imgs, 6)
    pairs_path = run / "iter_1" / "pairs.jsonl"
    model, tok, image_cfg = load_pretrained(base)
    from sena.refcache import save_reference
    save_reference(str(run / "iter_1" / "ref_logps.safetensors"),
                   score_pairs(model, tok, image_cfg, rows, imgs), cache_key(str(pairs_path), base))
    with pytest.raises(ValueError, match="reference cache key does not match"):  # scored in another precision
        load_reference(str(run / "iter_1" / "ref_logps.safetensors"),
                       cache_key(str(pairs_path), base, "bfloat16+autocast"))
    with open(pairs_path, "a") as f:  # the pairs change after the cache was written
        f.write(json.dumps(rows[0]) + "\n")
    with pytest.raises(ValueError, match="reference cache key does not match"):
        load_reference(str(run / "iter_1" / "ref_logps.safetensors"), cache_key(str(pairs_path), base))
    with pytest.raises(ValueError, match="reference cache key does not match"):
        train.main(["--iter", "1", "--base", base, "--images", imgs, "--run-dir", str(run), "--no-eval"])
    assert not os.path.exists(run / "iter_1" / "model")
