"""Bad input on the command line: each refusal is one line naming what is wrong, before any work starts.

Most cases run in-process through sena.cli.run, which is exactly what each script's __main__ calls; a few run as
real subprocesses to show the one line and the exit status a user sees.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import evaluate
import generate
import train
from sena import cli, selfplay, tiny
from tests import scripted

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1")

# (script, flags, what the one line must say). Flags not under test are valid; `{m}` is a model directory,
# `{d}` an image folder, `{o}` an output folder that must not be created.
BAD_FLAGS = [
    ("train", "--beta 0", "argument --beta: 0 is out of range (allowed: a number > 0)"),
    ("train", "--beta -1", "argument --beta: -1 is out of range (allowed: a number > 0)"),
    ("train", "--beta nan", "argument --beta: 'nan' is not a finite number"),
    ("train", "--lr 0", "argument --lr: 0 is out of range (allowed: a number > 0)"),
    ("train", "--lr -1", "argument --lr: -1 is out of range (allowed: a number > 0)"),
    ("train", "--noise-step -1", "argument --noise-step: -1 is out of range (allowed: an integer from 0 to 999)"),
    ("train", "--noise-step 2000", "argument --noise-step: 2000 is out of range (allowed: an integer from 0 to 999)"),
    ("train", "--iter 0", "argument --iter: 0 is out of range (allowed: an integer >= 1)"),
    ("train", "--iter -1", "argument --iter: -1 is out of range (allowed: an integer >= 1)"),
    ("train", "--iter two", "argument --iter: 'two' is not an integer"),
    ("train", "--batch-size 0", "argument --batch-size: 0 is out of range (allowed: an integer >= 1)"),
    ("train", "--micro-batch-size 0", "argument --micro-batch-size: 0 is out of range (allowed: an integer >= 1)"),
    ("train", "--epochs 0", "argument --epochs: 0 is out of range (allowed: an integer >= 1)"),
    ("train", "--save-every 0", "argument --save-every: 0 is out of range (allowed: an integer >= 1)"),
    ("train", "--warmup-ratio 1.5", "argument --warmup-ratio: 1.5 is out of range (allowed: a number from 0 to 1)"),
    ("train", "--lora-dropout 1", "argument --lora-dropout: 1 is out of range (allowed: a number >= 0 and < 1)"),
    ("train", "--lora-r 0", "argument --lora-r: 0 is out of range (allowed: an integer >= 1)"),
    ("train", "--max-grad-norm 0", "argument --max-grad-norm: 0 is out of range (allowed: a number > 0)"),
    ("train", "--ica-weight -0.5", "argument --ica-weight: -0.5 is out of range (allowed: a number >= 0)"),
    ("train", "--batch-size 16 --micro-batch-size 3",
     "--batch-size 16 must split into 1 process(es) x whole micro-batches of --micro-batch-size 3"),
    ("train", "--enhance-types des", "argument --enhance-types: invalid choice: 'des'"),
    ("train world", "--base {o}", "argument --base: {o} is not a Hugging Face LLaVA directory (no config.json)"),
    ("train world", "--base {m}", "--base needs --images DIR or --image-list JSON"),
    ("generate", "--num-images 0", "argument --num-images: 0 is out of range (allowed: an integer >= 1)"),
    ("generate", "--noise-step 1000",
     "argument --noise-step: 1000 is out of range (allowed: an integer from 0 to 999)"),
    ("generate", "--batch-size 0", "argument --batch-size: 0 is out of range (allowed: an integer >= 1)"),
    ("generate", "--max-new-tokens 0", "argument --max-new-tokens: 0 is out of range (allowed: an integer >= 1)"),
    ("generate", "--offset -1", "argument --offset: -1 is out of range (allowed: an integer >= 0)"),
    ("generate", "--round 0", "argument --round: 0 is out of range (allowed: an integer >= 1)"),
    ("generate", "--prefix-cache-gb -1", "argument --prefix-cache-gb: -1 is out of range (allowed: a number >= 0)"),
    ("generate", "--image-list {d}/list.json", "give one of --images DIR or --image-list JSON"),
    ("evaluate", "--batch-size 0", "argument --batch-size: 0 is out of range (allowed: an integer >= 1)"),
    ("evaluate", "--n-test 0", "argument --n-test: 0 is out of range (allowed: an integer >= 1)"),
    ("evaluate pope", "--min-answered 1.5",
     "argument --min-answered: 1.5 is out of range (allowed: a number from 0 to 1)"),
    ("evaluate pope", "--batch-size -2", "argument --batch-size: -2 is out of range (allowed: an integer >= 1)"),
    ("evaluate report", "--images-per-round -1",
     "argument --images-per-round: -1 is out of range (allowed: an integer >= 0)"),
]
if not torch.cuda.is_available():
    BAD_FLAGS.append(("train", "--device cuda", "argument --device: 'cuda': CUDA is not available on this machine"))


def base_argv(script, m, d, o):
    """Valid flags for each script, to which a case adds its bad one (argparse keeps the last of a repeated flag).
    train.py gets a tiny --base, so that a refusal that went missing costs a second, not a world θ0 build."""
    return {"train": ["--base", m, "--images", d, "--run-dir", o, "--no-eval"],
            "train world": ["--run-dir", o, "--no-eval"],
            "generate": ["--model", m, "--images", d, "--out", o],
            "evaluate": ["--model", m, "--test-dir", o],
            "evaluate pope": ["pope", "--questions", f"{d}/q.jsonl", "--answers", f"{d}/a.jsonl"],
            "evaluate report": ["report", o]}[script]


MAINS = {"train": train.main, "train world": train.main, "generate": generate.main, "evaluate": evaluate.main,
         "evaluate pope": evaluate.main, "evaluate report": evaluate.main}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    m = tiny.model_dir(root / "m")
    d = tiny.images(root / "d", 2)
    (root / "d" / "q.jsonl").write_text("")
    (root / "d" / "a.jsonl").write_text("")
    (root / "d" / "list.json").write_text("[]")
    return m, d, str(root / "o")


def test_bad_flags_are_refused_at_parse_time_with_one_line(dirs, capsys):
    m, d, o = dirs

    def fill(s):
        return s.format(m=m, d=d, o=o)

    for script, flags, expected in BAD_FLAGS:
        argv = base_argv(script, m, d, o) + [fill(f) for f in flags.split()]
        with pytest.raises(SystemExit) as e:
            cli.run(MAINS[script], argv)
        err = capsys.readouterr().err
        assert e.value.code == 2, (script, flags, e.value.code)
        assert err.count("\n") == 1 and err.startswith(f"{script.split()[0]}.py") and "error: " in err, err
        assert fill(expected) in err, (script, flags, err)
        assert not os.path.exists(o), (script, flags)  # refused before anything was written
    # The ends of each range are allowed.
    for flags in (["--noise-step", "0"], ["--noise-step", "999"], ["--warmup-ratio", "0"], ["--warmup-ratio", "1"],
                  ["--lora-dropout", "0"], ["--beta", "1e-9"], ["--ica-weight", "0"]):
        train.parse_args(["--run-dir", o] + flags)


def test_help_shows_defaults_and_the_subcommands(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["-h"])
    out = capsys.readouterr().out
    assert "pairs per optimizer step (official: 128) (default: 16)" in " ".join(out.split())
    assert "{des,gen | gen}" in out and "(default: des,gen)" in out and "{des,gen,gen}" not in out
    assert "(default: None)" not in out and "(default: False)" not in out
    with pytest.raises(SystemExit):
        generate.parse_args(["-h"])
    assert "(default: 600)" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        evaluate.main(["-h"])
    usage = capsys.readouterr().out.split("\n\n")[0]
    assert all(f"evaluate.py {sub}" in usage for sub in ("pope", "amber", "report", "--compare"))
    with pytest.raises(SystemExit):
        evaluate.main(["pope", "-h"])
    assert "(default: 0.95)" in capsys.readouterr().out


def broken_model_dirs(root, make):
    """{case: (model dir, the file the line must name, the words it must hold)}: each file of a model directory
    missing or corrupt, as an interrupted download or a bad edit leaves it."""
    cases = {}

    def case(name, file, words, edit):
        path = str(root / name)
        shutil.copytree(make, path)
        edit(path)
        cases[name] = (path, os.path.join(path, file) if file else path, words)

    def write(name, data):
        def edit(p):
            with open(os.path.join(p, name), "wb") as f:
                f.write(data)
        return edit

    def truncate(p):
        f = os.path.join(p, "model.safetensors")
        os.truncate(f, os.path.getsize(f) // 2)

    case("config_empty", "config.json", "empty file", write("config.json", b""))
    case("config_invalid", "config.json", "not valid JSON", write("config.json", b"{'text_config': 1"))
    case("config_list", "config.json", "expected a JSON object", write("config.json", b"[1, 2]"))
    case("config_missing", "", "no config.json", lambda p: os.remove(os.path.join(p, "config.json")))
    case("weights_truncated", "model.safetensors", "not a readable safetensors file", truncate)
    case("weights_empty", "model.safetensors", "not a readable safetensors file", write("model.safetensors", b""))
    case("weights_missing", "", "no model.safetensors", lambda p: os.remove(os.path.join(p, "model.safetensors")))
    case("tokenizer_json_missing", "tokenizer.json", "missing",
         lambda p: os.remove(os.path.join(p, "tokenizer.json")))
    case("tokenizer_json_invalid", "tokenizer.json", "not valid JSON", write("tokenizer.json", b'{"model": '))
    case("tokenizer_config_invalid", "tokenizer_config.json", "not valid JSON",
         write("tokenizer_config.json", b"\x00\x01"))
    case("no_tokenizer", "", "no tokenizer files",
         lambda p: [os.remove(os.path.join(p, n)) for n in ("tokenizer.json", "tokenizer_config.json")])
    case("preprocessor_invalid", "preprocessor_config.json", "not valid JSON",
         write("preprocessor_config.json", b"{"))
    return cases


def test_model_directory_errors_are_one_line_naming_the_file(tmp_path, dirs):
    m, d, _ = dirs
    q = tmp_path / "coco_pope_random.json"
    q.write_text(json.dumps({"question_id": 1, "image": "img_0.png", "text": "Is there a star?", "label": "yes"}))
    for name, (path, file, words) in broken_model_dirs(tmp_path / "broken", m).items():
        argvs = {"generate": (generate.main, ["--model", path, "--images", d, "--out", str(tmp_path / "g")]),
                 "evaluate": (evaluate.main, ["--model", path, "--test-dir", str(tmp_path / "t")]),
                 "evaluate pope": (evaluate.main, ["pope", "--model", path, "--image-dir", d, "--questions", str(q),
                                                   "--out-dir", str(tmp_path / "p")])}
        for script, (main, argv) in argvs.items():
            with pytest.raises(SystemExit) as e:
                cli.run(main, argv)
            msg = str(e.value.code)
            assert msg.startswith(f"error: {file}: ") and words in msg and "\n" not in msg, (name, script, msg)
    # train.py reads θ0 through generate.py: the same line, before any training.
    path, file, _ = broken_model_dirs(tmp_path / "broken_train", m)["weights_truncated"]
    with pytest.raises(SystemExit, match=f"^error: {file}: not a readable safetensors file"):
        cli.run(train.main, ["--iter", "1", "--base", path, "--images", d, "--run-dir", str(tmp_path / "r"),
                             "--no-eval"])


def test_refusals_from_the_command_line(tmp_path, dirs):
    """As a user sees them: one line on stderr, no traceback, exit status 2 for a flag and 1 for a file."""
    m, d, _ = dirs
    bad = broken_model_dirs(tmp_path / "broken", m)
    cases = [
        (["train.py", "--beta", "-1", "--run-dir", str(tmp_path / "r")], 2,
         "train.py: error: argument --beta: -1 is out of range (allowed: a number > 0) (see train.py -h)"),
        (["generate.py", "--model", m, "--images", d, "--out", str(tmp_path / "g"), "--num-images", "0"], 2,
         "generate.py: error: argument --num-images: 0 is out of range (allowed: an integer >= 1) "
         "(see generate.py -h)"),
        (["generate.py", "--model", bad["config_empty"][0], "--images", d, "--out", str(tmp_path / "g")], 1,
         f"error: {bad['config_empty'][1]}: empty file"),
        (["evaluate.py", "pope", "--questions", str(tmp_path / "none.json"), "--answers", str(tmp_path / "a")], 2,
         f"evaluate.py pope: error: argument --questions: file not found: {tmp_path / 'none.json'} "
         "(see evaluate.py pope -h)"),
    ]
    procs = [subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for argv, _, _ in cases]
    for (argv, code, line), proc in zip(cases, procs):
        out, err = proc.communicate(timeout=120)
        assert (proc.returncode, err, out) == (code, line + "\n", ""), argv


def test_round_order_is_checked_before_theta0_is_built(tmp_path, dirs, capsys):
    """--iter 3 on an empty run directory stops at once (the embedded world's θ0 takes minutes to build), and the
    command it suggests keeps the user's flags."""
    m, d, _ = dirs
    run = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        cli.run(train.main, ["--iter", "3", "--run-dir", str(run), "--seed", "4"])
    assert str(e.value.code) == (f"error: round 3 needs round 2 finished ({run}/iter_2/meta.json is missing); run "
                                 f"first: python train.py --iter 1 --run-dir {run} --seed 4 (then --iter 2)")
    assert not run.exists()  # no θ0, no pool, nothing
    (run / "iter_1").mkdir(parents=True)
    (run / "iter_1" / "meta.json").write_text("{}")
    with pytest.raises(SystemExit) as e:
        cli.run(train.main, ["--iter=3", "--base", m, "--images", d, "--run-dir", str(run), "--lr", "1e-3"])
    assert str(e.value.code).endswith(f"run first: python train.py --iter=2 --base {m} --images {d} "
                                      f"--run-dir {run} --lr 1e-3")


def test_round_pairs_that_are_empty_or_stale(tmp_path, dirs, monkeypatch, capsys):
    """A round whose pairs were generated from other inputs is refused with the way out, unless it holds no pairs:
    then it is generated again. A round with no pairs from unchanged inputs says why there are none."""
    m, _, _ = dirs
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    (imgs / "bad.png").write_bytes(b"not an image")
    args = ["--iter", "1", "--base", m, "--images", str(imgs), "--run-dir", str(tmp_path / "run"), "--no-eval"]
    with pytest.raises(SystemExit, match="no readable images"):  # all unreadable: no pairs.jsonl is written
        cli.run(train.main, args)
    tiny.images(imgs, 3)  # readable images added; the random tiny model asks no question: an empty pairs.jsonl
    round_dir = tmp_path / "run" / "iter_1"
    with pytest.raises(SystemExit) as e:
        cli.run(train.main, args)
    assert str(e.value.code) == (
        f"error: {round_dir}/pairs.jsonl: no pairs to train on (0 malformed lines; images 3, images_unreadable 1, "
        "questions_kept 0, filtered {'repetition': 0, 'non_alnum': 0, 'identical': 0, 'yes_no': 0, "
        "'rejected_in_chosen': 0}). The round is generated again once its images, θ(0) or settings change; or "
        f"delete {round_dir}")
    # The scripted model says something; with one more image the inputs changed, and an empty round costs nothing
    # to redo: it is generated again, and trains.
    monkeypatch.setattr(selfplay, "generate", scripted.scripted_generate)
    sm = scripted.model_dir(tmp_path / "sm")
    shutil.copytree(tmp_path / "run", tmp_path / "run2")
    tiny.images(imgs, 12)
    args = ["--iter", "1", "--base", sm, "--images", str(imgs), "--run-dir", str(tmp_path / "run2"), "--no-eval",
            "--batch-size", "4", "--micro-batch-size", "4", "--epochs", "1"]
    cli.run(train.main, args)
    out = capsys.readouterr().out
    assert "holds no pairs and its inputs changed (θ(0) weights, images); generating it again" in out, out
    with open(tmp_path / "run2" / "iter_1" / "report.json") as f:
        assert json.load(f)["pairs"] >= 10
    assert (tmp_path / "run2" / "iter_1" / "meta.json").exists()
    # Pairs from other inputs are not reused and not thrown away: the line says how to go on.
    (tmp_path / "run2" / "iter_1" / "meta.json").unlink()
    for flags, what in ((["--noise-step", "400"], "generation settings"), ([], "images")):
        if not flags:
            (imgs / "img_0.png").write_bytes((imgs / "img_1.png").read_bytes())
        with pytest.raises(SystemExit) as e:
            cli.run(train.main, args + flags)
        assert str(e.value.code) == (f"error: {tmp_path}/run2/iter_1/pairs.jsonl was generated from other inputs "
                                     f"({what} changed since); delete {tmp_path}/run2/iter_1 to generate the round "
                                     "again, or use another --run-dir")
