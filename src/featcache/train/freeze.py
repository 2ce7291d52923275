"""Freeze / unfreeze strategies, discriminative learning rates, BatchNorm policy, and the cached prefix.

A trainable-part spec says what trains (the rest is frozen)::

    head            only a new classifier (``model.fc = nn.Linear(512, C)`` style)
    last:N          the last N blocks + everything after them + the new classifier
    from:LAYER      everything from a named module on (in execution order)
    all             everything (full fine-tuning)
    modules:a,b     the named modules (and their children) + the new classifier

A *block* is what :func:`~featcache.backbones.layers.block_names` lists. When the frozen part is a
prefix of the network and nothing random happens before the split, the prefix's output is cached and
only the suffix runs each epoch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import fx, nn

from .._util import FeatcacheError, unknown
from ..backbones.layers import INPUT_PREFIX, block_names, dummy_input, timm_notrace
from ..backbones.registry import Backbone
from .config import TrainableSpec
from .heads import Head, Standardize

BN_POLICIES = ("frozen", "train")
_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def execution_order(model: nn.Module, x: torch.Tensor) -> dict[str, int]:
    """Module name -> index of its first call in one forward pass (modules never called are absent)."""
    order: dict[str, int] = {}

    def note(name: str) -> None:  # a pre-hook must return None, or it replaces the input
        order.setdefault(name, len(order))

    handles = [
        m.register_forward_pre_hook(lambda _m, _i, n=n: note(n)) for n, m in model.named_modules() if n
    ]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return order


def replace_classifier(model: nn.Module, name: str, num_classes: int, seed: int = 0) -> nn.Linear:
    """Put a new ``nn.Linear(in_features, num_classes)`` where the classifier ``name`` was (seeded init)."""
    old = model.get_submodule(name)
    if not isinstance(old, nn.Linear):
        raise FeatcacheError(
            f"classifier {name!r} is a {type(old).__name__}, not nn.Linear; use a spec with a linear head"
        )
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)  # CPU only: leaves the CUDA generators alone
        new = nn.Linear(old.in_features, num_classes).to(old.weight.device)
    parent_name, _, last = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, last, new)
    return new


@dataclass(frozen=True)
class FreezePlan:
    """What trains: saved in the run and re-applied identically on resume.

    Attributes:
        spec: the trainable-part spec.
        bn: BatchNorm policy, ``frozen`` (eval mode, running stats fixed) or ``train``.
        classifier: module name of the new classifier.
        split: first module of the trainable part in execution order (None for ``all``).
        train_modules: every module in the trainable region (set to train mode each epoch).
        trainable_modules: modules owning trainable parameters.
        trainable_params: number of trainable parameters.
        total_params: number of parameters.
        groups: (module names, lr multiplier) per optimizer group, the classifier first.
    """

    spec: str
    bn: str
    classifier: str
    split: str | None
    train_modules: tuple[str, ...]
    trainable_modules: tuple[str, ...]
    trainable_params: int
    total_params: int
    groups: tuple[tuple[tuple[str, ...], float], ...]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["groups"] = [{"modules": list(m), "lr_mult": f} for m, f in self.groups]
        return d


def plan_freeze(
    backbone: Backbone,
    spec: TrainableSpec,
    num_classes: int,
    bn: str = "frozen",
    lr_decay: float = 1.0,
    input_size: tuple[int, int] | None = None,
    seed: int = 0,
) -> FreezePlan:
    """Replace the classifier, freeze all but the trainable part, and return the plan (in place).

    Example:
        >>> bb = load_backbone("torchvision:resnet18", weights="none")  # doctest: +SKIP
        >>> plan = plan_freeze(bb, TrainableSpec("head"), 3)  # doctest: +SKIP
        >>> plan.trainable_params  # 512 * 3 + 3
        1539
    """
    if bn not in BN_POLICIES:
        raise unknown("BatchNorm policy", bn, BN_POLICIES, "Use --bn frozen|train.")
    model, cls = backbone.model, backbone.cfg.classifier
    if not cls:
        raise FeatcacheError(
            f"{backbone.cfg.spec} has no classifier module to replace; fine-tuning needs one"
        )
    if not isinstance(cls, str):
        raise FeatcacheError(
            f"{backbone.cfg.spec} has {len(cls)} classifier heads {list(cls)} (a distilled model); "
            "fine-tuning replaces one classifier: train a head on its cached features instead"
        )
    model.requires_grad_(False)
    replace_classifier(model, cls, num_classes, seed)
    order = execution_order(model.eval(), dummy_input(backbone, input_size))
    names = [n for n in order if n]
    blocks = [b for b in block_names(model, cls) if b in order]
    if spec.kind == "head":
        split: str | None = cls
    elif spec.kind == "last":
        if spec.n > len(blocks):
            raise FeatcacheError(
                f"last:{spec.n} asks for more blocks than the {len(blocks)} of {backbone.cfg.spec}: {blocks}"
            )
        split = blocks[-spec.n]
    elif spec.kind == "from":
        split = spec.names[0]
        if split not in order:
            raise unknown("layer", split, names, f"Run `featcache layers {backbone.cfg.spec}` to list them.")
    elif spec.kind == "modules":
        for n in spec.names:
            if n not in order:
                raise unknown("module", n, names, f"Run `featcache layers {backbone.cfg.spec}` to list them.")
        split = min((*spec.names, cls), key=lambda n: order[n])
    else:
        split = None
    if spec.kind == "modules":
        region = [n for n in names if any(n == m or n.startswith(m + ".") for m in (*spec.names, cls))]
    elif split is None:
        region = names
    else:
        ancestors = {split.rsplit(".", i)[0] for i in range(split.count(".") + 1)} - {split}
        region = [n for n in names if order[n] >= order[split] and n not in ancestors]
    mods = dict(model.named_modules())
    trainable = []
    for n in region:
        params = list(mods[n].parameters(recurse=False))
        if params:
            trainable.append(n)
            for p in params:
                p.requires_grad_(True)
    if split is None:
        for p in model.parameters(recurse=False):
            p.requires_grad_(True)
    starts = [order[b] for b in blocks]

    def group_of(name: str) -> int:
        if name == cls or name.startswith(cls + "."):
            return 0
        return 1 + sum(1 for s in starts if s > order[name])

    groups: dict[int, list[str]] = {}
    for n in trainable:
        groups.setdefault(group_of(n), []).append(n)
    total = sum(p.numel() for p in model.parameters())
    return FreezePlan(
        spec=str(spec),
        bn=bn,
        classifier=cls,
        split=split if spec.kind != "all" else None,
        train_modules=tuple(region),
        trainable_modules=tuple(trainable),
        trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
        total_params=total,
        groups=tuple((tuple(groups[k]), lr_decay**k) for k in sorted(groups)),
    )


def param_groups(model: nn.Module, plan: FreezePlan, lr: float) -> list[dict[str, Any]]:
    """Optimizer groups: the classifier at ``lr``, earlier groups at ``lr * lr_decay**k``."""
    mods = dict(model.named_modules())
    out: list[dict[str, Any]] = []
    for names, mult in plan.groups:
        params = [p for n in names for p in mods[n].parameters(recurse=False) if p.requires_grad]
        out.append({"params": params, "lr": lr * mult, "modules": list(names)})
    if plan.split is None:
        root = [p for p in model.parameters(recurse=False) if p.requires_grad]
        if root:
            out[-1]["params"] = out[-1]["params"] + root
    return out


def apply_train_mode(model: nn.Module, plan: FreezePlan) -> None:
    """Frozen part in eval mode; the trainable region in train mode; BatchNorm per ``plan.bn``."""
    model.eval()
    mods = dict(model.named_modules())
    for n in plan.train_modules:
        mods[n].train()
    if plan.bn == "frozen":
        for m in model.modules():
            if isinstance(m, _BN):
                m.eval()


class _SplitTracer(fx.Tracer):
    def __init__(self, leaf: str) -> None:
        self.leaf_types, functions = timm_notrace()
        super().__init__(autowrap_functions=functions)
        self.leaf = leaf

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if qualname == self.leaf or isinstance(m, self.leaf_types):
            return True
        return super().is_leaf_module(m, qualname)


class Suffix(nn.Module):
    """The network from a split module on, fed with the cached input of that module.

    Holds a train-mode and an eval-mode graph (traced Python conditions on ``self.training`` differ)
    that share the original model's submodules: training the suffix trains the model.
    """

    def __init__(self, train_graph: fx.GraphModule, eval_graph: fx.GraphModule) -> None:
        super().__init__()
        self.train_graph, self.eval_graph = train_graph, eval_graph

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.train_graph if self.training else self.eval_graph)(x)


def _suffix_graph(model: nn.Module, split: str) -> fx.GraphModule:
    graph = _SplitTracer(split).trace(model)
    nodes = list(graph.nodes)
    at = next((i for i, n in enumerate(nodes) if n.op == "call_module" and n.target == split), None)
    if at is None:
        raise FeatcacheError(f"module {split!r} does not appear in the traced graph")
    split_node = nodes[at]
    before = set(nodes[:at])
    if len(split_node.args) != 1 or split_node.kwargs:
        raise FeatcacheError(f"module {split!r} takes more than one input")
    (x_in,) = split_node.args
    if not isinstance(x_in, fx.Node):  # a constant: nothing computed before the split reaches it
        raise FeatcacheError(f"module {split!r} takes a constant, not the output of an earlier layer")
    new = fx.Graph()
    env: dict[fx.Node, fx.Node] = {x_in: new.placeholder("x")}
    for node in nodes[at:]:
        for arg in node.all_input_nodes:
            if arg in before and arg is not x_in and arg.op != "get_attr":
                raise FeatcacheError(
                    f"node {node.name} after {split!r} reads {arg.name} from before it (a skip "
                    "connection across the split)"
                )
            if arg.op == "get_attr" and arg not in env:
                env[arg] = new.node_copy(arg, lambda a: env[a])
        env[node] = new.node_copy(node, lambda a: env[a])
    new.lint()
    return fx.GraphModule(model, new)


def build_suffix(model: nn.Module, split: str, plan: FreezePlan | None = None) -> Suffix:
    """Trace the part of ``model`` from module ``split`` on; raises FeatcacheError saying why it cannot.

    The train graph is traced in the modes the live loop trains in (``apply_train_mode(model, plan)``;
    all-train without a plan): tracing bakes ``self.training`` checks in the forward code of the
    modules that contain the split — timm's classifier dropout, switched by the root's flag, is one —
    so they must see the flags the live loop would.

    Example:
        >>> suffix = build_suffix(resnet, "layer4.1", plan)  # doctest: +SKIP
        >>> suffix(cached_input_of_layer4_1).shape  # doctest: +SKIP
    """
    modes = {m: m.training for m in model.modules()}
    try:
        graphs = []
        for training in (True, False):
            if training and plan is not None:
                apply_train_mode(model, plan)
            else:
                model.train(training)
            graphs.append(_suffix_graph(model, split))
    except FeatcacheError:
        raise
    except Exception as exc:
        raise FeatcacheError(
            f"torch.fx cannot trace {type(model).__name__} ({type(exc).__name__}: {exc})"
        ) from exc
    finally:
        for m, training in modes.items():
            m.training = training
    return Suffix(*graphs)


def cached_prefix_reason(plan: FreezePlan, model: nn.Module, augment: str | None) -> str | None:
    """Why the cached-prefix path cannot be used (None when it can)."""
    if augment:
        return f"random augmentation ({augment}) changes the frozen prefix's input every epoch"
    if plan.split is None:
        return "everything trains (all): there is no frozen prefix"
    region = set(plan.train_modules)
    for n, m in model.named_modules():
        if (
            isinstance(m, _BN)
            and plan.bn == "train"
            and n not in region
            and any(p.requires_grad for p in m.parameters())
        ):
            return f"BatchNorm {n} before the split trains"
    return None


def prefix_layer(plan: FreezePlan) -> str:
    """The cache layer holding the frozen prefix's output: the input of the split module."""
    if plan.split is None:
        raise FeatcacheError(f"{plan.spec}: nothing is frozen, so there is no prefix to cache")
    return f"{INPUT_PREFIX}{plan.split}"


def fold_linear_head(head: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) of a trained ``linear`` head with its standardisation folded in."""

    if not isinstance(head, Head) or not isinstance(head.body, nn.Sequential):
        raise FeatcacheError("--init-head needs a run trained with --head linear")
    linear = [m for m in head.body if isinstance(m, nn.Linear)]
    if len(linear) != 1:
        raise FeatcacheError("--init-head needs a run trained with --head linear")
    w, b = linear[0].weight.detach().clone(), linear[0].bias.detach().clone()
    if isinstance(head.standardize, Standardize):
        mean, std = head.standardize.mean.flatten(), head.standardize.std.flatten()
        w = w / std
        b = b - w @ mean
    return w, b
