"""pairs.jsonl as TRL reads it: `datasets` loads it, TRL's data utilities see a standard preference dataset, and TRL's
own vision collator turns each pair into exactly the token ids and pixels our trainer scores.

TRL is a benchmark extra (requirements-bench.txt), so this test skips where it is not installed.
"""

import json
import os

import pytest
import torch

import generate
from sena import selfplay, tiny
from sena.chat import encode_answer, encode_prompt, prompt_text
from sena.image import load_image, preprocess

pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

# A scripted model: each stage's output, so the random tiny model's words do not decide whether pairs survive.
SCRIPT = {
    "ask": "what color is the star ?",
    "self_check": "QUESTION: what color is the star ?",
    "des_clean": "a small red star at the top left .",
    "gen_clean": "red",
    "des_noised": "a large blue circle .",
    "gen_noised": "blue",
    "enhance_des": "Improved Answer: a small red star .",
    "enhance_gen": "Improved Answer: small red",
}


@pytest.fixture(scope="module")
def round_dir(tmp_path_factory):
    """pairs.jsonl and report.json written by generate.py itself, with the model's outputs scripted per stage."""
    d = tmp_path_factory.mktemp("trl")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(selfplay, "run_prompts", lambda model, tok, feats, users, args, stage, keys, **kw: [
            SCRIPT[stage] for _ in keys])
        report = generate.main(["--model", tiny.model_dir(d / "m"), "--images", tiny.images(d / "pool", 3),
                                "--out", str(d / "round")])
    assert report["pairs"] == 6  # 3 images x (des, gen), none filtered
    return d


def test_datasets_and_trl_data_utils_read_pairs_as_a_preference_dataset(round_dir):
    from trl.data_utils import is_conversational, maybe_apply_chat_template, maybe_extract_prompt

    ds = datasets.load_dataset("json", data_files=str(round_dir / "round" / "pairs.jsonl"), split="train")
    assert len(ds) == 6
    for col in ("prompt", "chosen", "rejected"):  # TRL's standard (not conversational) preference columns
        assert ds.features[col] == datasets.Value("string")
    assert ds.features["images"] == datasets.List(datasets.Value("string"))
    row = ds[0]
    assert not is_conversational(row)
    assert maybe_extract_prompt(row) == row  # the prompt is explicit: nothing to extract
    tok = tiny.tokenizer()
    assert maybe_apply_chat_template(row, tok) == row  # standard format: TRL leaves the text as it is
    # images are paths relative to the round's image root; datasets opens them once they are joined to it.
    root = json.loads((round_dir / "round" / "report.json").read_text())["image_root"]
    ds = ds.map(lambda e: {"images": [os.path.join(root, p) for p in e["images"]]})
    ds = ds.cast_column("images", datasets.List(datasets.Image()))
    assert ds[0]["images"][0].size == load_image(os.path.join(root, row["image"])).size


def test_trl_vision_collator_builds_our_exact_sequences(round_dir):
    from transformers import AutoTokenizer, LlavaProcessor
    from trl.trainer.dpo_trainer import DataCollatorForVisionPreference

    model_dir = str(round_dir / "m")
    tok = AutoTokenizer.from_pretrained(model_dir)
    # num_additional_image_tokens=1 with the 'default' strategy: <image> expands to 16 tokens, as our encode_prompt.
    proc = LlavaProcessor.from_pretrained(model_dir, tokenizer=tok, patch_size=8, num_additional_image_tokens=1,
                                          vision_feature_select_strategy="default", image_token="<image>")
    ds = datasets.load_dataset("json", data_files=str(round_dir / "round" / "pairs.jsonl"), split="train")
    root = json.loads((round_dir / "round" / "report.json").read_text())["image_root"]
    raw = [dict(r) for r in ds]
    # The recipe (docs/usage.md): join images to the image root; drop the single-path `image` column, which TRL's collator
    # would take in place of `images`; put the prompt in LLaVA's v1 text and end each answer with </s>.
    trl_ds = ds.map(lambda e: {"images": [os.path.join(root, p) for p in e["images"]],
                               "prompt": tok.bos_token + prompt_text(e["prompt"]),
                               "chosen": " " + e["chosen"] + tok.eos_token,
                               "rejected": " " + e["rejected"] + tok.eos_token}).remove_columns("image")
    batch = DataCollatorForVisionPreference(processor=proc)([dict(r) for r in trl_ds])
    B = len(raw)
    cfg = json.loads((round_dir / "m" / "preprocessor_config.json").read_text())
    for i, p in enumerate(raw):
        prompt = encode_prompt(tok, p["prompt"], 16, 4)  # tiny.model_dir: (32/8)² image tokens, id 4
        for row, answer in ((i, p["chosen"]), (B + i, p["rejected"])):  # TRL stacks all chosen, then all rejected
            mask = batch["attention_mask"][row].bool()
            ans = encode_answer(tok, answer)
            assert batch["input_ids"][row][mask].tolist() == prompt + ans
            assert batch["completion_mask"][row][mask].tolist() == [0] * len(prompt) + [1] * len(ans)
        pixels = preprocess(load_image(os.path.join(root, p["image"])), cfg)
        torch.testing.assert_close(batch["pixel_values"][i], pixels, atol=1e-5, rtol=0)
