"""A SIGKILL in the middle of generate.py or train.py, then a rerun: the results equal an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time

import torch

from sena import tiny
from sena.checkpoint import load_pretrained
from tests import scripted

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
    proc.stderr.close()
    assert not os.path.exists(done_path), "the run finished before it was killed; the test proved nothing"


def lines(path):
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        return sum(1 for _ in f)


def stage_records(folder):
    """{stage file: sorted lines} of a round's stages/ folder."""
    out = {}
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name)) as f:
            out[name] = sorted(f.read().splitlines())
    return out


def test_generate_killed_then_rerun_equals_uninterrupted(tmp_path):
    """Two SIGKILLs at different stages (the scripted decoding kills its own process at its N-th call), a cut last
    line as a kill inside a write leaves it, then a rerun: the same pairs, and no answer generated twice."""
    base = scripted.model_dir(tmp_path / "base")
    imgs = tiny.images(tmp_path / "pool", 20)
    cmd = [sys.executable, "-m", "tests.scripted", "--model", base, "--images", imgs, "--max-new-tokens", "96",
           "--batch-size", "2", "--round", "1"]
    subprocess.run(cmd + ["--out", str(tmp_path / "full")], cwd=ROOT, env=ENV, check=True, capture_output=True)
    full = tmp_path / "full"
    with open(full / "report.json") as f:
        report = json.load(f)
    assert report["pairs_des"] >= 8 and report["pairs_gen"] >= 4, report  # non-empty pairs of both types
    out = tmp_path / "killed"
    # 10 calls of 2 prompts ask the 20 questions: call 4 dies in the question stage. The rerun counts its calls
    # from 1 again: 7 finish the questions, 9 self-check the 17 of them, and call 20 dies among the descriptions.
    for kill_at in (4, 20):
        res = subprocess.run(cmd + ["--out", str(out)], cwd=ROOT, env=dict(ENV, SCRIPTED_KILL_AT=str(kill_at)),
                             capture_output=True)
        assert res.returncode == -signal.SIGKILL, res.stderr.decode()[-2000:]
        assert not (out / "pairs.jsonl").exists()
    assert lines(out / "stages" / "ask.jsonl") == 1 + 20  # the first kill's work was kept, not redone
    done = {n: len(v) for n, v in stage_records(out / "stages").items()}
    assert 1 < sum(done.values()) - len(done) < sum(len(v) - 1 for v in stage_records(full / "stages").values())
    partial = out / "stages" / "des_clean.jsonl"  # the stage the second kill stopped
    assert 1 < lines(partial) < lines(full / "stages" / "des_clean.jsonl")
    with open(partial, "a") as f:
        f.write('{"key": "img_1')  # a kill inside a write leaves a cut last line
    subprocess.run(cmd + ["--out", str(out)], cwd=ROOT, env=ENV, check=True, capture_output=True)
    assert (out / "pairs.jsonl").read_bytes() == (full / "pairs.jsonl").read_bytes()
    # The reruns generated only what was missing: each stage file holds the uninterrupted run's lines (the cut line
    # aside), each key once.
    got, want = stage_records(out / "stages"), stage_records(full / "stages")
    assert got.keys() == want.keys()
    for name in want:
        kept = [x for x in got[name] if x != '{"key": "img_1']
        assert kept == want[name], name


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
    full = [json.loads(x) for x in (tmp_path / "full" / "iter_1" / "log.jsonl").read_text().splitlines()]
    resumed = [json.loads(x) for x in log.read_text().splitlines()]
    assert [r["step"] for r in resumed] == list(range(16))
    for a, b in zip(full, resumed):
        assert abs(a["loss"] - b["loss"]) < 1e-6 and abs(a["grad_norm"] - b["grad_norm"]) < 1e-6
    m1, _, _ = load_pretrained(str(tmp_path / "full" / "iter_1" / "model"))
    m2, _, _ = load_pretrained(str(tmp_path / "killed" / "iter_1" / "model"))
    for (n, a), b in zip(m1.state_dict().items(), m2.state_dict().values()):
        assert torch.equal(a, b), n
    assert not os.path.exists(tmp_path / "killed" / "iter_1" / "checkpoint")  # removed once θ(1) is saved
