"""The run folder: config, metrics, the trained head and the report files of one run."""

from __future__ import annotations

import json
import platform
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .._util import FeatcacheError, default_mode, resolve_device, write_json
from .._version import __version__
from ..backbones.registry import Backbone, BackboneCfg
from ..cache.store import CachedFeatures
from ..data.config import DataConfig
from ..extract.config import ExtractConfig, Views
from ..train.fit import evaluate
from ..train.heads import Head, HeadInfo, check_input
from ..train.sources import source_for
from .report import plot_confusion, plot_curves


@dataclass
class Run:
    """A finished (or loaded) run: its folder, config, metrics and trained head."""

    dir: Path
    config: dict[str, Any]
    metrics: dict[str, Any]
    head: Head
    head_info: HeadInfo

    @property
    def backbone_cfg(self) -> BackboneCfg:
        return BackboneCfg.from_dict(self.config["backbone_cfg"])

    @property
    def classes(self) -> list[str]:
        return list(self.config["classes"])

    @property
    def layer(self) -> str:
        return str(self.config["layer"])

    def extract_config(self) -> ExtractConfig:
        """The extraction settings the head was trained on."""
        # layers and views are the run's, not the extraction settings'
        d = {k: v for k, v in self.config["extract"].items() if k not in ("layers", "augment", "views")}
        d["input_size"] = tuple(d["input_size"]) if d.get("input_size") else None
        return ExtractConfig(**d)

    def evaluate(self, cached: CachedFeatures, device: str = "auto") -> dict[str, Any]:
        """Evaluate the trained head on cached features of the same layer (e.g. another split)."""
        dev = resolve_device(device)
        data = source_for(cached, self.layer, dev)
        check_input(self.head_info.in_shape, data.row_shape)
        return evaluate(self.head.to(dev), data, self.head_info.num_classes)


def environment() -> dict[str, Any]:
    """Versions and hardware, recorded with every run and benchmark."""
    env = {
        "featcache": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        import torchvision

        env["torchvision"] = torchvision.__version__
    except ImportError:  # pragma: no cover
        pass
    return env


def save_head(head: nn.Module, info: HeadInfo, out_dir: Path) -> None:
    """``head.safetensors`` (tensors only) + ``head.json`` (how to rebuild it)."""
    state = {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
    save_file(state, str(out_dir / "head.safetensors"))
    default_mode(out_dir / "head.safetensors")
    write_json(out_dir / "head.json", info.to_dict())


def load_head(run_dir: str | Path) -> tuple[Head, HeadInfo]:
    """Rebuild a head saved by :func:`save_head` (no pickle)."""
    run_dir = Path(run_dir)
    if not (run_dir / "head.json").is_file():
        raise FileNotFoundError(f"{str(run_dir)!r} is not a featcache run folder (no head.json)")
    info = HeadInfo.from_dict(json.loads((run_dir / "head.json").read_text()))
    head = info.build()
    head.load_state_dict(load_file(str(run_dir / "head.safetensors")))
    return head.eval(), info


def load_run(run_dir: str | Path) -> Run:
    """Load a run folder: config, metrics and the trained head.

    Example:
        >>> run = load_run("runs/mnist")  # doctest: +SKIP
        >>> run.metrics["test"]["acc"]  # doctest: +SKIP
    """
    run_dir = Path(run_dir)
    head, info = load_head(run_dir)
    config = json.loads((run_dir / "config.json").read_text())
    metrics_file = run_dir / "metrics.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.exists() else {}
    return Run(run_dir, config, metrics, head, info)


def prepare_run_dir(out_dir: str | Path, resume: bool, overwrite: bool = False) -> Path:
    """Create the run folder; with ``resume`` it must already hold a run, without it (or ``overwrite``)
    it must not hold one that trained (a checkpoint or metrics), so no finished run is lost."""
    out = Path(out_dir)
    if resume and not (out / "config.json").exists():
        raise FileNotFoundError(f"--resume {str(out)!r}: no run there to resume (config.json missing)")
    trained = [f for f in ("metrics.json", "checkpoint.pt") if (out / f).exists()]
    if trained and not (resume or overwrite):
        raise FeatcacheError(
            f"--out {str(out)!r} already holds a run ({', '.join(trained)}): pass --resume to continue it, "
            "--overwrite to replace it, or choose another --out"
        )
    out.mkdir(parents=True, exist_ok=True)
    return out


def check_resume(out: Path, config: dict[str, Any], keys: tuple[str, ...], what: str) -> None:
    """Refuse to resume a run whose saved ``keys`` of config.json differ from this command's."""
    old, new = json.loads((out / "config.json").read_text()), json.loads(json.dumps(config))

    def same(a: Any, b: Any) -> bool:
        # The fast paths change the speed, not the training; a setting an older config lacks did not
        # exist then, so it was off: absent equals None / 0 / False.
        if not (isinstance(a, dict) and isinstance(b, dict)):
            return bool(a == b)
        off = (None, 0, False)
        return all(
            a[k] == b[k] if k in a and k in b else (a if k in a else b)[k] in off
            for k in set(a) | set(b)
            if k != "fast_paths"
        )

    changed = [k for k in keys if not same(old.get(k), new.get(k))]
    if changed:
        diffs = []
        for k in changed:
            a, b = old.get(k), new.get(k)
            if isinstance(a, dict) and isinstance(b, dict):
                diffs += [
                    f"{k}.{f}: {a.get(f)!r} -> {b.get(f)!r}"
                    for f in sorted(set(a) | set(b))
                    if a.get(f) != b.get(f)
                ]
            else:
                diffs.append(f"{k}: {a!r} -> {b!r}")
        raise FeatcacheError(
            f"--resume {out}: {what} differ from the run's config.json ({'; '.join(diffs[:6])}); resume "
            "with the run's own settings, or start a new run (another --out, or --overwrite)"
        )


def run_config(
    backbone: Backbone,
    weights: str | None,
    data: DataConfig,
    layer: str,
    extract_config: ExtractConfig,
    feats: Mapping[str, CachedFeatures],
    views: Views | None = None,
) -> dict[str, Any]:
    """The part of ``config.json`` every head run shares: what to rebuild, reload and export it from.

    Example:
        >>> config = run_config(bb, None, data, "penultimate", ecfg, feats)  # doctest: +SKIP
        >>> config["cache_keys"]["train"][:12]  # doctest: +SKIP
    """
    return {
        "featcache_version": __version__,
        "model": backbone.cfg.spec,
        "weights": backbone.cfg.weights,
        "weights_arg": weights,
        "backbone_cfg": backbone.cfg.to_dict(),
        "data": asdict(data),
        "layer": layer,
        "extract": {
            **asdict(extract_config),
            "layers": [layer],
            "augment": views.augment if views else None,
            "views": views.count if views else 0,
        },
        "cache_keys": {k: v.key for k, v in feats.items()},
        "split_keys": {k: v.split_key for k, v in feats.items()},
        "classes": feats["train"].classes,
        "environment": environment(),
    }


def write_report(out: Path, metrics: dict[str, Any], classes: list[str], title: str) -> None:
    """``curves.png`` and (when there is a test split) ``confusion.png``."""
    plot_curves(metrics, out / "curves.png", title)
    if "test" in metrics:
        plot_confusion(metrics["test"]["confusion"], classes, out / "confusion.png")
