"""``featcache cache``: list, inspect, verify, compact and remove cache entries (no backbone, no data, no
torch: it imports the store alone, so it starts at once).

Like ``huggingface-cli scan-cache``/``delete-cache``, ``ls`` shows what each entry is and how much it
takes, and ``rm``/``gc`` remove by key, filter, age or total size. ``rm`` does not ask (it is used in
scripts): ``--dry-run`` shows what it would remove and the bytes it would free, and every removal is
printed.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from typing import Any

from .._errors import FeatcacheError
from .._format import format_table, human_ago, human_bytes
from ..cache.housekeeping import CacheScan, GcLimits, Selection
from ..cache.store import FeatureCache
from .flags import from_args
from .show import print_json


def cmd_cache(a: argparse.Namespace) -> None:
    cache = FeatureCache(a.cache_dir)
    selection = from_args(Selection, a)
    if a.action in ("info", "compact") and len(a.keys) != 1:
        raise FeatcacheError(
            f"`featcache cache {a.action}` needs a KEY (one; see `featcache cache ls`), got {len(a.keys)}"
        )
    given = {
        "--model, --dataset, --older-than": (not selection.empty, ("ls", "rm")),
        "--unused-days, --max-size": (a.unused_days is not None or a.max_size is not None, ("gc",)),
        "--dry-run": (a.dry_run, ("rm",)),
    }
    for options, (used, verbs) in given.items():
        if used and a.action not in verbs:
            raise FeatcacheError(f"{options} apply to `cache {' / '.join(verbs)}`, not to `cache {a.action}`")
    if a.action == "ls":
        _ls(cache, a.keys, selection, a.json)
    elif a.action == "info":
        print_json(cache.info(a.keys[0]))
    elif a.action == "verify":
        _verify(cache, a.keys, a.quiet)
    elif a.action == "rm":
        _rm(cache, a.keys, selection, a.dry_run)
    elif a.action == "compact":
        before, after = cache.compact(a.keys[0])
        print(f"compacted {cache.resolve(a.keys[0])}: {before} segments -> {after}")
    else:
        _gc(cache, from_args(GcLimits, a))


def _status(e: dict[str, Any]) -> str:
    return f"damaged: {e['reason']}" if e["status"] == "damaged" else str(e["status"])


def _ls(cache: FeatureCache, keys: list[str], selection: Selection, as_json: bool) -> None:
    scan = cache.scan(selection)
    if keys:
        wanted = {cache.resolve(k) for k in keys}
        scan = CacheScan(scan.root, [e for e in scan.entries if e["key"] in wanted], scan.not_entries)
    if as_json:
        print_json(scan.entries)
    else:
        _print_scan(scan)
        if not scan.entries and not selection.empty:
            _print_names(cache.scan().entries, selection)
    if scan.not_entries:  # a note, not an error: `lost+found` on its own file system is normal
        n = len(scan.not_entries)
        names = ", ".join(scan.not_entries[:5]) + (", ..." if n > 5 else "")
        folders = "folder that is not a cache entry" if n == 1 else "folders that are not cache entries"
        print(f"skipped {n} {folders}: {names}", file=sys.stderr)


def short_layers(layers: Sequence[str], width: int = 32) -> str:
    """The layers of an entry for one column of ``cache ls``: all of them when they fit in ``width``
    characters, else the first and the last with their count (``--json`` and ``cache info`` list all).

    Example:
        >>> short_layers(["blocks.3", "penultimate"])
        'blocks.3,penultimate'
        >>> short_layers([f"blocks.{i}" for i in range(7)] + ["penultimate"])
        'blocks.0..penultimate (8)'
    """
    joined = ",".join(layers)
    if len(joined) <= width or len(layers) < 3:
        return joined
    return f"{layers[0]}..{layers[-1]} ({len(layers)})"


def _print_scan(scan: CacheScan) -> None:
    print(f"cache root: {scan.root}")
    if not scan.entries:
        print("no entries")
        return
    now = time.time()
    rows = [
        {
            "key": e["key"][:16],  # as extract prints it
            "model": e.get("model"),
            "dataset": ", ".join(e["datasets"]) or None,
            "input": "x".join(map(str, e["input_size"])) if e.get("input_size") else None,
            "layers": short_layers(list(e.get("layers") or {})) or None,
            "rows": e.get("rows"),
            "size": human_bytes(e["bytes"]),
            "last used": human_ago(now - float(e["last_used_unix"])),
            "status": _status(e),
        }
        for e in scan.entries
    ]
    print(format_table(rows))
    damaged = f", {len(scan.damaged)} damaged" if scan.damaged else ""
    n = len(scan.entries)
    print(f"{n} {'entry' if n == 1 else 'entries'}{damaged}, {human_bytes(scan.bytes)} on disk")


def _verify(cache: FeatureCache, keys: list[str], quiet: bool) -> None:
    from tqdm.auto import tqdm

    todo = [cache.resolve(k) for k in keys] if keys else cache.entries()
    bad: list[str] = []
    for key in tqdm(todo, unit="entry", desc="verify", disable=quiet or len(todo) < 2, file=sys.stderr):
        try:
            problems = cache.verify(key)
        except FeatcacheError as exc:  # not even readable: damaged, or an older format
            if cache.info(key)["status"] == "old format":  # never read, not damaged
                tqdm.write(f"OLD  {key}: an older cache format, never read (`featcache cache gc` removes it)")
                continue
            problems = [str(exc)]
        if problems:
            bad.append(key)
            tqdm.write(f"BAD  {key[:16]}: {len(problems)} problem(s)")
            for p in problems:
                tqdm.write(f"     {p}")
        else:
            tqdm.write(f"OK   {key}")
    if not todo:
        print(f"no entries under {cache.root}")
    if bad:
        raise FeatcacheError(
            f"{len(bad)} of {len(todo)} entries failed verification; remove them with "
            f"`featcache cache rm {' '.join(k[:16] for k in bad)}` (their rows are extracted again when "
            "needed)"
        )


def _rm(cache: FeatureCache, keys: list[str], selection: Selection, dry_run: bool) -> None:
    chosen = cache.select(keys, selection)
    verb = "would remove" if dry_run else "removed"
    done, failed = [], []
    for e in chosen:
        if not dry_run:
            try:
                cache.rm(e["key"])
            except FeatcacheError as exc:  # reported, never counted as removed
                failed.append(e["key"][:16])
                print(f"not removed {e['key'][:16]}: {exc}")
                continue
        done.append(e)
        what = e.get("model") or _status(e)
        print(f"{verb} {e['key'][:16]}  {what}  {human_bytes(e['bytes'])}")
    n, freed = len(done), sum(int(e["bytes"]) for e in done)
    tail = " (dry run: nothing was removed)" if dry_run else ""
    print(f"{verb} {n} {'entry' if n == 1 else 'entries'}, {human_bytes(freed)} freed{tail}")
    if not chosen and not keys:  # `--model lite0` is a glob over whole names: show what there is to match
        _print_names(cache.scan().entries, selection)
    if failed:
        raise FeatcacheError(f"{len(failed)} entries could not be removed in full: {', '.join(failed)}")


def _print_names(entries: list[dict[str, Any]], selection: Selection) -> None:
    models = sorted({str(e["model"]) for e in entries if e.get("model")})
    datasets = sorted({d for e in entries for d in e["datasets"]})
    # name only the filters that match nothing on their own (not those another filter narrowed to none)
    if selection.model is not None and not any(Selection(model=selection.model).matches(e) for e in entries):
        print(f"no entry's model matches --model {selection.model!r} (a glob over whole names: "
              f"'*{selection.model}*'); models in the cache: {', '.join(models) or 'none'}")  # fmt: skip
    if selection.dataset is not None and not any(
        Selection(dataset=selection.dataset).matches(e) for e in entries
    ):
        print(f"no entry was read as --dataset {selection.dataset!r} (a glob over these names, or a "
              f"folder's path); datasets in the cache: {', '.join(datasets) or 'none'}")  # fmt: skip


def _gc(cache: FeatureCache, limits: GcLimits) -> None:
    before = cache.scan().bytes
    removed = cache.gc(unused_for_s=limits.unused_s, max_bytes=limits.max_bytes)
    for kind, paths in removed.items():
        for r in paths:
            print(f"not removed {r}" if kind == "not_removed" else f"removed {r}")
    extra = ""
    if limits.unused_days is not None:
        extra += f"; {len(removed['unused'])} tables unused for {limits.unused_days:g} days"
    if limits.max_size is not None:
        extra += f"; {len(removed['over_size'])} least recently used tables beyond {limits.max_size}"
    after = cache.scan().bytes
    print(
        f"{len(removed['leftovers'])} partial entries (files of interrupted appends) and "
        f"{len(removed['old_format'])} entries of older cache formats removed{extra}; "
        f"{human_bytes(max(before - after, 0))} freed, {human_bytes(after)} left; complete entries stay "
        "unless asked (`cache gc --unused-days N`, `--max-size 10G`, `cache rm KEY ...`)"
    )
