"""The ``featcache finetune`` job: cached-prefix partial fine-tuning, or the live loop when it must.

Cached-prefix mode (default when valid) takes the frozen prefix's output at the split point from the
feature cache and trains only the suffix: the same training, with the prefix computed once. With
random augmentation, or when nothing is frozen, it runs the live loop and says why.

Every task trains: the new classifier learns with the task's loss (softmax cross-entropy, sigmoid BCE,
MSE/Huber on standardised targets whose scale is folded into it after training), and the run is
scored and reported as ``train``'s runs are.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from .._util import FeatcacheError, resolve_device
from ..backbones.registry import Backbone, BackboneCfg
from ..data.datasets import DatasetSplits
from ..data.preprocess import make_augment
from ..extraction.build import bad_images_error, extract, extract_views
from ..extraction.config import ExtractConfig, Views
from ..extraction.extractor import decode_workers
from ..train.fit import FitResult, TrainingInterrupted, fit, predict_logits
from ..train.freeze import (
    FreezePlan,
    Suffix,
    TrainableSpec,
    apply_train_mode,
    build_suffix,
    cached_prefix_reason,
    fold_linear_head,
    param_groups,
    plan_freeze,
    prefix_layer,
)
from ..train.heads import TargetScale
from ..train.objectives import best_threshold
from ..train.sources import BatchSource, ImageSource, ViewCycle, source_for
from .config import MODES, FinetuneConfig  # noqa: F401  (defined there, without torch)
from .contents import DATASET, check_same_data, split_contents
from .folder import Run, RunFolder
from .job import Job
from .logger import epoch_log
from .record import FinetunePart
from .spec import RunSpec
from .train import evaluate_splits, sigmoid_probs, standardised_targets

log = logging.getLogger(__name__)


def _bad_images(job: Job) -> None:
    """Every unreadable image, found by one look at the headers before any training: named in one
    error (``--on-bad-image error``), or said and listed in ``skipped.csv`` (``skip``: the loop leaves
    them out)."""
    spec = job.spec
    found = {n: (s, s.problems(range(len(s)), spec.progress)) for n, s in job.splits.items()}
    found = {n: v for n, v in found.items() if v[1]}
    if found and spec.extract.on_bad_image == "error":
        raise bad_images_error(found)
    rows = [
        {"split": n, "id": s.ids[i], "reason": why} for n, (s, bad) in found.items() for i, why in bad.items()
    ]
    job.note_skipped(rows)


def _init_classifier(model: nn.Module, plan: FreezePlan, run_dir: str) -> None:
    head, _ = RunFolder(run_dir).load_head()
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


def finetune_run(spec: RunSpec, ft: FinetuneConfig | None = None) -> Run:
    """Freeze per ``ft.train``, train (cached prefix or live), evaluate, and write the run folder.

    Example:
        >>> spec = RunSpec("torchvision:resnet18", DataConfig("digits"), out="runs/ft", weights="none",
        ...                extract=ExtractConfig(input_size=(32, 32)), train=TrainConfig(epochs=3))
        >>> run = finetune_run(spec, FinetuneConfig(train="last:1"))  # doctest: +SKIP
    """
    ft = ft or FinetuneConfig()
    if spec.views is not None:
        raise FeatcacheError(
            "finetune caches views of the frozen prefix: pass FinetuneConfig(views=K, augment=...) "
            "(--views K --augment ...), not RunSpec.views"
        )
    _warn_ignored(spec.extract)
    device = resolve_device(spec.train.device)
    job = Job.open(spec, "finetune")
    folder, backbone, splits = job.run_folder, job.backbone, job.splits
    task = splits.task
    if task == "regress" and ft.init_head:  # a trained regression head outputs values, not z-scores
        raise FeatcacheError(
            f"--init-head {ft.init_head}: a regression network trains its new classifier on standardised "
            "targets, which a trained regression head's weights do not predict; leave out --init-head"
        )
    job.announce(f"trains {ft.train}, BatchNorm {ft.bn}", spec.train)
    _bad_images(job)
    job.record_splits()
    contents = split_contents(splits, spec.cache_dir, spec.progress)
    spec = replace(spec, train=spec.train.resolved(len(splits.train)))  # the batch size it trains with
    pre = backbone.cfg
    plan = plan_freeze(
        backbone,
        TrainableSpec.parse(ft.train),
        len(splits.classes),
        ft.bn,
        ft.lr_decay,
        pre.input_size,
        spec.train.seed,
    )
    net = backbone.model
    if ft.init_head:
        _init_classifier(net, plan, ft.init_head)
    suffix, mode, reason = _choose_mode(plan, net, ft)
    groups = param_groups(net, plan, spec.train.lr)
    _say_plan(plan, groups, mode, reason, ft, spec.progress)
    record = job.record(
        "finetune", replace(backbone, cfg=replace(backbone.cfg, classes=tuple(splits.classes))), {},
        ["penultimate"], classes=splits.classes, train=spec.train,
        part=FinetunePart(ft, plan, mode, reason, contents),  # type: ignore[arg-type]
    )  # fmt: skip
    record = replace(record, task=task, split_keys={k: v["key"] for k, v in contents.items() if k != DATASET})
    if spec.resume:
        check_same_data(folder.path, contents)
        what = "the data, frozen set, BN policy, mode or trainer settings"
        folder.check_resume(record, ("plan", "train", "data", "extract", "finetune", "mode"), what)
    if suffix is not None:
        src, trained, mode_fn, keys = _cached_prefix(spec, backbone, splits, plan, suffix, ft, device)
        record = replace(record, cache_keys=keys[0], view_keys=tuple(keys[1]))
    else:
        src, trained, mode_fn = _live(spec, splits, net, plan, pre, ft, device)
    folder.write_config(record)
    result, scale = _fit_network(spec, folder, trained, src, groups, mode_fn, len(splits.classes), task)
    if scale is not None:
        fold_target_scale(net.get_submodule(plan.classifier), scale)
    threshold = _threshold(trained, src.get("val")) if task == "multilabel" else None
    metrics = replace(
        evaluate_splits(
            trained, result, src, len(splits.classes), names=splits.classes, task=task, threshold=threshold
        ),
        mode=mode,
        threshold=threshold,
    )
    folder.save_trainable(trainable_state(net, plan))
    folder.write_metrics(metrics)
    folder.write_report(metrics, splits.classes, f"{backbone.cfg.spec} · {ft.train} · {mode}")
    _write_mistakes(folder, trained, src, splits)
    if not result.finished:
        raise TrainingInterrupted(result, folder.unfinished("finetune"))
    return Run(folder.path, record, metrics, net)


def _fit_network(
    spec: RunSpec,
    folder: RunFolder,
    trained: nn.Module,
    src: dict[str, Any],
    groups: list[dict[str, Any]],
    mode_fn: Callable[[nn.Module], None],
    num_classes: int,
    task: str,
) -> tuple[FitResult, TargetScale | None]:
    """Train the network with ``--logger``'s live log (Ctrl-C keeps the finished epochs); a regression
    network learns standardised targets, as ``train``'s heads do, and the scale is returned so that it
    is folded into the new classifier afterwards (the network and its export then output the targets'
    units)."""
    opt_groups = [{"params": g["params"], "lr": g["lr"]} for g in groups]
    scale = TargetScale.fit(torch.as_tensor(src["train"].y).float().cpu()) if task == "regress" else None
    with epoch_log(spec.logger, folder.path) as on_epoch:
        try:
            with standardised_targets(scale, src["train"], src.get("val")):
                result = fit(
                    trained,
                    src["train"],
                    src.get("val"),
                    num_classes,
                    spec.train,
                    spec.progress,
                    folder.checkpoint,
                    spec.resume,
                    param_groups=opt_groups,
                    train_mode=mode_fn,
                    on_epoch=on_epoch,
                    task=task,
                )
        except TrainingInterrupted as stop:  # Ctrl-C: the finished epochs still make a (unfinished) run
            result = stop.result
        if on_epoch is not None:  # a resumed run that had finished trains no epoch: its log is written here
            on_epoch(result.history)
    return result, scale


def fold_target_scale(classifier: nn.Module, scale: TargetScale) -> None:
    """Fold ``z * std + mean`` into the new classifier (an ``nn.Linear`` ending the network): its outputs
    become the targets' values. Applied once, after training (a resumed finished run reloads the
    trained, unfolded weights first).

    Example:
        >>> fc = nn.Linear(3, 1)
        >>> fold_target_scale(fc, TargetScale(torch.tensor([5.0]), torch.tensor([2.0])))
    """
    if not isinstance(classifier, nn.Linear):
        raise FeatcacheError(f"the new classifier is a {type(classifier).__name__}, not nn.Linear")
    with torch.no_grad():
        std, mean = scale.std.to(classifier.weight), scale.mean.to(classifier.weight)
        classifier.weight.mul_(std[:, None])
        classifier.bias.mul_(std).add_(mean)


def _threshold(trained: nn.Module, val: BatchSource | None) -> float:
    """A multi-label network's probability threshold: the best micro F1 on val (0.5 without val)."""
    if val is None or not len(val) or val.y is None:
        return 0.5
    return best_threshold(sigmoid_probs(trained, val), val.y.cpu().numpy())


def _write_mistakes(
    folder: RunFolder, trained: nn.Module, src: dict[str, BatchSource], splits: DatasetSplits
) -> None:
    """``misclassified.csv`` (and ``top_losses.png``) of the test split, else val; for a multi-label or
    regression set its ``predictions.csv`` (and scatter plot), as ``train`` writes them."""
    test = next(((n, s) for n, s in (("test", splits.test), ("val", splits.val)) if s is not None), None)
    if test is None:
        return
    out = predict_logits(trained, src[test[0]])
    labels = torch.as_tensor(test[1].labels)
    if splits.task != "classify":
        folder.write_task_report(splits.task, test[0], test[1].ids, labels, out, splits.classes)
    else:
        folder.write_misclassified(test[0], test[1].ids, labels, out, splits.classes, test[1])


def _warn_ignored(extract_config: ExtractConfig) -> None:
    """The cached prefix must be the exact activation: full maps, float32, hooks."""
    defaults = {"pool": "avg", "dtype": "float32", "method": "auto"}
    ignored = [
        f"--{k} {getattr(extract_config, k)}" for k, v in defaults.items() if getattr(extract_config, k) != v
    ]
    if ignored:
        log.warning(
            "finetune ignores %s: the cached prefix is stored unpooled in float32", ", ".join(ignored)
        )


def _choose_mode(
    plan: FreezePlan, net: nn.Module, ft: FinetuneConfig
) -> tuple[Suffix | None, str, str | None]:
    """The trainable suffix when the cached prefix can serve (else None), the mode, and why it is live."""
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
    return suffix, "cached-prefix" if suffix is not None else "live", reason


def _say_plan(
    plan: FreezePlan,
    groups: list[dict[str, Any]],
    mode: str,
    reason: str | None,
    ft: FinetuneConfig,
    progress: bool,
) -> None:
    msg = f"{mode} fine-tuning" + (f" (live because {reason})" if reason and ft.mode != "live" else "")
    trainable_pct = 100.0 * plan.trainable_params / max(1, plan.total_params)
    say = print if progress else log.info
    say(
        f"{msg}: training {plan.trainable_params:,} of {plan.total_params:,} parameters "
        f"({trainable_pct:.2f}%) in {len(plan.trainable_modules)} modules; split at {plan.split}; "
        f"BatchNorm {plan.bn}"
    )
    for g in groups:
        say(f"  lr {g['lr']:.3g}: {', '.join(g['modules'][:4])}{' ...' if len(g['modules']) > 4 else ''}")


def _cached_prefix(
    spec: RunSpec,
    backbone: Backbone,
    splits: DatasetSplits,
    plan: FreezePlan,
    suffix: Suffix,
    ft: FinetuneConfig,
    device: torch.device,
) -> tuple[dict[str, BatchSource], nn.Module, Callable[[nn.Module], None], tuple[dict[str, str], list[str]]]:
    """Sources of the frozen prefix's cached output, the suffix to train, its train mode, the cache keys."""
    layer = prefix_layer(plan)
    # The prefix runs under the same autocast as the live loop would (bf16 on CUDA, fp32 on CPU).
    train_amp = spec.train.amp if spec.train.amp is not None else device.type == "cuda"
    ecfg = replace(spec.extract, pool="none", dtype="float32", amp=train_amp)
    budget = spec.train.ram_budget_gb
    kw: dict[str, Any] = {"cache_dir": spec.cache_dir, "progress": spec.progress}
    # With views the plain training prefix is never read: extract val/test only.
    feats = {
        name: extract(backbone, s, [layer], ecfg, split=name, **kw)
        for name, s in splits.items()
        if name != "train" or not ft.views
    }
    src: dict[str, BatchSource] = {k: source_for(v, layer, device, budget) for k, v in feats.items()}
    view_keys: list[str] = []
    if ft.views:
        views = extract_views(backbone, splits.train, [layer], Views(ft.views, ft.augment or ""), ecfg, **kw)
        view_keys = [v.key for v in views]
        src["train"] = ViewCycle([source_for(v, layer, device, budget / ft.views) for v in views])

    def mode_fn(m: nn.Module) -> None:
        m.train()
        apply_train_mode(backbone.model, plan)

    return src, suffix.to(device), mode_fn, ({k: v.key for k, v in feats.items()}, view_keys)


def _live(
    spec: RunSpec,
    splits: DatasetSplits,
    net: nn.Module,
    plan: FreezePlan,
    pre: BackboneCfg,
    ft: FinetuneConfig,
    device: torch.device,
) -> tuple[dict[str, BatchSource], nn.Module, Callable[[nn.Module], None]]:
    """Sources of decoded images (augmented for train), the whole network to train, its train mode."""
    aug = make_augment(ft.augment, pre.input_size)
    workers = decode_workers(spec.extract.workers, device)
    src: dict[str, BatchSource] = {
        name: ImageSource(
            s, pre, device, workers, aug if name == "train" else None, spec.extract.on_bad_image
        )
        for name, s in splits.items()
    }
    trained = net.to(device)
    if device.type == "cuda":  # NHWC convolutions are faster under bf16 autocast on recent GPUs
        trained.to(memory_format=torch.channels_last)  # type: ignore[call-overload]

    def mode_fn(m: nn.Module) -> None:
        apply_train_mode(m, plan)

    return src, trained, mode_fn
