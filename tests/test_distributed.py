"""torchrun with 2 gloo processes on CPU gives the same pairs and, for the same global batch, the same losses."""

import json
import os
import socket
import subprocess
import sys

from tests import tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(script, args, n):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), script, *args]
    res = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]  # includes a clean gloo shutdown: no abort at exit
    return res


def test_generate_two_processes_equal_one(tmp_path):
    base = tiny.model_dir(tmp_path / "base")
    imgs = tiny.images(tmp_path / "pool", 7)  # odd: the shards differ in size
    args = ["--model", base, "--images", imgs, "--max-new-tokens", "12", "--round", "1"]
    subprocess.run([sys.executable, "generate.py", *args, "--out", str(tmp_path / "one")], cwd=ROOT, env=ENV,
                   check=True, capture_output=True)
    torchrun("generate.py", [*args, "--out", str(tmp_path / "two")], 2)
    assert (tmp_path / "two" / "pairs.jsonl").read_bytes() == (tmp_path / "one" / "pairs.jsonl").read_bytes()
    one, two = (json.load(open(tmp_path / d / "report.json")) for d in ("one", "two"))
    assert two["processes"] == 2
    for key in ("images", "questions_raw", "questions_kept", "candidate_pairs", "pairs", "filtered"):
        assert one[key] == two[key], key


def test_train_two_processes_equal_one(tmp_path):
    base = tiny.model_dir(tmp_path / "base")
    imgs = tiny.images(tmp_path / "images", 8)
    logs = {}
    for name, n in (("one", 1), ("two", 2)):
        tiny.pairs(tmp_path / name / "iter_1", imgs, 8)
        args = ["--iter", "1", "--base", base, "--images", imgs, "--run-dir", str(tmp_path / name),
                "--batch-size", "4", "--micro-batch-size", "1", "--epochs", "1", "--lr", "1e-2", "--no-eval"]
        if n == 1:
            subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, env=ENV, check=True, capture_output=True)
        else:
            torchrun("train.py", args, 2)
        logs[name] = [json.loads(x) for x in open(tmp_path / name / "iter_1" / "log.jsonl")]
    assert len(logs["one"]) == len(logs["two"]) == 4
    # Tolerance: the two runs sum the same fp32 gradients in a different order (per rank, then all-reduce).
    for a, b in zip(logs["one"], logs["two"]):
        for key in ("loss", "dpo", "ica", "rewards/margins", "grad_norm"):
            assert abs(a[key] - b[key]) < 1e-5, (key, a[key], b[key])
    assert logs["one"][-1]["rewards/margins"] > 0.01  # the runs did train
