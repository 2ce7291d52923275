"""The main job end to end (quick) and the benchmark runner's JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from featcache.cli.main import main


@pytest.mark.slow
def test_demo_quick_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        ["demo", "--quick", "-q", "--out", str(tmp_path / "demo"), "--cache-dir", str(tmp_path / "c")]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "naive loop" in out and "random-init backbone" in out and "0 backbone passes" in out
    bench = json.loads((tmp_path / "demo" / "bench.json").read_text())
    assert bench["backbone_passes_second_run"] == 0
    rows = {r["run"].split(":")[0].split(",")[0]: r for r in bench["rows"]}
    assert rows["featcache"]["test acc"] > 0.5
    for f in ("metrics.json", "curves.png", "confusion.png", "config.json"):
        assert (tmp_path / "demo" / f).exists()


@pytest.mark.slow
def test_bench_quick_writes_valid_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bench.json"
    assert main(["bench", "--quick", "-q", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    names = [r["name"] for r in doc["results"]]
    assert any("end-to-end" in n for n in names) and any("DataLoader" in n for n in names)
    for r in doc["results"]:
        assert r["ratio"] > 0 and "target" in r
    assert doc["environment"]["torch"]


def test_bench_refuses_unknown_names_and_writes_no_file_unless_asked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["bench", "--quick", "--only", "nonsense,e2e"]) == 2
    err = capsys.readouterr().err
    assert "unknown benchmark 'nonsense'" in err and "cache_hit" in err
    assert main(["bench", "--quick", "-q", "--only", "cache_hit"]) == 0
    assert "cache hit" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []  # nothing written to the current directory
