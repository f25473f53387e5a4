"""LLaVA-style image lists: text-only records skipped and counted, repeats kept once, equal per-source sampling."""

import json
import os

import pytest

import generate
from sena import seeds, tiny
from sena.cli import UserError
from sena.io import image_source, list_images, read_image_list

# A hand-made slice of LLaVA-665K's layout: five sources of unequal size, a repeated image, text-only records.
RECORDS = (
    [{"id": f"c{i}", "image": f"coco/train2017/{i:012d}.jpg"} for i in range(5)]
    + [{"id": "c0-again", "image": "coco/train2017/000000000000.jpg"}]  # a second conversation on the same image
    + [{"id": f"g{i}", "image": f"gqa/images/{i}.jpg"} for i in range(3)]
    + [{"id": f"o{i}", "image": f"ocr_vqa/images/{i}.jpg"} for i in range(2)]
    + [{"id": f"t{i}", "image": f"textvqa/train_images/{i}.jpg"} for i in range(4)]
    + [{"id": f"v{i}", "image": f"vg/VG_100K/{i}.jpg"} for i in range(6)]
    + [{"id": "text-only-1", "conversations": [{"from": "human", "value": "hi"}]},
       {"id": "text-only-2", "image": None, "conversations": []}]
)
SIZES = {"coco": 5, "gqa": 3, "ocr_vqa": 2, "textvqa": 4, "vg": 6}


def write_list(tmp_path, records=RECORDS):
    path = tmp_path / "llava_v1_5_mix665k.json"
    path.write_text(json.dumps(records))
    return str(path)


def test_source_is_the_first_folder():
    assert image_source("coco/train2017/x.jpg") == "coco"
    assert image_source("vg/VG_100K_2/y.jpg") == "vg"
    assert image_source("top_level.jpg") == "."


def test_per_source_takes_n_from_each_source_deterministically(tmp_path):
    path = write_list(tmp_path)
    rels, summary = read_image_list(path, per_source=3, seed=0)
    by_src = {}
    for r in rels:
        by_src.setdefault(image_source(r), []).append(r)
    assert {s: len(v) for s, v in by_src.items()} == {s: min(3, n) for s, n in SIZES.items()}
    assert len(set(rels)) == len(rels) and rels == sorted(rels)
    # The documented rule, written out: each source sorted, shuffled by seeds.rng(seed, "per-source", source), first N.
    for src, taken in by_src.items():
        listed = sorted({r["image"] for r in RECORDS if isinstance(r.get("image"), str) and r["image"].startswith(src)})
        seeds.rng(0, "per-source", src).shuffle(listed)
        assert sorted(listed[:3]) == taken
    assert read_image_list(path, per_source=3, seed=0) == (rels, summary)
    assert len({tuple(read_image_list(path, per_source=3, seed=s)[0]) for s in range(6)}) > 1  # the seed matters
    assert "23 records, 2 without an image skipped, 20 distinct images" in summary
    assert "coco 3/5" in summary and "ocr_vqa 2/2" in summary and "vg 3/6" in summary


def test_offset_steps_through_each_source_without_overlap(tmp_path):
    path = write_list(tmp_path)
    rounds = [set(read_image_list(path, per_source=2, seed=7, offset=k * 2)[0]) for k in range(3)]
    assert not (rounds[0] & rounds[1]) and not (rounds[1] & rounds[2]) and not (rounds[0] & rounds[2])
    coco = {r for rnd in rounds for r in rnd if r.startswith("coco/")}
    assert len(coco) == 5  # 2 + 2 + the last one: every coco image exactly once over the rounds


def test_without_per_source_every_distinct_path_sorted(tmp_path):
    rels, summary = read_image_list(write_list(tmp_path))
    assert len(rels) == 20 and rels == sorted(rels)
    assert "coco 5" in summary and "2 without an image skipped" in summary


def test_bad_lists(tmp_path):
    with pytest.raises(UserError, match="expected a JSON list"):
        read_image_list(write_list(tmp_path, {"image": "coco/x.jpg"}))
    with pytest.raises(ValueError, match="escapes the image root"):
        read_image_list(write_list(tmp_path, [{"image": "coco/../../etc/passwd"}]))
    with pytest.raises(UserError, match="--per-source needs --image-list"):
        list_images(images_dir=str(tmp_path), per_source=2)


def test_generate_per_source_reads_the_sampled_images(tmp_path, capsys):
    for r in RECORDS:
        if isinstance(r.get("image"), str):
            d, name = os.path.split(r["image"])
            tiny.images(tmp_path / "data" / d, 1)
            os.replace(tmp_path / "data" / d / "img_0.png", tmp_path / "data" / d / name)
    path = write_list(tmp_path)
    want, _ = read_image_list(path, per_source=1, seed=3)
    report = generate.main(["--model", tiny.model_dir(tmp_path / "m"), "--image-list", path, "--image-root",
                            str(tmp_path / "data"), "--per-source", "1", "--seed", "3", "--out", str(tmp_path / "out"),
                            "--max-new-tokens", "4"])
    assert report["images"] == 5 and report["settings"]["per_source"] == 1
    assert "taken/listed per source: coco 1/5, gqa 1/3, ocr_vqa 1/2, textvqa 1/4, vg 1/6" in capsys.readouterr().out
    with open(tmp_path / "out" / "stages" / "ask.jsonl") as f:
        keys = [json.loads(line)["key"] for line in f.readlines()[1:]]
    assert sorted(keys) == want
