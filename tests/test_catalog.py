"""``featcache models`` from the memoised catalog (featcache/_catalog.py): the registry's own listing,
without torch once memoised, and listed again when a weights file lands in torch's hub cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from torchvision.models import get_model_weights

from conftest import run_python
from featcache.backbones.registry import offline_models

MODELS = """
import json, sys
from featcache.cli.main import main
main(["models", *sys.argv[1:]])
heavy = ("torch", "torchvision", "timm")
print(json.dumps(sorted({m.split(".")[0] for m in sys.modules} & set(heavy))))
"""

LIST_MODELS = (
    "import json; from featcache.backbones.registry import list_models; print(json.dumps(list_models()))"
)


def _models(*argv: str) -> tuple[list[str], list[str]]:
    """(the names `featcache models` printed, the heavy packages it imported)."""
    lines = run_python(MODELS, *argv).stdout.splitlines()
    return [ln.split()[0] for ln in lines[:-1]], json.loads(lines[-1])


def test_models_lists_the_registry_and_starts_without_torch_once_memoised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FEATCACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    first, _ = _models()
    # The registry's own listing, computed on the first call; read in a fresh process, as sources other
    # test modules register in this one are not featcache's.
    registry = json.loads(run_python(LIST_MODELS).stdout)
    assert first == registry
    again, heavy = _models()
    assert again == first and heavy == []
    # A weights file in torch's hub cache: the memo no longer holds, the model is listed as offline.
    weights = get_model_weights("resnet18").DEFAULT.url.rsplit("/", 1)[-1]  # type: ignore[attr-defined]
    (tmp_path / "torch" / "hub" / "checkpoints").mkdir(parents=True)
    (tmp_path / "torch" / "hub" / "checkpoints" / weights).write_bytes(b"")
    offline, _ = _models("--offline", "torchvision:*")
    assert offline == sorted(offline_models("torchvision")) and "torchvision:resnet18" in offline
    assert _models("--offline", "torchvision:*") == (offline, [])
