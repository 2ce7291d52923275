"""The ``featcache probe`` job: build or reuse the cache, run the linear probe
(:mod:`featcache.train.probe`: the path on train, the strength on val, the refit on train + val, test
once), and write a run folder.
"""

from __future__ import annotations

from .._util import FeatcacheError, resolve_device
from ..extraction.config import DEFAULT_LAYER
from ..train.probe import few_shot, linear_probe
from ..train.sources import source_for
from ..train.target_probes import probe_task
from .config import ProbeConfig
from .folder import Run
from .job import Job
from .metrics import Metrics
from .record import ProbePart
from .report import most_confused
from .spec import RunSpec
from .train import write_mistakes


def probe_run(spec: RunSpec, layer: str = DEFAULT_LAYER, config: ProbeConfig | None = None) -> Run:
    """The ``featcache probe`` job: cache (build or reuse), probe, and write a run folder if ``spec.out``.

    The folder is a run like ``featcache train``'s (``config.json``, ``metrics.json`` with the path,
    ``head.safetensors``, ``confusion.png``), so :func:`~featcache.runs.load_run`, ``export`` and
    ``predict`` take it; the :class:`~featcache.runs.folder.Run` returned is what ``load_run`` reads
    back (``dir`` None without ``spec.out``). The probe runs on ``spec.train.device``.

    Example:
        >>> spec = RunSpec("efficientnet-lite0", DataConfig("mnist-5k"), out="runs/probe",
        ...                extract=ExtractConfig(input_size=(64, 64)))
        >>> run = probe_run(spec, "penultimate")  # doctest: +SKIP
        >>> run.metrics.strength, run.metrics.test.acc  # doctest: +SKIP
    """
    config = config or ProbeConfig()
    spec.no_resume("probe")
    job = Job.open(spec, "probe", layer, folder=None, one_layer=True)
    folder, backbone, layer, splits = job.folder, job.backbone, job.layer, job.splits
    strengths = ", ".join(f"{s:g}" for s in config.strengths)
    what = (
        f"layer {layer}, L2 strengths {strengths} (L-BFGS: full batch in RAM, by blocks over the RAM budget)"
    )
    job.announce(what, None)
    feats, _ = job.extract_all()
    job.note_data(feats)
    if "val" not in feats:
        raise FeatcacheError(
            "the probe needs a validation split: use --val-fraction > 0 (DataConfig(val_fraction=...)) or a "
            "val/ folder"
        )
    dev = resolve_device(spec.train.device)
    src = {k: source_for(v, layer, dev, spec.train.ram_budget_gb) for k, v in feats.items()}
    classes, task = feats["train"].classes, feats["train"].task
    args = (src["train"], src["val"], src.get("test"), len(classes), config, spec.progress)
    config.score_for(task)  # a metric of another task is refused before anything is fitted
    if task != "classify":
        if config.shots is not None or config.class_weight != "none":
            raise FeatcacheError(
                f"--shots and --class-weight are for classifiers; this {task} set takes neither"
            )
        res = probe_task(task, src["train"], src["val"], src.get("test"), classes, config, spec.progress)
    elif config.shots is None:
        res = linear_probe(*args)
    else:
        res, summary = few_shot(*args)
        res.extra["few_shot"] = summary
    if res.test and "confusion" in res.test:  # in the result, so --json and metrics.json say the same
        res.test["most_confused"] = most_confused(res.test["confusion"], classes)
    record = job.record(
        "probe", backbone, feats, [layer], layer=layer, head=res.info.spec, part=ProbePart(config)
    )
    metrics = Metrics.from_json(
        {"task": task, "strength": res.strength, "sweep": res.sweep, **res.extra}
        | ({"test": res.test} if res.test else {})
    )
    if folder is not None:
        folder.write_config(record)
        folder.save_head(res.head, res.info)  # with --shots: the first draw's head
        folder.write_metrics(metrics)
        folder.write_report(metrics, classes, f"{backbone.cfg.spec} · {layer} · probe")
        write_mistakes(folder, res.head, feats, layer, spec.train, splits)
    return Run(folder.path if folder is not None else None, record, metrics, res.head, res.info)
