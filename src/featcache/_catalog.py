"""The model names the backbone sources know, memoised so that ``featcache models`` starts without torch.

Listing torchvision's builders or timm's architectures imports them (and torch): seconds. Their
names change only when a package is installed or removed, and which of them load offline only when
a weights file lands in torch's hub cache or the Hugging Face hub cache. So the listing
(:func:`featcache.backbones.list_models` and :func:`~featcache.backbones.registry.offline_models`
per source, computed by the registry itself on a miss) is kept in ``<cache root>/.models.json`` under
a fingerprint of exactly that: the featcache version, the modification times of the site-packages
folders (an install or removal changes them) and the file names in both weight caches.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import site
import sysconfig
from pathlib import Path
from typing import Any

from ._util import write_json
from ._version import __version__

MEMO = ".models.json"


def _torch_hub_checkpoints() -> Path:
    """``torch.hub.get_dir()/checkpoints`` as torch computes it by default, without importing torch."""
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    home = os.environ.get("TORCH_HOME") or os.path.join(xdg, "torch")
    return Path(os.path.expanduser(home)) / "hub" / "checkpoints"


def _hf_hub_cache() -> Path:
    import huggingface_hub.constants  # no torch: a module of constants read from the environment

    return Path(huggingface_hub.constants.HF_HUB_CACHE)


def _names(folder: Path) -> list[str]:
    with contextlib.suppress(OSError):
        return sorted(p.name for p in folder.iterdir())
    return []


def fingerprint() -> str:
    """SHA-256 of everything the listing depends on (see the module's docstring)."""
    # Where packages are installed (not all of sys.path: it differs between `python -m` and `-c`).
    folders = {sysconfig.get_path("purelib"), sysconfig.get_path("platlib"), site.getusersitepackages()}
    installed = []
    for p in sorted(folders):
        with contextlib.suppress(OSError):
            installed.append([p, os.stat(p).st_mtime_ns])
    state = {
        "featcache": __version__,
        "site-packages": installed,
        "torch hub": _names(_torch_hub_checkpoints()),
        "hf hub": [n for n in _names(_hf_hub_cache()) if n.startswith("models--")],
    }
    return hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()


def catalog(root: Path) -> dict[str, dict[str, list[str]]]:
    """``{"models": {source: [spec, ...]}, "offline": {source: [spec, ...]}}`` of every registered source,
    from the memo under ``root`` when its fingerprint still holds, else from the registry (and memoised).

    Example:
        >>> "efficientnet-lite0" in catalog(cache_root())["models"]["efficientnet-lite"]  # doctest: +SKIP
        True
    """
    memo, key = root / MEMO, fingerprint()
    with contextlib.suppress(OSError, ValueError, AttributeError):
        doc: dict[str, Any] = json.loads(memo.read_text())
        out = {"models": doc["models"], "offline": doc["offline"]}
        lists = [v for part in out.values() for v in part.values()]
        if doc.get("fingerprint") == key and all(isinstance(n, str) for v in lists for n in v):
            return out
    from .backbones.registry import list_models, list_sources, offline_models  # imports torch

    out = {
        "models": {src: list_models("*", src) for src in list_sources()},
        "offline": {src: sorted(offline_models(src)) for src in list_sources()},
    }
    with contextlib.suppress(OSError):  # a read-only cache: list again next time
        root.mkdir(parents=True, exist_ok=True)
        write_json(memo, {"fingerprint": key, **out})
    return out
