"""Flags made from the config dataclasses: defaults and help from the fields, rules from the library."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from featcache.cli.flags import add_config, field_help, from_args
from featcache.cli.main import main
from featcache.cli.parser import build_parser
from featcache.data.config import DataConfig
from featcache.extraction.config import ExtractConfig, Views
from featcache.runs.finetune import FinetuneConfig
from featcache.runs.probe import ProbeConfig
from featcache.runs.spec import RunSpec
from featcache.runs.sweep import SweepGrid
from featcache.train.config import TrainConfig
from featcache.train.heads import HeadSpec

MINIMAL = {
    "extract": ["m", "d"],
    "train": ["m", "d", "--out", "o"],
    "finetune": ["m", "d", "--out", "o"],
    "sweep": ["m", "d", "--out", "o", "--layers", "a"],
    "probe": ["m", "d"],
}


def _verbs() -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def test_every_config_flag_defaults_to_its_field_and_has_help() -> None:
    seen = 0
    for verb, p in _verbs().items():
        for action in p._actions:
            origin = getattr(action, "featcache_field", None)
            if origin is None:
                continue
            cls, name = origin
            field = next(f for f in dataclasses.fields(cls) if f.name == name)
            want = field.default if field.default is not dataclasses.MISSING else None
            assert action.default == want or action.required, (verb, action.option_strings, action.default)
            assert action.help and len(action.help) > 10, (verb, action.option_strings)
            seen += 1
    assert seen > 100  # every run verb exposes its configs


@pytest.mark.parametrize("verb", sorted(MINIMAL))
def test_a_bare_command_line_builds_the_library_defaults(verb: str) -> None:
    a = build_parser().parse_args([verb, *MINIMAL[verb]])
    for cls in a._config_fields:
        if cls in (RunSpec, SweepGrid):
            continue  # model/data/out and the sweep's layers are required arguments
        required = {"spec": "d"} if cls is DataConfig else {}
        assert from_args(cls, a) == cls(**required), cls.__name__


def test_field_help_reads_the_attributes_section() -> None:
    assert field_help(TrainConfig)["lr"] == "peak learning rate."
    assert "Linear with the closed-form step" in field_help(TrainConfig)["fast_paths"]
    assert "featcache.train" in field_help(TrainConfig)["fast_paths"]  # :mod:`...` markup stripped
    assert set(field_help(FinetuneConfig)) == {f.name for f in dataclasses.fields(FinetuneConfig)}
    assert set(field_help(DataConfig)) == {f.name for f in dataclasses.fields(DataConfig)}


def test_flag_types_follow_the_fields() -> None:
    p = argparse.ArgumentParser()
    add_config(p, ExtractConfig, only=["input_size", "amp", "workers"])
    add_config(p, HeadSpec, rename={"kind": "--head"})
    add_config(p, ProbeConfig, only=["strengths", "standardize"])
    line = "--input-size 48 40 --amp off --head mlp --hidden 64,32 --strengths 1e-3,0.1 --no-standardize"
    a = p.parse_args(line.split())
    assert from_args(ExtractConfig, a) == ExtractConfig(input_size=(48, 40), amp=False)
    assert from_args(HeadSpec, a) == HeadSpec("mlp", hidden=(64, 32))
    assert from_args(ProbeConfig, a) == ProbeConfig(strengths=(1e-3, 0.1), standardize=False)
    with pytest.raises(SystemExit):
        p.parse_args(["--amp", "maybe"])


def test_the_cli_refuses_what_the_library_refuses_with_the_same_message(
    capsys: pytest.CaptureFixture[str], tmp_path: object
) -> None:
    with pytest.raises(ValueError) as lib:
        Views.parse(0, "flip")
    code = main(["train", "torchvision:resnet18", "digits", "--augment", "flip", "--out", str(tmp_path)])
    assert code == 2 and str(lib.value) in capsys.readouterr().err
    with pytest.raises(ValueError) as lib:
        TrainConfig(optimizer="adamm")
    code = main(["train", "torchvision:resnet18", "digits", "--optimizer", "adamm", "--out", str(tmp_path)])
    assert code == 2 and str(lib.value) in capsys.readouterr().err


def test_every_option_of_every_verb_has_help_and_names_its_default() -> None:
    missing = []
    for verb, p in _verbs().items():
        assert p.epilog and "example:" in p.epilog, verb
        for action in p._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            switch = isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction))
            text = action.help or ""
            named = switch or "(default: " in text or "(required)" in text or not action.option_strings
            if len(text) < 8 or not named:
                missing.append((verb, action.option_strings or action.dest, text))
    assert missing == []


def test_input_size_also_takes_timms_channels_first(capsys: pytest.CaptureFixture[str]) -> None:
    for line, want in (("48 40", (48, 40)), ("3 48 40", (48, 40)), ("1 48 40", (48, 40))):
        a = build_parser().parse_args(["extract", "m", "d", "--input-size", *line.split()])
        assert from_args(ExtractConfig, a).input_size == want
    for bad in ("5 48 40", "48", "1 2 3 4"):
        assert main(["extract", "m", "d", "--input-size", *bad.split()]) == 2
        err = capsys.readouterr().err
        assert f"--input-size takes H W (or C H W with C 1 or 3, as timm writes it), got {bad}" in err


@pytest.mark.parametrize("verb", ["train", "finetune"])
def test_data_may_follow_options_in_verbs_that_resume(verb: str) -> None:
    argv = [verb, "torchvision:resnet18", "--weights", "none", "photos", "--out", "o"]
    a = build_parser([verb]).parse_args(argv)
    assert (a.model, a.data, a.weights) == ("torchvision:resnet18", "photos", "none")
    a = build_parser([verb]).parse_args([verb, "--resume", "--out", "o"])
    assert (a.model, a.data) == (None, None)
    with pytest.raises(SystemExit):  # a third word is still refused
        build_parser([verb]).parse_args([verb, "m", "d", "extra", "--out", "o"])


def test_weights_help_names_pretrained_as_the_default(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser(["train"]).parse_args(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: pretrained)" in text and "(default: none)" not in text.split("--weights")[1][:200]


def test_an_unknown_option_is_named_by_its_verb_with_the_closest_one(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit):
        build_parser(["train"]).parse_args(["train", "m", "d", "--out", "o", "--standardise"])
    err = capsys.readouterr().err
    assert "usage: featcache train" in err
    assert "featcache train: error: unrecognized arguments: --standardise" in err
    assert err.count("did you mean --standardize?") == 1


def test_sweep_help_names_what_an_empty_grid_axis_means(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser(["sweep"]).parse_args(["sweep", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: --lr's value alone)" in text and "(default: --weight-decay's value alone)" in text


def test_max_image_pixels_help_states_pillows_limit(capsys: pytest.CaptureFixture[str]) -> None:
    from PIL import Image

    with pytest.raises(SystemExit):
        build_parser(["extract"]).parse_args(["extract", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert f"(default: {Image.MAX_IMAGE_PIXELS:,}, Pillow's limit)" in text and "(default: off)" not in text


@pytest.mark.parametrize("value", ["", ",", " , "])
def test_an_empty_comma_list_is_refused_not_taken_as_the_default(
    value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["sweep", "m", "d", "--out", "o", "--layers", "a", "--lrs", value]
    assert main(argv) == 2
    assert f"argument --lrs: {value!r} holds no value" in capsys.readouterr().err
