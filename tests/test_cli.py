"""The command line: help with examples, typos exit 2 with a suggestion, outputs match reality."""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_python, tiny_resnet_on_digits
from featcache.backbones.registry import load_backbone
from featcache.cache.store import FeatureCache
from featcache.cli.main import COMMANDS, main


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("verb", sorted(COMMANDS))
def test_every_verb_has_help_with_an_example(verb: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main([verb, "--help"])
    assert exc.value.code == 0
    assert "example:" in capsys.readouterr().out


def test_layers_json_matches_a_real_forward(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(
        capsys, "layers", "torchvision:resnet18", "--weights", "none", "--input-size", "64", "64", "--json"
    )
    assert code == 0
    rows = {r["name"]: r for r in json.loads(out)}
    model = load_backbone("torchvision:resnet18", weights="none").model
    shapes: dict[str, tuple[int, ...]] = {}

    def note(name: str, out: torch.Tensor) -> None:  # a hook that returns a value would replace the output
        shapes.setdefault(name, tuple(out.shape))

    hooks = [
        m.register_forward_hook(lambda _m, _i, o, n=n: note(n, o)) for n, m in model.named_modules() if n
    ]
    with torch.inference_mode():
        model(torch.zeros(1, 3, 64, 64))
    for h in hooks:
        h.remove()
    for name, shape in shapes.items():
        assert tuple(rows[name]["shape"]) == shape, name
    assert tuple(rows["penultimate"]["shape"]) == (1, 512)
    assert rows["layer4"]["params"] == sum(p.numel() for p in model.layer4.parameters())


def test_summary_totals(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(
        capsys, "summary", "torchvision:resnet18", "--weights", "none", "--input-size", "64", "64"
    )
    assert code == 0
    model = load_backbone("torchvision:resnet18", weights="none").model
    assert f"total params: {sum(p.numel() for p in model.parameters()):,}" in out
    assert "layer3" in out and "[1, 256, 4, 4]" in out and "MACs" in out


def test_summary_counts_what_a_fine_tuning_plan_trains(capsys: pytest.CaptureFixture[str]) -> None:
    base = ["summary", "torchvision:resnet18", "--weights", "none", "--input-size", "32", "32"]
    code, out, _ = run(capsys, *base)
    assert code == 0 and "trainable params: 0 (featcache loads backbones frozen" in out
    code, out, _ = run(capsys, *base, "--train", "last:1")
    model = load_backbone("torchvision:resnet18", weights="none").model
    want = sum(p.numel() for m in (model.layer4[1], model.fc) for p in m.parameters())
    assert code == 0 and f"trainable params: {want:,} (with --train last:1)" in out


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["layers", "torchvision:resnet19", "--weights", "none"], "resnet18"),
        (["layers", "torchvisoin:resnet18"], "torchvision"),
        (["extract", "torchvision:resnet18", "digits", "--weights", "none", "--layers", "layr3"], "layer3"),
        (["extract", "torchvision:resnet18", "digitz", "--weights", "none"], "digits"),
        (
            [
                "train",
                "torchvision:resnet18",
                "digits",
                "--weights",
                "none",
                "--head",
                "lineer",
                "--out",
                "x",
            ],
            "linear",
        ),
        (["cache", "info", "0000"], "cache ls"),
        (["trian", "efficientnet-lite0", "digits"], "Did you mean 'train'?"),
        (["cache", "inf"], "Did you mean 'info'?"),
        (
            ["train", "efficientnet-lite0", "digits", "--standardise", "--out", "x"],
            "did you mean --standardize",
        ),
    ],
)
def test_typos_exit_2_with_a_suggestion(
    argv: list[str],
    needle: str,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FEATCACHE_HOME", str(tmp_path))
    code, _, err = run(capsys, *argv)
    assert code == 2
    assert needle in err and "Traceback" not in err


def test_extract_cache_verbs_and_train(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FEATCACHE_HOME", str(tmp_path / "cache"))
    base = [*tiny_resnet_on_digits(100), "-q"]
    code, out, _ = run(capsys, "extract", *base, "--layers", "layer2,layer3")
    assert code == 0 and out.count("[built]") == 3
    key = out.split()[1]
    code, out, _ = run(capsys, "extract", *base, "--layers", "layer3,layer2")
    assert out.count("[hit]") == 3
    code, out, _ = run(capsys, "cache", "ls")
    assert key in out and " ok" in out
    code, out, _ = run(capsys, "cache", "info", key)
    info = json.loads(out)
    assert info["layers"] == {"layer2": [128], "layer3": [256]} and info["status"] == "ok"
    code, out, _ = run(capsys, "cache", "verify", key)
    assert code == 0 and out.startswith("OK")
    code, out, _ = run(capsys, "cache", "gc")
    assert code == 0 and out.startswith("0 partial entries") and "complete entries stay" in out
    code, out, _ = run(
        capsys, "train", *base, "--layer", "layer3", "--epochs", "2", "--out", str(tmp_path / "run")
    )
    assert code == 0 and "test accuracy" in out
    fast = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert fast["fast_paths"]["closed_form_step"] and not fast["fast_paths"]["front_once"]
    code, out, _ = run(
        capsys,
        "train",
        *base,
        *("--layer", "layer3", "--epochs", "2", "--no-fast-paths", "--out", str(tmp_path / "plain")),
    )
    plain = json.loads((tmp_path / "plain" / "metrics.json").read_text())
    assert code == 0 and not any(v for k, v in plain["fast_paths"].items() if k != "front_seconds")
    assert plain["test"]["loss"] == pytest.approx(fast["test"]["loss"], rel=1e-4)
    code, out, _ = run(capsys, "cache", "rm", key)
    assert code == 0
    code, out, _ = run(capsys, "cache", "ls")
    assert key not in out


def test_extract_prints_per_split_counts_and_cache_verbs_on_tables(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FEATCACHE_HOME", str(tmp_path / "cache"))
    base = [*tiny_resnet_on_digits(100), "-q", "--layers", "layer2"]
    code, out, _ = run(capsys, "extract", *base, "--json")
    counts = json.loads(out)
    assert code == 0 and list(counts) == ["train", "val", "test"]
    assert all(c["from_cache"] == 0 and c["extracted"] == c["rows"] > 0 for c in counts.values())
    assert (
        len({c["table"] for c in counts.values()}) == 1
        and len({c["split_key"] for c in counts.values()}) == 3
    )
    # Another validation fraction: other splits of the same images, all from the cache.
    code, out, _ = run(capsys, "extract", *base, "--val-fraction", "0.3")
    *lines, table = out.strip().splitlines()
    assert code == 0 and len(lines) == 3 and all(" 0 extracted" in ln and "[hit]" in ln for ln in lines), out
    assert table.startswith("cache table: ") and table.endswith(counts["train"]["table"])  # once, in full
    rows = {ln.split()[0]: int(ln.split()[2]) for ln in lines}
    assert sum(rows.values()) == sum(c["rows"] for c in counts.values())
    assert all(f"{n} rows: {n} from the cache, 0 extracted" in ln for ln, n in zip(lines, rows.values()))
    # train prints the same counts per split, without a forward pass here
    code, out, _ = run(
        capsys, "train", *base[:-2], "--layer", "layer2", "--epochs", "1", "--out", str(tmp_path / "run")
    )
    assert code == 0 and all(f"{s}: " in out for s in ("train", "val", "test")) and " 0 extracted" in out
    key = counts["train"]["table"]
    code, out, _ = run(capsys, "cache", "ls")
    assert code == 0 and key[:16] in out and " ok" in out
    code, out, _ = run(capsys, "cache", "compact", key[:12])
    assert code == 0 and "segments -> 1" in out
    code, out, _ = run(capsys, "cache", "verify", key[:12])
    assert code == 0 and out.startswith("OK")
    code, out, _ = run(capsys, "cache", "gc", "--unused-days", "1")
    assert code == 0 and key in FeatureCache(tmp_path / "cache").entries()  # used a moment ago: kept
    code, _, err = run(capsys, "cache", "compact")
    assert code == 2 and "needs a KEY" in err


def test_probe_writes_a_run_that_export_and_predict_take(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FEATCACHE_HOME", str(tmp_path / "cache"))
    base = tiny_resnet_on_digits(150)
    out_dir = str(tmp_path / "probe")
    code, out, _ = run(capsys, "probe", *base, "-q", "--strengths", "0.001,0.1", "--out", out_dir, "--json")
    assert code == 0
    result = json.loads(out)
    assert result["strength"] in (0.001, 0.1) and [r["strength"] for r in result["sweep"]] == [0.001, 0.1]
    assert json.loads((tmp_path / "probe" / "metrics.json").read_text())["test"] == result["test"]
    code, out, _ = run(capsys, "export", out_dir, "--format", "safetensors")
    assert code == 0 and "exported" in out
    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        Image.fromarray(np.full((8, 8), 40 * i, dtype=np.uint8)).save(images / f"{i}.png")
    code, out, _ = run(capsys, "predict", out_dir, str(images), "--json")
    assert code == 0 and len(json.loads(out)) == 3
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "x.png").write_bytes(b"not a png")
    code, _, err = run(capsys, "predict", out_dir, str(broken))
    assert code == 2 and "none of the 1 files could be read" in err and "x.png" in err


def test_train_on_cached_augmented_views(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FEATCACHE_HOME", str(tmp_path / "cache"))
    base = ["train", *tiny_resnet_on_digits(120), "--epochs", "3", "-q", "--views", "2", "--augment", "flip"]
    assert run(capsys, *base, "--out", str(tmp_path / "run"))[0] == 0
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert len(config["view_keys"]) == 2 and config["extract"]["augment"] == "flip"
    assert len(json.loads((tmp_path / "run" / "metrics.json").read_text())["history"]) == 3
    code, _, err = run(capsys, *base[:-4], "--views", "2", "--augment", "spin", "--out", str(tmp_path / "x"))
    assert code == 2 and "unknown augmentation" in err and "flip" in err
    code, _, err = run(capsys, *base[:-4], "--augment", "flip", "--out", str(tmp_path / "y"))
    assert code == 2 and "needs --views" in err  # not silently ignored


def test_resume_needs_only_the_run_folder_and_checks_what_is_written(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FEATCACHE_HOME", str(tmp_path / "cache"))
    fit_mod = importlib.import_module("featcache.train.fit")
    validate, calls = fit_mod._validate, {"n": 0}

    def ctrl_c_in_epoch_3(*args: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return validate(*args)

    flags = [*tiny_resnet_on_digits(150), "--epochs", "4", "--lr", "3e-3", "-q", "--cache-dir"]
    flags += [str(tmp_path / "c")]
    for verb, extra in (
        ("train", ["--layer", "layer3", "--head", "mlp"]),
        ("finetune", ["--train", "last:1"]),
    ):
        assert run(capsys, verb, *flags, *extra, "--out", str(tmp_path / f"{verb}-full"))[0] == 0
        calls["n"] = 0
        monkeypatch.setattr(fit_mod, "_validate", ctrl_c_in_epoch_3)
        out = str(tmp_path / verb)
        assert run(capsys, verb, *flags, *extra, "--out", out)[0] == 130
        monkeypatch.undo()
        monkeypatch.setenv("FEATCACHE_HOME", str(tmp_path / "cache"))
        code, _, err = run(capsys, verb, "--resume", "--out", out, "--lr", "0.5")
        assert code == 2 and "train.lr: 0.003 -> 0.5" in err  # a written flag is checked against the run
        code, _, err = run(capsys, verb, "--resume", "--out", out, "--epochs", "4", "-q")  # the same: fine
        assert code == 0, err
        full, resumed = (
            json.loads((tmp_path / d / "metrics.json").read_text()) for d in (f"{verb}-full", verb)
        )
        assert resumed["finished"] and len(resumed["history"]) == 4
        np.testing.assert_allclose(resumed["step_losses"], full["step_losses"], rtol=1e-5)
    assert not list((tmp_path / "cache").glob("*"))  # the run's own --cache-dir was read from the run
    code, _, err = run(capsys, "train", "--out", str(tmp_path / "x"))
    assert code == 2 and "needs MODEL and DATA" in err and "--resume" in err


STARTUP = r"""
import json, sys
from featcache.cli import main
for argv in json.loads(sys.argv[1]):
    try:
        main(argv)
    except SystemExit:  # --help, --version
        pass
heavy = ("torch", "torchvision", "timm", "numpy", "matplotlib", "PIL", "safetensors")
print(json.dumps(sorted({m.split(".")[0] for m in sys.modules} & set(heavy))))
"""


@pytest.mark.parametrize(
    ("argv", "allowed"),
    [
        ([["--help"], ["--version"], ["cache", "--help"], ["models", "--help"]], []),
        # The store reads tables with numpy alone: torch is loaded where rows become tensors.
        ([["cache", "ls", "--cache-dir", "{tmp}"]], ["numpy"]),
    ],
)
def test_the_command_line_starts_without_what_it_does_not_need(
    argv: list[list[str]], allowed: list[str], tmp_path: Path
) -> None:
    argv = [[a.format(tmp=tmp_path) for a in args] for args in argv]
    loaded = json.loads(run_python(STARTUP, json.dumps(argv)).stdout.splitlines()[-1])
    assert loaded == allowed


USAGE_ERROR = r"""
import contextlib, io, json, sys
from featcache.cli import main
err = io.StringIO()
with contextlib.redirect_stderr(err):
    code = main(json.loads(sys.argv[1]))
print(json.dumps({"code": code, "torch": "torch" in sys.modules, "err": err.getvalue()}))
"""


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (["train", "--lr", "-1", "resnet18", "digits"], "required: --out"),
        (["train", "--lr", "-1", "resnet18", "digits", "--out", "{tmp}"], "--lr -1 (lr=-1.0) must be"),
        (["train", "resnet18", "digits", "--out", "{tmp}", "--epochs", "0"], "--epochs 0"),
        (["train", "resnet18", "digits", "--out", "{tmp}", "--standardise"], "did you mean --standardize"),
        (["train", "resnet18", "digits", "--out", "{tmp}", "--head", "lin"], "unknown head 'lin'"),
        (["train", "resnet18", "digits", "--out", "{tmp}", "--folds", "1"], "at least 2 folds"),
        (["train", "resnet18", "digits", "--out", "{tmp}", "--val-fraction", "1.5"], "--val-fraction 1.5"),
        (["sweep", "resnet18", "digits", "--layers", "a", "--lrs", "-1", "--out", "{tmp}"], "--lrs -1"),
        (["probe", "resnet18", "digits", "--max-iter", "0"], "--max-iter 0"),
        (["probe", "resnet18", "digits", "--metric", "f1"], "unknown probe metric 'f1'"),
        (["finetune", "resnet18", "digits", "--train", "lst:1", "--out", "{tmp}"], "'lst:1'"),
        (["extract", "resnet18", "digits", "--pool", "mean"], "Did you mean: 'avg'"),
        (["extract", "resnet18", "digits", "--extract-batch-size", "8"], "unrecognized arguments"),
        (["extract", "resnet18"], "required: data"),
        (["layers", "resnet18", "--input-size", "0", "3"], "--input-size 0"),
        (["trian", "resnet18", "digits"], "Did you mean 'train'?"),
        (["export", "{tmp}", "--format", "onxx"], "unknown export format 'onxx'"),
        (["bench", "--only", "prob"], "unknown benchmark 'prob'"),
        (["bench", "--repeats", "0"], "--repeats 0"),
        (["knn", "resnet18", "digits", "--k", "0"], "--k 0"),
        (["embed", "resnet18", "digits", "--out", "{tmp}.txt"], "the format comes from the suffix"),
        (["predict", "{tmp}", "x.png", "--top-k", "0"], "--top-k 0"),
    ],
)
def test_usage_errors_are_reported_before_torch_is_imported(
    argv: list[str], said: str, tmp_path: Path
) -> None:
    """Every usage error (an unknown verb or option, a missing argument, a value a config refuses) exits 2
    with its message before torch loads: the configs' modules import no torch."""
    argv = [a.format(tmp=tmp_path / "run") for a in argv]
    out = json.loads(run_python(USAGE_ERROR, json.dumps(argv)).stdout.splitlines()[-1])
    assert out["code"] == 2 and said in out["err"] and "Traceback" not in out["err"]
    assert not out["torch"]
    assert not (tmp_path / "run").exists()


SOURCES_LOADED = r"""
import json, sys
from featcache.backbones import load_backbone
bb = load_backbone(sys.argv[1], weights="none")
print(json.dumps(sorted({m.split(".")[0] for m in sys.modules} & {"timm", "transformers"})))
"""


@pytest.mark.parametrize(
    ("spec", "loaded"),
    [("torchvision:resnet18", []), ("resnet18", []), ("timm:resnet18", ["timm"])],
)
def test_a_backbone_spec_imports_only_its_own_source(spec: str, loaded: list[str]) -> None:
    assert json.loads(run_python(SOURCES_LOADED, spec).stdout.splitlines()[-1]) == loaded


def test_the_sources_are_named_without_importing_them() -> None:
    code = (
        "import sys\n"
        "from featcache.backbones import list_sources\n"
        "print(list_sources(), 'timm' in sys.modules, 'torchvision' in sys.modules)"
    )
    out = run_python(code).stdout.strip()
    assert out == "['efficientnet-lite', 'hf', 'timm', 'torchvision'] False False"


def test_every_public_name_imports_from_the_lazy_package() -> None:
    code = (
        "import sys, featcache; assert 'torch' not in sys.modules\n"
        "from featcache import *  # noqa\n"
        "from featcache.extraction.build import extract as the_function  # the subpackage is loaded now\n"
        "assert featcache.extract is the_function  # and featcache.extract is still the function\n"
        "print(sorted(n for n in featcache.__all__ if getattr(featcache, n) is None))"
    )
    assert run_python(code).stdout.strip() == "[]"


def test_layers_and_summary_write_shapes_and_counts_alike(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["torchvision:resnet18", "--weights", "none", "--input-size", "32", "32", "--depth", "1"]
    tables = {}
    for verb in ("layers", "summary"):
        assert main([verb, *argv]) == 0
        tables[verb] = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line}
    params = sum(
        p.numel() for p in load_backbone("torchvision:resnet18", weights="none").model.layer3.parameters()
    )
    for verb, rows in tables.items():
        assert "[1, 256, 2, 2]" in rows["layer3"] and f"{params:,}" in rows["layer3"], verb
        assert " 128 " in rows["bn1"] + " " and "9,408" in rows["conv1"], verb  # small and large counts alike


def test_predict_on_a_folder_without_images_is_an_error(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    (tmp_path / "empty" / "nested").mkdir(parents=True)
    (tmp_path / "empty" / "notes.txt").write_text("not an image")
    code, out, err = run(capsys, "predict", str(tmp_path / "run"), str(tmp_path / "empty"))
    assert code == 2 and out == ""
    assert f"no image files under {str(tmp_path / 'empty')!r}" in err and ".png" in err
