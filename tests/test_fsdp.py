"""Full fine-tuning under torchrun shards the model with FSDP2: 2 gloo processes equal 1 plain process.

Same global batch, same steps: the per-step losses, gradient norms (with clipping active) and the final θ(1) equal the
single-process run; a SIGKILLed FSDP run resumes from its gathered checkpoint to the same result.
"""

import json
import os
import signal
import subprocess
import sys
import time

from safetensors.torch import load_file

from sena import tiny
from tests.test_distributed import ENV, ROOT, free_port, torchrun

KEYS = ("loss", "dpo", "ica", "rewards/margins", "grad_norm")
# The runs differ only in summation order (per rank, then the reduce-scatter; measured ≤ 1.2e-7 on the losses and
# ≤ 1e-6 on the weights). The weights move ~3e-2 from θ0, so a lost or doubled gradient would exceed 1e-5.
TOL = 1e-5


def train_args(base, imgs, run_dir, epochs):
    # --max-grad-norm 0.2: most steps' norms (0.12-0.94) are above it, so clipping of sharded gradients is exercised.
    return ["--iter", "1", "--base", base, "--images", imgs, "--run-dir", str(run_dir), "--full-ft", "--batch-size",
            "4", "--micro-batch-size", "1", "--epochs", str(epochs), "--lr", "1e-2", "--max-grad-norm", "0.2",
            "--save-every", "1", "--no-eval"]


def one_process(tmp_path, base, imgs, epochs):
    tiny.pairs(tmp_path / "one" / "iter_1", imgs, 8)
    subprocess.run([sys.executable, "train.py", *train_args(base, imgs, tmp_path / "one", epochs)], cwd=ROOT, env=ENV,
                   check=True, capture_output=True)
    return log(tmp_path / "one")


def log(run_dir):
    return [json.loads(x) for x in (run_dir / "iter_1" / "log.jsonl").read_text().splitlines()]


def assert_same_run(one, two, run_one, run_two, base):
    assert [r["step"] for r in two] == [r["step"] for r in one]
    for a, b in zip(one, two):
        for key in KEYS:
            assert abs(a[key] - b[key]) < TOL, (a["step"], key, a[key], b[key])
    w1, w2 = (load_file(r / "iter_1" / "model" / "model.safetensors") for r in (run_one, run_two))
    w0 = load_file(os.path.join(base, "model.safetensors"))
    assert w1.keys() == w2.keys()
    for k in w1:
        assert (w1[k] - w2[k]).abs().max() < TOL, k
        moved = (w1[k] - w0[k]).abs().max()
        assert moved == 0 if "vision_tower" in k else moved > 1e-2, (k, moved)  # frozen tower; the rest trained


def descendants(pid):
    """Child process ids of pid, recursively (Linux /proc)."""
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        kids = [int(c) for c in f.read().split()]
    return kids + [d for k in kids for d in descendants(k)]


def test_full_ft_fsdp_two_processes_equal_one(tmp_path):
    base = tiny.model_dir(tmp_path / "base")
    imgs = tiny.images(tmp_path / "images", 8)
    one = one_process(tmp_path, base, imgs, epochs=1)
    tiny.pairs(tmp_path / "two" / "iter_1", imgs, 8)
    res = torchrun("train.py", train_args(base, imgs, tmp_path / "two", 1), 2)
    assert "returned a view tensor" not in res.stderr
    two = log(tmp_path / "two")
    assert len(one) == len(two) == 4
    assert sum(r["grad_norm"] > 0.2 for r in one) >= 3  # clipping was active
    assert_same_run(one, two, tmp_path / "one", tmp_path / "two", base)


def test_full_ft_fsdp_killed_then_resumed_equals_one_process(tmp_path):
    base = tiny.model_dir(tmp_path / "base")
    imgs = tiny.images(tmp_path / "images", 8)
    one = one_process(tmp_path, base, imgs, epochs=2)
    run = tmp_path / "two"
    tiny.pairs(run / "iter_1", imgs, 8)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "train.py", *train_args(base, imgs, run, 2)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0, log_path = time.time(), run / "iter_1" / "log.jsonl"
    while not (log_path.exists() and len(log_path.read_text().splitlines()) >= 3):
        assert proc.poll() is None and time.time() - t0 < 120
        time.sleep(0.01)
    for pid in [proc.pid, *descendants(proc.pid)]:  # the workers run in their own sessions: kill each by its id
        os.kill(pid, signal.SIGKILL)
    proc.wait()
    assert not (run / "iter_1" / "meta.json").exists(), "the run finished before it was killed"
    saved = json.loads((run / "iter_1" / "checkpoint" / "latest.json").read_text())["step"]
    res = torchrun("train.py", train_args(base, imgs, run, 2), 2)
    assert f"resuming from {run / 'iter_1' / 'checkpoint'} at step {saved + 1}" in res.stdout
    assert len(one) == 8 and saved < 7
    assert_same_run(one, log(run), tmp_path / "one", run, base)
    assert not (run / "iter_1" / "checkpoint").exists()  # removed once θ(1) is saved
