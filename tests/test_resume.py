"""A SIGKILL in the middle of generate.py or train.py, then a rerun: the results equal an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time

import torch

from sena.model import load_pretrained
from tests import tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TQDM_DISABLE="1")


def kill_when(cmd, ready, done_path, timeout=120):
    """Start cmd, SIGKILL it as soon as ready() holds; assert it had not finished (done_path absent) by then."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    t0 = time.time()
    while not ready():
        assert proc.poll() is None, f"finished before the kill: {proc.stderr.read().decode()[-2000:]}"
        assert time.time() - t0 < timeout
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not os.path.exists(done_path), "the run finished before it was killed; the test proved nothing"


def lines(path):
    return sum(1 for _ in open(path)) if os.path.exists(path) else 0


def test_generate_killed_then_rerun_equals_uninterrupted(tmp_path):
    base = tiny.model_dir(tmp_path / "base")
    imgs = tiny.images(tmp_path / "pool", 20)
    cmd = [sys.executable, "generate.py", "--model", base, "--images", imgs, "--max-new-tokens", "16",
           "--batch-size", "1", "--round", "1"]
    subprocess.run(cmd + ["--out", str(tmp_path / "full")], cwd=ROOT, env=ENV, check=True, capture_output=True)
    out = tmp_path / "killed"
    kill_when(cmd + ["--out", str(out)], lambda: lines(out / "stages" / "ask.jsonl") >= 3, out / "pairs.jsonl")
    subprocess.run(cmd + ["--out", str(out)], cwd=ROOT, env=ENV, check=True, capture_output=True)
    assert (out / "pairs.jsonl").read_bytes() == (tmp_path / "full" / "pairs.jsonl").read_bytes()
    # The rerun generated only the missing answers: each stage file holds one line per key plus its header.
    assert lines(out / "stages" / "ask.jsonl") == 20 + 1


def test_train_killed_then_rerun_equals_uninterrupted(tmp_path):
    base = tiny.model_dir(tmp_path / "base")
    imgs = tiny.images(tmp_path / "images", 8)
    runs = {}
    for name in ("full", "killed"):
        tiny.pairs(tmp_path / name / "iter_1", imgs, 8)
        runs[name] = [sys.executable, "train.py", "--iter", "1", "--base", base, "--images", imgs, "--run-dir",
                      str(tmp_path / name), "--batch-size", "2", "--micro-batch-size", "1", "--epochs", "2",
                      "--lr", "1e-2", "--lora-dropout", "0.1", "--save-every", "1", "--no-eval"]
    subprocess.run(runs["full"], cwd=ROOT, env=ENV, check=True, capture_output=True)
    log = tmp_path / "killed" / "iter_1" / "log.jsonl"
    kill_when(runs["killed"], lambda: lines(log) >= 5, tmp_path / "killed" / "iter_1" / "meta.json")
    res = subprocess.run(runs["killed"], cwd=ROOT, env=ENV, check=True, capture_output=True, text=True)
    assert "resuming from" in res.stdout
    full = [json.loads(x) for x in open(tmp_path / "full" / "iter_1" / "log.jsonl")]
    resumed = [json.loads(x) for x in open(log)]
    assert [r["step"] for r in resumed] == list(range(16))
    for a, b in zip(full, resumed):
        assert abs(a["loss"] - b["loss"]) < 1e-6 and abs(a["grad_norm"] - b["grad_norm"]) < 1e-6
    m1, _, _ = load_pretrained(str(tmp_path / "full" / "iter_1" / "model"))
    m2, _, _ = load_pretrained(str(tmp_path / "killed" / "iter_1" / "model"))
    for (n, a), b in zip(m1.state_dict().items(), m2.state_dict().values()):
        assert torch.equal(a, b), n
    assert not os.path.exists(tmp_path / "killed" / "iter_1" / "checkpoint")  # removed once θ(1) is saved
