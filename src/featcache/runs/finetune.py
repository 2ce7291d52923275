"""The ``featcache finetune`` job: cached-prefix partial fine-tuning, or the live loop when it must.

Cached-prefix mode (default when valid) takes the frozen prefix's output at the split point from the
feature cache and trains only the suffix: the same training, with the prefix computed once. With
random augmentation, or when nothing is frozen, it runs the live loop and says why.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader

from .._util import FeatcacheError, default_mode, resolve_device, unknown, write_json
from .._version import __version__
from ..backbones.registry import Backbone, BackboneCfg, load_backbone
from ..data.config import DataConfig
from ..data.preprocess import PreprocessedView, make_augment
from ..data.samples import SampleSet
from ..extract.build import extract, extract_views
from ..extract.config import ExtractConfig, Views
from ..extract.extractor import decode_workers, resolved_cfg
from ..train.config import TrainConfig
from ..train.fit import fit
from ..train.freeze import (
    FreezePlan,
    TrainableSpec,
    apply_train_mode,
    build_suffix,
    cached_prefix_reason,
    fold_linear_head,
    param_groups,
    plan_freeze,
    prefix_layer,
    replace_classifier,
)
from ..train.sources import BatchSource, ViewCycle, source_for
from .folder import check_resume, environment, load_head, prepare_run_dir, write_report
from .train import evaluate_splits

log = logging.getLogger(__name__)

MODES = ("auto", "cached", "live")


class ImageSource:
    """Images decoded and preprocessed on the fly, batched in the same order a seeded generator gives."""

    def __init__(
        self,
        samples: SampleSet,
        cfg: BackboneCfg,
        device: torch.device,
        workers: int = 0,
        augment: Any = None,
        on_bad_image: str = "error",
    ) -> None:
        self.on_bad_image = on_bad_image
        self.samples, self.cfg, self.device, self.workers, self.augment = (
            samples,
            cfg,
            device,
            workers,
            augment,
        )
        self.labels = torch.as_tensor(samples.labels)

    def __len__(self) -> int:
        return len(self.samples)

    def batches(
        self, batch_size: int, gen: torch.Generator | None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.randperm(len(self), generator=gen).tolist() if gen is not None else None
        view = PreprocessedView(self.samples, self.cfg, order, self.augment)
        loader = DataLoader(
            view, batch_size=batch_size, num_workers=self.workers, pin_memory=self.device.type == "cuda"
        )
        for x, idx, errors in loader:
            bad = [j for j, e in enumerate(errors) if e]
            if bad and self.on_bad_image == "error":
                raise FeatcacheError(
                    f"bad image during fine-tuning: {self.samples.describe(int(idx[bad[0]]))}: "
                    f"{errors[bad[0]]}; fix or remove it, or pass --on-bad-image skip"
                )
            if bad:  # skip: drop those rows, as extraction does
                keep = torch.as_tensor([j for j in range(len(errors)) if not errors[j]], dtype=torch.long)
                if not len(keep):
                    continue
                x, idx = x.index_select(0, keep), idx.index_select(0, keep)
            x = x.to(self.device, non_blocking=True)
            if self.device.type == "cuda":
                x = x.to(memory_format=torch.channels_last)
            yield x, self.labels[idx].to(self.device)


@dataclass(frozen=True)
class FinetuneConfig:
    """What ``featcache finetune`` does beyond the trainer's hyper-parameters.

    Example:
        >>> FinetuneConfig(train="last:1", lr_decay=0.5, augment="flip", views=4).views
        4

    ``views`` > 0 with ``augment`` caches that many augmented views of the frozen prefix's output
    and trains epoch ``e`` on view ``e mod views``: augmentation with the cached prefix, not live.
    """

    train: str = "head"
    bn: str = "frozen"
    lr_decay: float = 1.0
    augment: str | None = None
    mode: str = "auto"
    init_head: str | None = None
    views: int = 0

    def __post_init__(self) -> None:
        if self.views < 0:
            raise FeatcacheError(f"--views must be 0 or more, got {self.views}")
        if self.views and not self.augment:
            raise FeatcacheError(f"--views {self.views} needs --augment (what varies between the views)")
        if self.mode not in MODES:
            raise unknown("fine-tuning mode", self.mode, MODES, "Use --mode auto|cached|live.")
        TrainableSpec.parse(self.train)


@dataclass
class FinetuneRun:
    """A finished fine-tuning run: folder, config, metrics, the plan and the model."""

    dir: Path
    config: dict[str, Any]
    metrics: dict[str, Any]
    plan: FreezePlan
    model: nn.Module

    def history_rows(self) -> list[dict[str, float]]:
        """Per-epoch rows of the training history."""
        return list(self.metrics["history"])


def _init_classifier(model: nn.Module, plan: FreezePlan, run_dir: str) -> None:
    head, _ = load_head(run_dir)
    w, b = fold_linear_head(head)
    cls = model.get_submodule(plan.classifier)
    if not isinstance(cls, nn.Linear):  # replace_classifier put an nn.Linear there
        raise FeatcacheError(f"classifier {plan.classifier!r} is not nn.Linear; --init-head cannot fill it")
    if tuple(w.shape) != tuple(cls.weight.shape):
        raise FeatcacheError(
            f"--init-head {run_dir}: head weight {tuple(w.shape)} does not fit the classifier "
            f"{tuple(cls.weight.shape)}; train it on layer 'penultimate' with the same classes"
        )
    with torch.no_grad():
        cls.weight.copy_(w)
        cls.bias.copy_(b)


def trainable_state(model: nn.Module, plan: FreezePlan) -> dict[str, torch.Tensor]:
    """Parameters and buffers of the trainable region (what a fine-tuned checkpoint needs beyond the base)."""
    prefixes = tuple(f"{n}." for n in plan.train_modules)
    return {
        k: v.detach().cpu().contiguous()
        for k, v in model.state_dict().items()
        if k.startswith(prefixes) or (plan.split is None)
    }


def load_finetuned(run_dir: str | Path, weights: str | None = None) -> tuple[Backbone, dict[str, Any]]:
    """Rebuild a fine-tuned network from its run folder: base weights + new classifier + trained part.

    Args:
        run_dir: a folder written by :func:`finetune_run`.
        weights: the base weights (tag or file) when the run's own ``weights_arg`` cannot rebuild them.

    Example:
        >>> backbone, config = load_finetuned("runs/ft")  # doctest: +SKIP
        >>> backbone.model(x).shape  # doctest: +SKIP
    """
    run_dir = Path(run_dir)
    config: dict[str, Any] = json.loads((run_dir / "config.json").read_text())
    weights_arg = weights if weights is not None else config.get("weights_arg")
    size = config.get("extract", {}).get("input_size")
    backbone = load_backbone(config["model"], weights_arg, input_size=tuple(size) if size else None)
    if backbone.cfg.weights_id != config["backbone_cfg"]["weights_id"]:
        raise FeatcacheError(
            f"{config['model']} rebuilt with weights={weights_arg!r} is not the base that run "
            f"{str(run_dir)!r} was fine-tuned from; pass the weights tag or file it used"
        )
    plan = config["plan"]
    replace_classifier(backbone.model, plan["classifier"], len(config["classes"]))
    result = backbone.model.load_state_dict(load_file(str(run_dir / "trainable.safetensors")), strict=False)
    if result.unexpected_keys:
        raise FeatcacheError(
            f"trainable.safetensors of {str(run_dir)!r} does not fit {config['model']}: "
            f"{result.unexpected_keys[:5]}"
        )
    backbone.model.eval().requires_grad_(False)
    return backbone, config


def finetune_run(
    model: str,
    data: DataConfig,
    ft: FinetuneConfig,
    train_config: TrainConfig,
    extract_config: ExtractConfig,
    out_dir: str | Path,
    weights: str | None = None,
    cache_dir: str | None = None,
    progress: bool = True,
    resume: bool = False,
    overwrite: bool = False,
) -> FinetuneRun:
    """Freeze per ``ft.train``, train (cached prefix or live), evaluate, and write the run folder.

    Example:
        >>> run = finetune_run("torchvision:resnet18", DataConfig("digits"), FinetuneConfig(train="last:1"),
        ...                    TrainConfig(epochs=3), ExtractConfig(input_size=(32, 32)), "runs/ft",
        ...                    weights="none")  # doctest: +SKIP
    """
    out = prepare_run_dir(out_dir, resume, overwrite)
    defaults = {"pool": "avg", "dtype": "float32", "method": "auto"}
    ignored = [
        f"--{k} {getattr(extract_config, k)}" for k, v in defaults.items() if getattr(extract_config, k) != v
    ]
    if ignored:  # the cached prefix must be the exact activation: full maps, float32, hooks
        log.warning(
            "finetune ignores %s: the cached prefix is stored unpooled in float32", ", ".join(ignored)
        )
    device = resolve_device(train_config.device)
    backbone = load_backbone(model, weights, input_size=extract_config.input_size)
    splits = data.load()
    pre = resolved_cfg(backbone, extract_config)
    plan = plan_freeze(
        backbone,
        TrainableSpec.parse(ft.train),
        len(splits.classes),
        ft.bn,
        ft.lr_decay,
        pre.input_size,
        train_config.seed,
    )
    net = backbone.model
    if ft.init_head:
        _init_classifier(net, plan, ft.init_head)
    # Cached views make augmentation compatible with the cached prefix.
    augment_live = ft.augment if not ft.views else None
    reason = cached_prefix_reason(plan, net, augment_live) if ft.mode != "live" else "--mode live"
    suffix = None
    if reason is None:
        try:
            suffix = build_suffix(net, plan.split, plan)  # type: ignore[arg-type]
        except FeatcacheError as exc:
            reason = str(exc)
    if ft.mode == "cached" and reason is not None:
        raise FeatcacheError(f"--mode cached is not possible: {reason}")
    if ft.views and reason is not None:
        raise FeatcacheError(
            f"--views {ft.views} caches the frozen prefix's output, which this run cannot use ({reason}); "
            "drop --views to augment live"
        )
    mode = "cached-prefix" if suffix is not None else "live"
    msg = f"{mode} fine-tuning" + (f" (live because {reason})" if reason and ft.mode != "live" else "")
    trainable_pct = 100.0 * plan.trainable_params / max(1, plan.total_params)
    say = print if progress else log.info
    say(
        f"{msg}: training {plan.trainable_params:,} of {plan.total_params:,} parameters "
        f"({trainable_pct:.2f}%) "
        f"in {len(plan.trainable_modules)} modules; split at {plan.split}; BatchNorm {plan.bn}"
    )
    groups = param_groups(net, plan, train_config.lr)
    for g in groups:
        say(f"  lr {g['lr']:.3g}: {', '.join(g['modules'][:4])}{' ...' if len(g['modules']) > 4 else ''}")
    config = {
        "featcache_version": __version__,
        "kind": "finetune",
        "model": backbone.cfg.spec,
        "weights_arg": weights,
        "backbone_cfg": replace(backbone.cfg, classes=tuple(splits.classes)).to_dict(),
        "data": asdict(data),
        "finetune": asdict(ft),
        "plan": plan.to_dict(),
        "mode": mode,
        "mode_reason": reason,
        "train": asdict(train_config),
        "extract": {**asdict(extract_config), "layers": ["penultimate"]},
        "classes": splits.classes,
        "environment": environment(),
    }
    if resume:
        check_resume(
            out,
            config,
            ("plan", "train", "data", "extract", "finetune", "mode"),
            "the data, frozen set, BN policy, mode or trainer settings",
        )
    opt_groups = [{"params": g["params"], "lr": g["lr"]} for g in groups]
    if suffix is not None:
        layer = prefix_layer(plan)
        # The prefix runs under the same autocast as the live loop would (bf16 on CUDA, fp32 on CPU).
        train_amp = train_config.amp if train_config.amp is not None else device.type == "cuda"
        ecfg = replace(extract_config, pool="none", dtype="float32", amp=train_amp)
        budget = train_config.ram_budget_gb
        # With views the plain training prefix is never read: extract val/test only.
        feats = {
            name: extract(backbone, s, [layer], ecfg, cache_dir=cache_dir, split=name, progress=progress)
            for name, s in splits.items()
            if name != "train" or not ft.views
        }
        config["cache_keys"] = {k: v.key for k, v in feats.items()}
        src: dict[str, BatchSource] = {k: source_for(v, layer, device, budget) for k, v in feats.items()}
        if ft.views:
            spec = Views(ft.views, ft.augment or "")
            views = extract_views(
                backbone, splits.train, [layer], spec, ecfg, cache_dir=cache_dir, progress=progress
            )
            config["view_keys"] = [v.key for v in views]
            src["train"] = ViewCycle([source_for(v, layer, device, budget / ft.views) for v in views])
        trained: nn.Module = suffix.to(device)

        def mode_fn(m: nn.Module) -> None:
            m.train()
            apply_train_mode(net, plan)
    else:
        aug = make_augment(ft.augment, pre.input_size)
        src = {
            name: ImageSource(
                s,
                pre,
                device,
                decode_workers(extract_config.workers, device),
                aug if name == "train" else None,
                extract_config.on_bad_image,
            )
            for name, s in splits.items()
        }
        trained = net.to(device)
        if device.type == "cuda":  # NHWC convolutions are faster under bf16 autocast on recent GPUs
            trained.to(memory_format=torch.channels_last)  # type: ignore[call-overload]

        def mode_fn(m: nn.Module) -> None:
            apply_train_mode(m, plan)

    write_json(out / "config.json", config)
    result = fit(
        trained,
        src["train"],
        src.get("val"),
        len(splits.classes),
        train_config,
        progress,
        out / "checkpoint.pt",
        resume,
        param_groups=opt_groups,
        train_mode=mode_fn,
    )
    metrics = {**evaluate_splits(trained, result, src, len(splits.classes)), "mode": mode}
    save_file(trainable_state(net, plan), str(out / "trainable.safetensors"))
    default_mode(out / "trainable.safetensors")
    write_json(out / "metrics.json", metrics)
    write_report(out, metrics, splits.classes, f"{backbone.cfg.spec} · {ft.train} · {mode}")
    return FinetuneRun(out, config, metrics, plan, net)
