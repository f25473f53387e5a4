"""The faults a real run meets, each through the command a user types: nothing silently wrong, nothing that needs
hand repair, one line for each refusal (docs/results.md, "Reliability: what happens on each fault").

Signals and a second process run as real subprocesses; the rest runs in-process through sena.cli.run, which is
exactly what each script's __main__ calls. A full disk and a read-only folder are simulated (a test cannot fill the
disk it runs on, and root may write anywhere), at the system calls the code makes.
"""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

import evaluate
import generate
import train
from sena import cli, selfplay, tiny
from sena import io as sio
from sena.world import write_split
from tests import scripted

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TQDM_DISABLE="1")


def one_line(e):
    """The message of a SystemExit raised by cli.run: one line, no traceback."""
    msg = str(e.value.code)
    assert "\n" not in msg and "Traceback" not in msg, msg
    return msg


def wait_for(proc, ready, timeout=120):
    t0 = time.time()
    while not ready():
        assert proc.poll() is None, f"finished too early: {proc.stderr.read()[-2000:]}"
        assert time.time() - t0 < timeout
        time.sleep(0.01)


def lines(path):
    return len(open(path).read().splitlines()) if os.path.exists(path) else 0


@pytest.fixture(scope="module")
def tiny_round(tmp_path_factory):
    """A tiny base and images, and a train.py command on hand-made pairs (16 pairs, 2 per step)."""
    root = tmp_path_factory.mktemp("faults")
    base = tiny.model_dir(root / "base")
    imgs = tiny.images(root / "images", 8)

    def command(run_dir, epochs=2):
        tiny.pairs(os.path.join(run_dir, "iter_1"), imgs, 8)
        return ["--iter", "1", "--base", base, "--images", imgs, "--run-dir", str(run_dir), "--batch-size", "2",
                "--micro-batch-size", "1", "--epochs", str(epochs), "--save-every", "1", "--no-eval"]

    return root, base, imgs, command


def test_pool_made_under_other_settings_is_made_again(tmp_path):
    """A world round rerun with fewer --images-per-iter gets that many images, as its meta.json says, not the pool a
    bigger run left; and a pool a kill left without labels or with a cut image is finished, not reused."""
    run = tmp_path / "run"
    argv = ["--iter", "1", "--run-dir", str(run), "--no-eval", "--threads", "1", "--images-per-iter"]
    cli.run(train.main, argv + ["6"])
    pool, labels = run / "pool" / "iter_1", run / "labels" / "pool_iter_1.jsonl"
    assert len(os.listdir(pool)) == 6 and lines(labels) == 6
    shutil.rmtree(run / "iter_1")  # the user starts the round again, smaller
    cli.run(train.main, argv + ["4"])
    assert sorted(os.listdir(pool)) == [f"pool1_00000{i}.png" for i in range(4)] and lines(labels) == 4
    assert json.loads((run / "iter_1" / "report.json").read_text())["images"] == 4
    assert json.loads((run / "iter_1" / "meta.json").read_text())["args"]["images_per_round"] == 4
    # What a kill inside a plain write would leave: every image there, the last one cut short, no labels.
    whole = {name: (pool / name).read_bytes() for name in os.listdir(pool)}
    records = labels.read_text()
    (pool / "pool1_000003.png").write_bytes(whole["pool1_000003.png"][:100])
    labels.unlink()
    shutil.rmtree(run / "iter_1")
    cli.run(train.main, argv + ["4"])
    assert {name: (pool / name).read_bytes() for name in os.listdir(pool)} == whole and labels.read_text() == records
    assert json.loads((run / "iter_1" / "report.json").read_text())["images_unreadable"] == 0


def test_kill_while_the_test_split_is_written_then_rerun(tmp_path, tiny_round):
    """A SIGKILL while evaluate.py (or a fresh train.py run) writes the test split; the same command again finishes
    the split, identical to one written without a kill, and evaluates."""
    _, base, _, _ = tiny_round
    d = tmp_path / "test"
    cmd = [sys.executable, "evaluate.py", "--model", base, "--test-dir", str(d), "--n-test", "200", "--batch-size",
           "128", "--max-new-tokens", "2", "--max-new-tokens-short", "1", "--out", str(tmp_path / "m.json")]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for(proc, lambda: d.is_dir() and len(os.listdir(d)) >= 20)
    proc.kill()
    proc.wait()
    proc.stderr.close()
    assert not (tmp_path / "test_labels.jsonl").exists() and len(os.listdir(d)) < 200  # the kill was in the split
    res = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    scenes = write_split(tmp_path / "whole", 200, seed=424242, prefix="test", labels_path=tmp_path / "whole.jsonl")
    assert sorted(os.listdir(d)) == sorted(sc["image"] for sc in scenes)
    for sc in scenes[::37]:
        assert (d / sc["image"]).read_bytes() == (tmp_path / "whole" / sc["image"]).read_bytes()
    assert (tmp_path / "test_labels.jsonl").read_text() == (tmp_path / "whole.jsonl").read_text()
    assert json.loads((tmp_path / "m.json").read_text())["meta"]["n_scenes"] == 200


def test_odd_entries_in_the_image_folder_are_skipped_and_counted(tmp_path, tiny_round, capsys):
    """A folder named like an image, a dangling symlink, a symlink loop and a name that is not UTF-8: each skipped
    and counted as unreadable, like a broken image; the readable images are used."""
    _, base, _, _ = tiny_round
    d = tiny.images(tmp_path / "imgs", 3)
    os.mkdir(os.path.join(d, "folder.png"))
    os.symlink(os.path.join(d, "nowhere.png"), os.path.join(d, "dangling.png"))
    os.symlink(os.path.join(d, "loop.png"), os.path.join(d, "loop.png"))
    with open(os.fsencode(d) + b"/caf\xe9.png", "wb") as f:  # Latin-1, not UTF-8
        f.write(open(os.path.join(d, "img_0.png"), "rb").read())
    report = cli.run(generate.main, ["--model", base, "--images", d, "--out", str(tmp_path / "out"),
                                     "--max-new-tokens", "4"])
    assert report["images"] == 3 and report["images_unreadable"] == 4
    err = capsys.readouterr().err
    for name in ("folder.png", "dangling.png", "loop.png", "caf\\udce9.png: its name is not valid UTF-8"):
        assert f"skipping image {d}/{name}" in err, err


def test_a_second_run_on_the_run_dir_is_refused_naming_the_first(tmp_path, tiny_round, capsys):
    _, _, _, command = tiny_round
    argv = command(tmp_path / "run", epochs=30)
    first = subprocess.Popen([sys.executable, "train.py", *argv], cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    wait_for(first, lambda: lines(tmp_path / "run" / "iter_1" / "log.jsonl") >= 2)
    second = subprocess.run([sys.executable, "train.py", *argv], cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert second.returncode == 1 and second.stdout == ""
    assert second.stderr.startswith(f"error: --run-dir {tmp_path / 'run'} is in use by pid {first.pid} on ")
    assert second.stderr.count("\n") == 1 and "(train.py --iter 1 " in second.stderr, second.stderr
    assert first.wait() == 0, first.stderr.read()[-2000:]  # the first run was not disturbed
    first.stderr.close()
    assert lines(tmp_path / "run" / "iter_1" / "log.jsonl") == 240
    # The lock went with its process: the same command now finds the round done.
    cli.run(train.main, argv)
    assert "done already" in capsys.readouterr().out


def _default_sigint():
    # A shell's background job (nohup cmd &, a CI step) starts with SIGINT ignored, and a child inherits that, so
    # the run would never see the Ctrl-C; a user's terminal gives the default, as this does.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_and_sigterm_say_the_same_command_resumes(tmp_path, tiny_round, capsys):
    _, _, _, command = tiny_round
    cmd = [sys.executable, "train.py", *command(tmp_path / "run", epochs=10)]
    log = tmp_path / "run" / "iter_1" / "log.jsonl"
    for sig, code, how in ((signal.SIGINT, 130, "Ctrl-C"), (signal.SIGTERM, 143, "SIGTERM")):
        proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                preexec_fn=_default_sigint)
        target = lines(log) + 3
        wait_for(proc, lambda n=target: lines(log) >= n)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
        assert (proc.returncode, err) == (code, f"stopped by {how}; finished work is kept: run the same command "
                                                "again to resume\n"), err[-2000:]
    cli.run(train.main, cmd[2:])
    assert "resuming from" in capsys.readouterr().out
    assert [json.loads(x)["step"] for x in log.read_text().splitlines()] == list(range(80))


def test_damaged_intermediate_files(tmp_path, tiny_round, monkeypatch, capsys):
    """A garbage line in a stage file is dropped and its answer generated again; a damaged reference cache is scored
    again; a stale cache, a damaged report.json and a damaged metrics.json are refused in one line naming the file."""
    monkeypatch.setattr(selfplay, "generate", scripted.scripted_generate)
    sm = scripted.model_dir(tmp_path / "sm")
    imgs = tiny.images(tmp_path / "imgs", 12)
    gen = ["--model", sm, "--images", imgs, "--max-new-tokens", "96", "--out"]
    cli.run(generate.main, gen + [str(tmp_path / "whole")])
    out = tmp_path / "damaged"
    shutil.copytree(tmp_path / "whole" / "stages", out / "stages")
    stage = out / "stages" / "des_clean.jsonl"
    rows = stage.read_text().splitlines()
    stage.write_text("\n".join(rows[:3] + ['{"key": "img_3.png", "te\x00'] + rows[4:]) + "\n")
    cli.run(generate.main, gen + [str(out)])
    assert f"{stage}: 1 damaged line(s) (line 4) dropped" in capsys.readouterr().err
    assert (out / "pairs.jsonl").read_bytes() == (tmp_path / "whole" / "pairs.jsonl").read_bytes()

    _, _, timgs, command = tiny_round
    run = tmp_path / "run"
    argv = command(run)
    ref = run / "iter_1" / "ref_logps.safetensors"
    ref.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")  # a cache cut short
    cli.run(train.main, argv)
    assert f"{ref} is damaged (not a readable safetensors file" in capsys.readouterr().out
    (run / "iter_1" / "meta.json").unlink()
    with open(run / "iter_1" / "pairs.jsonl", "a") as f:  # the pairs change after the cache was scored
        f.write(json.dumps(tiny.pairs(tmp_path / "extra", timgs, 1)[0]) + "\n")
    with pytest.raises(SystemExit) as e:
        cli.run(train.main, argv)
    assert one_line(e) == (f"error: {ref}: reference cache key does not match (the pairs changed since it was "
                           "scored); delete the file to recompute it")
    (run / "iter_1" / "report.json").write_text('{"image_root": ')
    with pytest.raises(SystemExit) as e:
        cli.run(train.main, argv)
    assert one_line(e).startswith(f"error: {run / 'iter_1' / 'report.json'}: not valid JSON")
    (tmp_path / "metrics.json").write_text('{"pope": {"random": ')  # cut short
    with pytest.raises(SystemExit) as e:
        cli.run(evaluate.main, ["--compare", str(tmp_path / "metrics.json")])
    assert one_line(e).startswith(f"error: {tmp_path / 'metrics.json'}: not valid JSON")


def test_disk_full_and_a_read_only_run_dir_are_one_line(tmp_path, tiny_round, monkeypatch, capsys):
    _, _, _, command = tiny_round
    run = tmp_path / "run"
    argv = command(run)
    real_fsync, calls = os.fsync, []

    def full(fd):  # the disk fills up at the 5th file the run writes whole (its log.jsonl is written by then)
        calls.append(fd)
        if len(calls) == 5:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(SystemExit) as e:
        cli.run(train.main, argv)
    msg = one_line(e)
    assert msg.startswith(f"error: {run}/iter_1/") and ": No space left on device. The files written so far are " \
        "intact (each is written to a temp file, then renamed): free some space and run the same command again " \
        "to resume" in msg, msg
    assert not [f for _, _, fs in os.walk(run) for f in fs if f.startswith(".tmp-")]  # no temp file left behind
    monkeypatch.setattr(os, "fsync", real_fsync)
    cli.run(train.main, argv)  # space again: the same command finishes the round
    assert (run / "iter_1" / "meta.json").exists() and lines(run / "iter_1" / "log.jsonl") == 16

    # A finished run in a read-only directory: refused before anything else, as it would rewrite report.html.
    real_open = os.open

    def read_only(path, flags, *a, **k):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and os.fspath(path).startswith(str(run)):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)
        return real_open(path, flags, *a, **k)

    monkeypatch.setattr(os, "open", read_only)
    held = sio._LOCKS
    monkeypatch.setattr(sio, "_LOCKS", {})  # a fresh process would not hold the lock already
    with pytest.raises(SystemExit) as e:
        cli.run(train.main, argv)
    assert one_line(e) == f"error: {run}: cannot write to --run-dir (Read-only file system)"
    # Anywhere else (a file under it that became read-only): the file and the reason.
    monkeypatch.setattr(os, "open", real_open)
    monkeypatch.setattr(sio, "_LOCKS", held)

    def denied(*a, **k):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(run / "report.html"))

    monkeypatch.setattr("sena.report.atomic_write_text", denied)
    with pytest.raises(SystemExit) as e:
        cli.run(train.main, argv)
    assert one_line(e) == f"error: {run / 'report.html'}: Permission denied"


def test_outputs_keep_the_umask_mode(tmp_path, monkeypatch):
    """Every file and folder of a round (stage files, pairs, reference cache, θ(k)'s weights, meta, report) gets
    the mode the umask gives, as a plain open() would: 0o640 and 0o750 under umask 027, so a colleague in the group
    can read a shared run; none is private (0600)."""
    monkeypatch.setattr(selfplay, "generate", scripted.scripted_generate)
    sm = scripted.model_dir(tmp_path / "sm")
    imgs = tiny.images(tmp_path / "imgs", 12)
    old = os.umask(0o027)
    try:
        cli.run(train.main, ["--iter", "1", "--base", sm, "--images", imgs, "--run-dir", str(tmp_path / "run"),
                             "--batch-size", "4", "--micro-batch-size", "4", "--epochs", "1", "--no-eval"])
    finally:
        os.umask(old)
    files, folders = {}, {}
    for d, subdirs, fs in os.walk(tmp_path / "run"):
        folders |= {os.path.join(d, s): os.stat(os.path.join(d, s)).st_mode & 0o777 for s in subdirs}
        files |= {os.path.join(d, f): os.stat(os.path.join(d, f)).st_mode & 0o777 for f in fs}
    round_dir = str(tmp_path / "run" / "iter_1")
    for name in ("stages/ask.jsonl", "pairs.jsonl", "report.json", "ref_logps.safetensors", "telemetry.json",
                 "log.jsonl", "model/model.safetensors", "model/config.json", "meta.json"):
        assert os.path.join(round_dir, name) in files, name  # the check below is not vacuous
    assert str(tmp_path / "run" / "report.html") in files
    assert {f: m for f, m in files.items() if m != 0o640} == {}
    assert {f: m for f, m in folders.items() if m != 0o750} == {}


def test_bad_run_dir_and_lora_targets_are_refused_at_parse_time(tmp_path, capsys):
    (tmp_path / "a_file").write_text("")
    for flags, expected in ((["--run-dir", str(tmp_path / "a_file")], f"{tmp_path / 'a_file'} is a file, not a folder"),
                            (["--run-dir="], "an empty path (give a folder)"),
                            (["--lora-targets", "nonsense"], "'nonsense' not among q_proj,k_proj,v_proj,o_proj,"
                                                              "gate_proj,up_proj,down_proj")):
        with pytest.raises(SystemExit) as e:
            cli.run(train.main, ["--run-dir", str(tmp_path / "r")] + flags)
        assert e.value.code == 2 and expected in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "r")


def test_evaluate_writes_its_files_whole(tmp_path, tiny_round, monkeypatch):
    """metrics.json and eval_answers.jsonl go through the atomic writer, metrics.json last: a run takes its presence
    to mean that the model was evaluated."""
    _, base, _, _ = tiny_round
    argv = ["--model", base, "--test-dir", str(tmp_path / "t"), "--n-test", "2", "--max-new-tokens", "2",
            "--max-new-tokens-short", "1", "--out", str(tmp_path / "e" / "metrics.json")]
    writes = []
    real = sio.atomic_write_bytes
    monkeypatch.setattr(sio, "atomic_write_bytes", lambda p, d: (writes.append(p), real(p, d)))
    cli.run(evaluate.main, argv)
    assert [os.path.basename(p) for p in writes[-2:]] == ["eval_answers.jsonl", "metrics.json"]
