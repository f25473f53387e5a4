"""Tiny things tests and benchmarks build in code: a word tokenizer, a random LLaVA directory, images, pairs."""

import json
import os

import numpy as np
import torch
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from sena import prompts
from sena.chat import SYSTEM
from sena.checkpoint import save_pretrained
from sena.image import default_image_cfg
from sena.model import Llava, ModelConfig, TextConfig, VisionConfig

WORDS = "what color is the star circle square red blue green a small large at top left right yes no there one two ?"


def tokenizer():
    text = " ".join([SYSTEM, "USER: ASSISTANT:", WORDS, prompts.ASK_QUESTION, prompts.SELF_CHECK, prompts.IMPROVE,
                     prompts.IMPROVE_NO_DESCRIPTION, prompts.DES_SUFFIX, prompts.GEN_SUFFIX] + prompts.DESCRIBE_PROMPTS)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3, "<image>": 4}
    pre = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    for w, _ in pre.pre_tokenize_str(text.lower() + " " + text):
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", additional_special_tokens=["<image>"])


def model_dir(path, seed=0, image_size=32, patch=8, tok=None):
    """A random tiny LLaVA saved as a Hugging Face directory with tokenizer (default: the word tokenizer above) and
    image processor config."""
    tok = tok if tok is not None else tokenizer()
    config = ModelConfig(
        VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     image_size=image_size, patch_size=patch),
        TextConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512),
        image_token_index=4, pad_token_id=3, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    model = Llava(config)
    for p in model.parameters():  # random weights large enough that answers have distinct log-probs
        torch.nn.init.normal_(p, std=0.1)
    save_pretrained(model, path, tokenizer=tok, image_cfg=default_image_cfg(image_size))
    return str(path)


def images(folder, n, size=40, seed=0):
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size, size + 3 * i, 3), dtype=np.uint8)).save(f"{folder}/img_{i}.png")
    return str(folder)


def pairs(round_dir, image_root, n_images):
    """A hand-made round: pairs.jsonl + report.json, as generate.py writes them."""
    os.makedirs(round_dir, exist_ok=True)
    rows = []
    for i in range(n_images):
        rows.append({"image": f"img_{i}.png", "type": "des", "prompt": prompts.DESCRIBE_PROMPTS[i % 11],
                     "chosen": "a small red star at the top left .", "rejected": "a large blue circle ."})
        rows.append({"image": f"img_{i}.png", "type": "gen", "prompt": "what color is the star ?",
                     "chosen": "red" if i % 2 else "small red", "rejected": "blue"})
    with open(os.path.join(round_dir, "pairs.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    with open(os.path.join(round_dir, "report.json"), "w") as f:
        json.dump({"image_root": os.path.abspath(image_root)}, f)
    return rows
