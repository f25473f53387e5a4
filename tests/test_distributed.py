"""torchrun with 2 gloo processes on CPU gives the same pairs and, for the same global batch, the same losses."""

import json
import os
import socket
import subprocess
import sys

from sena import tiny
from tests import scripted

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(script, args, n):
    """script: a file, or '-m module'."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), *script.split(), *args]
    res = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]  # includes a clean gloo shutdown: no abort at exit
    return res


def test_generate_two_processes_equal_one(tmp_path):
    """Through the scripted decoding (tests/scripted.py), so that both runs have pairs of both types to compare."""
    base = scripted.model_dir(tmp_path / "base")
    imgs = tiny.images(tmp_path / "pool", 15)  # odd: the shards differ in size
    args = ["--model", base, "--images", imgs, "--max-new-tokens", "96", "--batch-size", "4", "--round", "1"]
    subprocess.run([sys.executable, "-m", "tests.scripted", *args, "--out", str(tmp_path / "one")], cwd=ROOT,
                   env=ENV, check=True, capture_output=True)
    torchrun("-m tests.scripted", [*args, "--out", str(tmp_path / "two")], 2)
    one, two = (read_json(tmp_path / d / "report.json") for d in ("one", "two"))
    assert one["pairs_des"] >= 6 and one["pairs_gen"] >= 3, one  # the comparison below is not vacuous
    assert (tmp_path / "two" / "pairs.jsonl").read_bytes() == (tmp_path / "one" / "pairs.jsonl").read_bytes()
    assert two["processes"] == 2
    for key in ("images", "questions_raw", "self_check_dropped", "questions_kept", "se_accepted_des",
                "se_accepted_gen", "candidate_pairs", "pairs", "filtered"):
        assert one[key] == two[key], key
    # Each rank answered its own shard: 8 and 7 of the 15 images.
    assert [lines(tmp_path / "two" / f"rank_{r}" / "stages" / "ask.jsonl") - 1 for r in (0, 1)] == [8, 7]


def lines(path):
    with open(path) as f:
        return sum(1 for _ in f)


def read_json(path):
    with open(path) as f:
        return json.load(f)


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
        logs[name] = [json.loads(x) for x in (tmp_path / name / "iter_1" / "log.jsonl").read_text().splitlines()]
    assert len(logs["one"]) == len(logs["two"]) == 4
    # Tolerance: the two runs sum the same fp32 gradients in a different order (per rank, then all-reduce).
    for a, b in zip(logs["one"], logs["two"]):
        for key in ("loss", "dpo", "ica", "rewards/margins", "grad_norm"):
            assert abs(a[key] - b[key]) < 1e-5, (key, a[key], b[key])
    assert logs["one"][-1]["rewards/margins"] > 0.01  # the runs did train
