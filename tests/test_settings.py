"""Settings as values: built once from the parsed flags, frozen, and a round's generation gets the run's own."""

import dataclasses
import typing

import pytest

import generate
import train
from sena import flags, rounds, settings, tiny


class Captured(Exception):
    """Raised by the stand-in for generate_round once it has seen its arguments: nothing else needs to run."""


def test_every_generation_flag_given_to_train_reaches_the_round(tmp_path, monkeypatch):
    """Each flag train.py passes on to generation, typed with a value other than its default (--device has no other
    value on a machine without CUDA), is what round 1's generation receives."""
    typed = {"--seed": "7", "--self-check": "text", "--ask-temperature": "0.5", "--keep-yes-no": None,
             "--noise-step": "500", "--enhance-types": "gen", "--threads": "1", "--device": "cpu",
             "--gen-batch-size": "5"}
    assert {flag for flag, _ in flags.round_flags()} | {"--gen-batch-size"} == set(typed)  # a new one is tested too
    seen = []

    def capture(*args, **kwargs):
        seen.append(args)
        raise Captured

    monkeypatch.setattr(rounds, "generate_round", capture)
    argv = ["--iter", "1", "--base", tiny.model_dir(tmp_path / "m"), "--images", tiny.images(tmp_path / "d", 2),
            "--run-dir", str(tmp_path / "run"), "--no-eval"]
    for flag, value in typed.items():
        argv += [flag] if value is None else [flag, value]
    with pytest.raises(Captured):
        train.main(argv)
    got = seen[0][0]
    expected = {"seed": 7, "self_check": "text", "ask_temperature": 0.5, "keep_yes_no": True, "noise_step": 500,
                "enhance_types": "gen", "threads": 1, "device": "cpu", "batch_size": 5}
    assert {name: getattr(got, name) for name in expected} == expected


def test_every_flag_is_a_settings_field_of_its_name():
    """Each flag of train.py, generate.py and evaluate.py --model / pope / amber is a field of the settings built
    from it (named as argparse names the flag's value), or one of the paths a script hands over beside them; and
    every field is a flag. A flag added without its field, or a field without its flag, fails here."""
    def names(*classes):
        return {f.name for cls in classes for f in dataclasses.fields(cls)}

    def dests(group):
        return {kw.get("dest", flag.lstrip("-").replace("-", "_")) for flag, kw in group}

    composed = {"generation", "train", "argv", "record", "answer"}  # built from other fields, not flags
    train_fields = names(settings.RunSettings, settings.GenerationSettings, settings.TrainSettings) - composed
    generate_only = dests(flags.generate_flags()) - dests(flags.train_flags())  # from generate.py's defaults
    assert dests(flags.train_flags()) == train_fields - generate_only | {"gen_batch_size"}
    assert dests(flags.generate_flags()) == names(settings.GenerationSettings, settings.ImageSource) | {
        "model", "out", "round"}
    assert dests(flags.world_eval_flags()) == names(settings.EvalSettings, settings.AnswerSettings) - composed | {
        "model", "test_dir", "test_labels", "out"}
    answering_paths = {"model", "image_dir", "out_dir", "suffix"}
    assert dests(flags.answering_flags()) == names(settings.AnswerSettings) | answering_paths


def test_each_flag_default_has_its_field_type():
    groups = [(settings.GenerationSettings, flags.generate_flags()), (settings.ImageSource, flags.generate_flags()),
              (settings.TrainSettings, flags.train_flags()), (settings.AnswerSettings, flags.answering_flags()),
              (settings.AnswerSettings, flags.world_eval_flags()), (settings.EvalSettings, flags.world_eval_flags()),
              (settings.RunSettings, flags.train_flags())]
    for cls, group in groups:
        defaults = flags.defaults(group)
        for name, kind in typing.get_type_hints(cls).items():
            if name in defaults:
                kinds = typing.get_args(kind) or (kind,)
                value = defaults[name]
                assert isinstance(value, kinds) or (float in kinds and type(value) is int), (cls, name, value, kind)


def test_settings_equal_what_the_scripts_parse(tmp_path):
    """Settings built from parsed flags equal settings built with the same values given by name (what library callers
    and benchmarks do): both take every other value from the one flag table."""
    ns = generate.parse_args(["--model", "M", "--out", "O", "--images", "I", "--round", "2", "--noise-step", "800"])
    assert settings.generation_settings(ns) == settings.generation_settings(noise_step=800)
    assert settings.image_source(ns) == settings.image_source(images="I")
    run = train.parse_args(["--run-dir", str(tmp_path), "--lora-alpha", "8", "--gen-batch-size", "4"])
    assert run.train == settings.train_settings(lora_alpha=8.0) and run.train.batch_size == 16
    assert run.generation == settings.generation_settings(batch_size=4)  # train.py's --batch-size is another flag
    assert dict(run.record)["lora_alpha"] == 8.0 and run.argv[-2:] == ("--gen-batch-size", "4")
    with pytest.raises(TypeError, match="no field"):
        settings.generation_settings(no_such_flag=1)


def test_ablations_switch_the_round_settings(tmp_path):
    """--ablation's switches are applied once, when the run's settings are built: seva turns off the self-check,
    self-enhancement and ICA; what the user typed stays in the record meta.json keeps."""
    run = train.parse_args(["--run-dir", str(tmp_path), "--ablation", "seva", "--ica-weight", "2"])
    assert (run.generation.self_check, run.generation.no_enhance, run.train.ica_weight) == ("off", True, 0.0)
    assert dict(run.record)["self_check"] == "image" and dict(run.record)["ica_weight"] == 2.0
    run = train.parse_args(["--run-dir", str(tmp_path), "--ablation", "no-se", "--self-check", "text"])
    assert (run.generation.self_check, run.generation.no_enhance, run.train.ica_weight) == ("text", True, 1.0)


def test_settings_are_frozen(tmp_path):
    run = train.parse_args(["--run-dir", str(tmp_path)])
    for obj, name in ((run, "base"), (run.generation, "threads"), (run.train, "lr"), (settings.eval_settings(), "seed"),
                      (settings.eval_settings().answer, "device"), (settings.image_source(), "offset")):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(obj, name, None)
