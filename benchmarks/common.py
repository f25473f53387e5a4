"""What every benchmark builds the same way: a ~5M-parameter LLaVA in code, images, SENA-like pairs and prompts.

The model is a tiny LLaVA (vision ~0.6M, projector ~0.1M, LLM ~4.3M, 64 image tokens); the
tokenizer is the word-level one of sena/tiny.py, which holds every word of the SENA prompts, so prompts have SENA's
shape: <s> + system text + 64 image tokens + request + "ASSISTANT:" ≈ 110 tokens, answers 2–25 tokens.
"""

import json
import os
import platform
import random
import resource
import subprocess
import sys
import time

import numpy as np
import torch
from PIL import Image

from sena import prompts, tiny
from sena.checkpoint import save_pretrained
from sena.image import default_image_cfg
from sena.model import Llava, ModelConfig, TextConfig, VisionConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

RESULTS = os.path.join(ROOT, "benchmarks", "results")
IMAGE_SIZE = 64
DES_CHOSEN = ["there is a small red circle at the top left and a large blue star at the right .",
              "a large green square at the top and a small red star at the left .",
              "there is one small blue circle at the top right .",
              "a small red square at the left , a large green circle at the top and a blue star at the right ."]
DES_REJECTED = ["there is a large blue square .", "a green circle at the top left .",
                "there are two large red circles at the right and a small star .", "a blue square at the top ."]
QUESTIONS = ["what color is the star ?", "is there a red circle ?", "what shape is at the top left ?",
             "how many circles are there ?"]
GEN_CHOSEN = ["red", "yes", "a small circle", "two"]
GEN_REJECTED = ["blue", "no", "a large square", "one"]


def config(vocab_size):
    return ModelConfig(
        VisionConfig(hidden_size=128, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4,
                     image_size=IMAGE_SIZE, patch_size=8),
        TextConfig(vocab_size=vocab_size, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                   num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=1024),
        image_token_index=4, pad_token_id=3, bos_token_id=1, eos_token_id=2)


def model_dir(path, seed=0, vocab_size=None):
    """Save the random ~5M LLaVA (weights std 0.05: varied, finite log-probs) with tokenizer; return its path.

    vocab_size: a larger LM head than the tokenizer needs (e.g. Vicuna's 32064), to weigh the LM head as a real
    model does; the tokenizer's ids are its first rows.
    """
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    tok = tiny.tokenizer()
    torch.manual_seed(seed)
    model = Llava(config(max(len(tok), vocab_size or 0)))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.05)
    save_pretrained(model, path, tokenizer=tok, image_cfg=default_image_cfg(IMAGE_SIZE))
    return path


def images(folder, n, seed=0):
    """n random RGB images of IMAGE_SIZE² (square, so every preprocessing path sees the same pixels)."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        name = os.path.join(folder, f"img_{i:04d}.png")
        if not os.path.exists(name):
            Image.fromarray(rng.integers(0, 255, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)).save(name)
    return folder


def pairs(n_images, seed=0):
    """A round's pairs as generate.py writes them: per image one des and one gen pair, adjacent."""
    rng = random.Random(seed)
    rows = []
    for i in range(n_images):
        name = f"img_{i:04d}.png"
        rows.append({"image": name, "type": "des", "prompt": rng.choice(prompts.DESCRIBE_PROMPTS) + prompts.DES_SUFFIX,
                     "chosen": rng.choice(DES_CHOSEN), "rejected": rng.choice(DES_REJECTED)})
        q = rng.randrange(len(QUESTIONS))
        rows.append({"image": name, "type": "gen", "prompt": QUESTIONS[q] + prompts.GEN_SUFFIX,
                     "chosen": GEN_CHOSEN[q], "rejected": GEN_REJECTED[q]})
    return rows


def round_prompts(n_images, seed=0):
    """The user turns of one round's generation stages for n images: (image index, user text) in stage order."""
    rng = random.Random(seed)
    out = []
    for i in range(n_images):
        q = rng.choice(QUESTIONS)
        des = rng.choice(prompts.DESCRIBE_PROMPTS) + prompts.DES_SUFFIX
        out += [(i, prompts.ASK_QUESTION), (i, prompts.SELF_CHECK.format(question=q)), (i, des),
                (i, q + prompts.GEN_SUFFIX),
                (i, prompts.IMPROVE.format(description=rng.choice(DES_CHOSEN), question=q, answer="red"))]
    return out


def peak_rss_mb():
    """Peak resident memory of this process so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def machine():
    load = os.getloadavg()
    cpu = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                   cpu)
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "load_1m_at_start": round(load[0], 2),
            "time_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())}


def run_child(module, args):
    """Run `python -m module args...` from the repository root in a fresh process (clean peak RSS); its last stdout
    line is a JSON dict."""
    res = subprocess.run([sys.executable, "-m", module] + args, capture_output=True, text=True, cwd=ROOT)
    if res.returncode != 0:
        raise RuntimeError(f"{module} {args} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def write_json(name, obj):
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, name)
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
    print(f"wrote {os.path.relpath(path, ROOT)}")


def table(rows, header):
    """Print a GitHub-markdown table (rows: lists of cells)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    print("\n".join(lines))
    return "\n".join(lines)
