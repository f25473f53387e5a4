"""Bad input: each case gets a one-line message naming the file, and data is skipped and counted, not fatal."""

import json

import numpy as np
import pytest
from PIL import Image

import generate
import train
from sena import tiny, trainer
from sena.checkpoint import load_pretrained
from sena.cli import UserError
from sena.image import default_image_cfg, load_image, preprocess
from sena.io import list_images, read_jsonl, safe_join


def write_odd_images(folder):
    """Every kind of image a real folder holds; returns {name: expected readable?}."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (30, 20, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(folder / "ok.png")
    Image.fromarray(rgb[:, :, 0]).save(folder / "grey_L.png")
    Image.fromarray(np.dstack([rgb, rgb[:, :, :1]])).save(folder / "rgba.png")
    Image.fromarray(rgb).convert("P").save(folder / "palette.png")
    Image.fromarray(rgb).convert("CMYK").save(folder / "cmyk.jpg")
    Image.fromarray((rng.integers(0, 65535, (16, 16))).astype(np.uint16)).save(folder / "sixteen_bit.png")
    Image.fromarray(rgb[:1, :1]).save(folder / "tiny_1x1.png")
    Image.fromarray(np.zeros((1500, 2500, 3), np.uint8)).save(folder / "large.jpg")
    (folder / "zero_bytes.png").write_bytes(b"")
    data = (folder / "ok.png").read_bytes()
    (folder / "truncated.png").write_bytes(data[: len(data) // 2])
    (folder / "not_an_image.jpg").write_bytes(b"hello, I am text")
    return {"ok": 1, "grey_L": 1, "rgba": 1, "palette": 1, "cmyk": 1, "sixteen_bit": 1, "tiny_1x1": 1, "large": 1,
            "zero_bytes": 0, "truncated": 0, "not_an_image": 0}


def test_every_image_mode_loads_or_fails_with_the_file_name(tmp_path):
    expected = write_odd_images(tmp_path)
    cfg = default_image_cfg(32)
    for path in sorted(tmp_path.iterdir()):
        if expected[path.stem]:
            x = preprocess(load_image(path), cfg)
            assert x.shape == (3, 32, 32) and bool(x.isfinite().all())
        else:
            with pytest.raises(ValueError, match=f"cannot read image .*{path.name}"):
                load_image(path)
    # 16-bit grey keeps its contrast (PIL's own convert would clip nearly everything to white).
    assert np.asarray(load_image(tmp_path / "sixteen_bit.png")).std() > 30


def test_generate_skips_and_counts_unreadable_images(tmp_path, capsys):
    expected = write_odd_images(tmp_path / "pool")
    report = generate.main(["--model", tiny.model_dir(tmp_path / "m"), "--images", str(tmp_path / "pool"),
                            "--out", str(tmp_path / "out"), "--max-new-tokens", "4"])
    assert report["images"] == sum(expected.values()) and report["images_unreadable"] == 3
    err = capsys.readouterr().err
    for name in ("zero_bytes.png", "truncated.png", "not_an_image.jpg"):
        assert f"skipping image {tmp_path / 'pool' / name}" in err


def test_missing_folder_empty_pool_and_bad_lists(tmp_path):
    with pytest.raises(UserError, match="image folder not found: .*nowhere"):
        list_images(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no readable images in .*empty"):
        generate.main(["--model", tiny.model_dir(tmp_path / "m"), "--images", str(tmp_path / "empty"),
                       "--out", str(tmp_path / "o")])
    (tmp_path / "list.json").write_text("[{'image': broken")
    with pytest.raises(UserError, match="list.json: not valid JSON"):
        list_images(image_list=str(tmp_path / "list.json"))
    with pytest.raises(ValueError, match="escapes the image root"):
        safe_join(str(tmp_path), "../../etc/passwd")
    (tmp_path / "list2.json").write_text(json.dumps([{"image": "../outside.png"}]))
    with pytest.raises(ValueError, match="escapes the image root"):
        list_images(image_list=str(tmp_path / "list2.json"))


def test_malformed_pairs_lines_are_skipped_and_counted(tmp_path, capsys):
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"image": "a.png", "prompt": "p", "chosen": "c", "rejected": "r", "type": "des"}\n'
                    "{not json\n" '{"image": "b.png"}\n' "\n")
    records, bad = read_jsonl(str(path), required=("image", "prompt", "chosen", "rejected", "type"))
    assert len(records) == 1 and bad == 2
    err = capsys.readouterr().err
    assert f"{path}:2: skipping malformed line" in err and f"{path}:3: skipping malformed line" in err


def test_checkpoint_with_missing_or_mismatched_files(tmp_path):
    base = tiny.model_dir(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").rename(tmp_path / "m" / "moved.bin")
    with pytest.raises((FileNotFoundError, ValueError), match=str(tmp_path / "m")):
        load_pretrained(base)
    other = tiny.model_dir(tmp_path / "m2")
    cfg = json.loads((tmp_path / "m2" / "config.json").read_text())
    cfg["text_config"]["hidden_size"] = 32
    (tmp_path / "m2" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="model.safetensors"):
        load_pretrained(other)
    # train.py stops before any work when the previous round is missing, naming what to run with the same flags.
    with pytest.raises(UserError, match=f"meta.json is missing\\); run first: python train.py --iter 1 --base {other} "
                                         f"--images {tmp_path} --run-dir {tmp_path / 'r'}$"):
        train.main(["--iter", "2", "--base", other, "--images", str(tmp_path), "--run-dir", str(tmp_path / "r")])


def test_non_finite_loss_skips_step_then_stops(tmp_path, monkeypatch, capsys):
    base = tiny.model_dir(tmp_path / "base")
    imgs = tiny.images(tmp_path / "images", 4)
    tiny.pairs(tmp_path / "run" / "iter_1", imgs, 4)
    calls = {"n": 0}
    real = trainer.dpo_loss

    def flaky(*a, **k):  # every other call returns a NaN loss
        losses, rc, rr = real(*a, **k)
        calls["n"] += 1
        return (losses * float("nan") if calls["n"] % 2 == 0 else losses), rc, rr

    monkeypatch.setattr(trainer, "dpo_loss", flaky)
    with pytest.raises(UserError, match="non-finite losses"):
        train.main(["--iter", "1", "--base", base, "--images", imgs, "--run-dir", str(tmp_path / "run"),
                    "--batch-size", "1", "--micro-batch-size", "1", "--epochs", "2", "--max-bad-steps", "2",
                    "--no-eval"])
    out = capsys.readouterr().out
    assert out.count("step skipped") == 3
    log = [json.loads(x) for x in (tmp_path / "run" / "iter_1" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [0, 2, 4] and log[-1]["bad_steps"] == 2  # only good steps are logged
    assert (tmp_path / "run" / "iter_1" / "checkpoint" / "latest.json").exists()  # the work so far is kept
