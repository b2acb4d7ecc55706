"""The report of ``loadertune run``: written per process, gathered by the parent, read by people.

Each watched process writes ``<log dir>/rank<R>-pid<P>.report.json`` (atomically: the parent or a
signal may come at any moment) at exit and whenever a measurement window closes. After the job
exits the parent reads the files of its run and prints, per loader and rank: what limited it,
the recommendation with its expected gain, and the exact change to make in the code, or "not the
bottleneck". Evaluation loaders and loaders iterated too briefly to measure are listed apart.

Everything here is plain data in, text out: no torch, no processes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "REPORT_SUFFIX",
    "ProcessReport",
    "classify",
    "code_change",
    "format_report",
    "read_process_reports",
    "report_json",
    "write_process_report",
]

REPORT_SUFFIX = ".report.json"
# torch's prefetch_factor when workers are used and none is given: not worth writing out.
_TORCH_DEFAULT_PREFETCH = 2
# Below this share of its time waiting for data, a loader is not what limits the job.
_NOT_BOTTLENECK_WAIT = 0.05
_SETTINGS = ("num_workers", "batch_size", "prefetch_factor", "pin_memory", "persistent_workers")


@dataclass(frozen=True)
class ProcessReport:
    """What one process of the job observed.

    Attributes:
        run_id: The ``loadertune run`` invocation it belongs to.
        pid: The process id.
        rank: ``RANK`` (else ``LOCAL_RANK``) of the process, None outside distributed jobs.
        mode: ``"recommend"`` or ``"apply"``.
        final: True when written at interpreter exit; False for the interim copy a window wrote.
        argv: The process's ``sys.argv``.
        time: When it was written (seconds since the epoch).
        loaders: One dict per loader (see :meth:`loadertune.observation.Observation.to_dict`).
    """

    run_id: str
    pid: int
    rank: int | None
    mode: str
    final: bool
    argv: list[str] = field(default_factory=list)
    time: float = 0.0
    loaders: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def collect(
        cls, *, run_id: str, pid: int, rank: int | None, mode: str, observations: Iterable[Any], final: bool
    ) -> ProcessReport:
        """Builds the report from this process's observations."""
        import sys

        return cls(
            run_id=run_id,
            pid=pid,
            rank=rank,
            mode=mode,
            final=final,
            argv=list(sys.argv),
            time=time.time(),
            loaders=[o.to_dict() for o in observations],
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ProcessReport:
        """The inverse of :meth:`to_dict`; unknown keys are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def write_process_report(directory: str, stem: str, report: ProcessReport) -> str:
    """Writes ``report`` to ``<directory>/<stem>.report.json`` atomically; returns the path."""
    path = os.path.join(directory, stem + REPORT_SUFFIX)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(report.to_dict(), f, default=_jsonable)
    os.replace(tmp, path)
    return path


def read_process_reports(directory: str, run_id: str) -> list[ProcessReport]:
    """The reports of run ``run_id`` in ``directory``, by rank then pid; unreadable files skipped."""
    reports = []
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return []
    for name in names:
        if not name.endswith(REPORT_SUFFIX):
            continue
        try:
            with open(os.path.join(directory, name), encoding="utf-8") as f:
                report = ProcessReport.from_dict(json.load(f))
        except (OSError, ValueError, TypeError):
            continue
        if report.run_id == run_id:
            reports.append(report)
    return sorted(reports, key=lambda r: (r.rank if r.rank is not None else -1, r.pid))


def _jsonable(value: Any) -> Any:
    # Metrics may hold numpy scalars or tuples; anything else becomes its text.
    if hasattr(value, "item"):
        return value.item()
    return str(value)


# -- judging one loader ------------------------------------------------------------------------
def classify(loader: dict[str, Any], shuffled_elsewhere: bool = False) -> tuple[str, str]:
    """Sorts a loader entry into ``"training"``, ``"evaluation"`` or ``"brief"``, with the reason.

    Evaluation: most batches taken with autograd off (``torch.no_grad``, inference mode, every
    framework's validation loop), or read in order while another loader of the process shuffles
    (the Hugging Face Trainer's evaluation). Brief: no measurement window closed.

    Args:
        loader: The loader's report entry.
        shuffled_elsewhere: Another loader of the same process draws a random order.
    """
    batches = loader.get("batches") or 0
    if loader.get("mode") == "recommend" and batches and loader.get("grad_off_batches", 0) * 2 > batches:
        return "evaluation", "iterated with autograd off"
    if loader.get("not_tuned", "") and "autograd off" in (loader.get("not_tuned") or ""):
        return "evaluation", "iterated with autograd off"
    if loader.get("shuffled") is False and shuffled_elsewhere:
        return "evaluation", "read in order while another loader shuffles"
    if loader.get("metrics") is None:
        seconds = loader.get("busy_s") or 0.0
        return "brief", f"{batches} batches in {seconds:.1f} s: shorter than one measurement window"
    return "training", ""


#: Where a Hugging Face Trainer takes each DataLoader setting from (``TrainingArguments``).
TRAINING_ARGUMENTS = {
    "num_workers": "dataloader_num_workers",
    "prefetch_factor": "dataloader_prefetch_factor",
    "pin_memory": "dataloader_pin_memory",
    "persistent_workers": "dataloader_persistent_workers",
    "batch_size": "per_device_train_batch_size",
}


def code_change(
    before: dict[str, Any],
    after: dict[str, Any],
    class_name: str = "DataLoader",
    names: dict[str, str] | None = None,
) -> str | None:
    """The constructor arguments that turn ``before`` into ``after``, e.g.
    ``DataLoader(..., num_workers=8, persistent_workers=True)``; None when nothing changes.

    Settings torch derives by itself are left out: ``prefetch_factor=2`` (its default with
    workers), and ``prefetch_factor``/``persistent_workers`` without workers.

    Args:
        before: The settings in use.
        after: The settings to move to.
        class_name: What to call: the loader's class, or ``TrainingArguments``.
        names: The argument name of each setting there, when it is not the DataLoader's.
    """
    names = names or {}
    args = []
    for name in _SETTINGS:
        old, new = before.get(name), after.get(name)
        if old == new:
            continue
        workers = after.get("num_workers") or 0
        if name in ("prefetch_factor", "persistent_workers") and workers == 0:
            continue
        if name == "prefetch_factor" and new == _TORCH_DEFAULT_PREFETCH and (before.get("num_workers") or 0) == 0:
            continue
        args.append(f"{names.get(name, name)}={new!r}")
    if not args:
        return None
    return f"{class_name}(..., {', '.join(args)})"


def _call_for(loader: dict[str, Any], role: str) -> tuple[str, dict[str, str]]:
    """What the change is written as: the loader's constructor, or the framework's settings."""
    if (loader.get("site") or {}).get("via", "").split(".")[0] == "transformers":
        names = dict(TRAINING_ARGUMENTS)
        if role == "evaluation":
            names["batch_size"] = "per_device_eval_batch_size"
        return "TrainingArguments", names
    return loader.get("class") or "DataLoader", {}


def verdict(loader: dict[str, Any], role: str = "training") -> dict[str, Any]:
    """What the report says about one loader, as data.

    Returns:
        ``limited_by`` (the diagnosis sentence), ``kind``, ``bottleneck`` (bool),
        ``recommendation`` (one line or None), ``reason``, ``expected_speedup``, ``change`` (the
        code to write, or None), ``lr_note`` (when the batch size changes), ``caveat`` (a
        condition the change needs), ``samples_per_s``, ``wait_share``.
    """
    diagnosis = loader.get("diagnosis") or {}
    metrics = loader.get("metrics") or {}
    rec = loader.get("recommendation")
    wait = metrics.get("wait_share")
    if wait is None and loader.get("busy_s"):
        wait = loader["wait_s"] / loader["busy_s"]
    out: dict[str, Any] = {
        "kind": diagnosis.get("kind"),
        "limited_by": diagnosis.get("summary"),
        "advice": list(diagnosis.get("advice") or ()),
        "samples_per_s": (loader.get("summary") or {}).get("last_samples_per_s") or metrics.get("samples_per_s"),
        "wait_share": wait,
        "recommendation": None,
        "reason": None,
        "expected_speedup": None,
        "change": None,
        "lr_note": None,
        "caveat": None,
    }
    config = loader.get("config") or {}
    final = loader.get("final_config") or config
    cls, names = _call_for(loader, role)
    if loader.get("mode") == "apply" and final != config:
        # Tuned live: the change to keep is what the tuner settled on.
        out["change"] = code_change(config, final, cls, names)
        out["recommendation"] = "applied live: " + _changes_text(config, final)
        summary = loader.get("summary") or {}
        first, last = summary.get("first_samples_per_s"), summary.get("last_samples_per_s")
        if first and last:
            out["reason"] = f"{first:.0f} -> {last:.0f} samples/s ({last / first:.2f}x) measured"
    if rec and (rec.get("config") or {}) != final:
        target = rec.get("config") or {}
        out["recommendation"] = _changes_text(final, target)
        out["expected_speedup"] = rec.get("expected_speedup")
        out["reason"] = rec.get("reason")
        out["change"] = code_change(config, target, cls, names)
        lr = rec.get("lr_factor")
        if lr and target.get("batch_size") != final.get("batch_size"):
            out["lr_note"] = f"scale the learning rate by {lr:.3g} with the new batch size"
        if loader.get("iterable") and (final.get("num_workers") or 0) < 2 <= (target.get("num_workers") or 0):
            out["caveat"] = (
                "only if the IterableDataset splits its items between workers (by "
                "torch.utils.data.get_worker_info()); otherwise every worker yields every item"
            )
    out["bottleneck"] = bool(out["change"]) or (
        out["kind"] not in (None, "balanced") and (wait is None or wait >= _NOT_BOTTLENECK_WAIT)
    )
    return out


def _changes_text(before: dict[str, Any], after: dict[str, Any]) -> str:
    parts = [
        f"{name} {before.get(name)!r} -> {after.get(name)!r}"
        for name in _SETTINGS
        if before.get(name) != after.get(name)
    ]
    return ", ".join(parts) if parts else "no change"


# -- the whole run -----------------------------------------------------------------------------
def report_json(
    reports: Sequence[ProcessReport], *, command: Sequence[str], mode: str, exit_status: int, log_dir: str | None
) -> dict[str, Any]:
    """The document ``--json FILE`` holds: every process and every loader with its verdict."""
    loaders = []
    for report in reports:
        shuffled = [bool(entry.get("shuffled")) for entry in report.loaders]
        for i, entry in enumerate(report.loaders):
            elsewhere = any(s for j, s in enumerate(shuffled) if j != i)
            role, why = classify(entry, elsewhere)
            loaders.append(
                {
                    "name": entry["site"]["name"],
                    "rank": report.rank,
                    "pid": report.pid,
                    "role": role,
                    "role_reason": why,
                    **verdict(entry, role),
                    "loader": entry,
                }
            )
    return {
        "command": list(command),
        "mode": mode,
        "exit_status": exit_status,
        "log_dir": log_dir,
        "processes": [
            {"pid": r.pid, "rank": r.rank, "argv": r.argv, "complete": r.final, "loaders": len(r.loaders)}
            for r in reports
        ],
        "loaders": loaders,
    }


def format_report(document: dict[str, Any]) -> list[str]:
    """The report as lines of text (without the ``[loadertune]`` mark).

    Loaders are grouped by creation site, one block per rank under it: training loaders first,
    then evaluation loaders and loaders iterated too briefly to measure, apart.
    """
    loaders = document["loaders"]
    processes = document["processes"]
    lines = [
        f"report ({document['mode']} mode): {len(loaders)} DataLoader(s) in {len(processes)} "
        f"process(es){_incomplete(processes)}"
    ]
    if not loaders:
        lines.append(
            "  no DataLoader was iterated (processes that never import torch, or started with "
            "python -I or -E, are not watched)"
        )
        return lines
    groups = (
        ("training", None),
        ("evaluation", "Evaluation loaders (reported apart):"),
        ("brief", "Iterated only briefly (too little to measure):"),
    )
    for role, title in groups:
        chosen = [item for item in loaders if item["role"] == role]
        if not chosen:
            continue
        if title:
            lines.append(title)
        by_site: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for item in chosen:
            site = item["loader"]["site"]
            by_site.setdefault((site["name"], site["path"]), []).append(item)
        for (name, _path), items in sorted(by_site.items()):
            items.sort(key=lambda x: x["rank"] if x["rank"] is not None else -1)
            entry = items[0]["loader"]
            code = entry["site"].get("code") or ""
            via = entry["site"].get("via") or ""
            lines.append((f"{name}: {code}" if code else name) + (f"  (made inside {via})" if via else ""))
            for item in items:
                lines.extend(_loader_lines(item, brief=role != "training"))
    logs = document.get("log_dir")
    if logs:
        lines.append(f"event logs: {logs} (read one with: loadertune report FILE.jsonl)")
    return lines


def _incomplete(processes: Sequence[dict[str, Any]]) -> str:
    cut = [p for p in processes if not p["complete"]]
    if not cut:
        return ""
    return f"; {len(cut)} process(es) ended without a normal exit: their last window is shown"


def _loader_lines(item: dict[str, Any], brief: bool) -> list[str]:
    entry = item["loader"]
    who = f"rank {item['rank']}" if item["rank"] is not None else f"pid {item['pid']}"
    stats = f"{entry['batches']} batches in {entry['epochs']} epoch(s)"
    rate = item.get("samples_per_s")
    if rate:
        stats += f", {rate:.0f} samples/s"
    if item.get("wait_share") is not None:
        stats += f", waiting {item['wait_share']:.0%} of the time"
    head = f"  {who} [{_config_text(entry['config'])}]: {stats}"
    if item["role"] != "training" and item["role_reason"]:
        head += f" ({item['role_reason']})"
    lines = [head]
    if entry.get("error"):
        lines.append(f"    not measured to the end: {entry['error']}")
    if entry.get("not_tuned") and entry.get("mode") == "recommend":
        lines.append(f"    observed, not tuned: {entry['not_tuned']}")
    if brief:
        if item["change"]:
            lines.append(f"    would change: {item['change']}")
        return lines
    if item["limited_by"]:
        lines.append(f"    limited by: {item['limited_by']}")
    if not item["bottleneck"]:
        lines.append("    not the bottleneck: leave it as it is")
        return lines
    if item["recommendation"]:
        gain = item.get("expected_speedup")
        extra = f" (expected ~{gain:.1f}x samples/s)" if gain else ""
        why = f": {item['reason']}" if item.get("reason") else ""
        lines.append(f"    recommendation: {item['recommendation']}{extra}{why}")
    if item["change"]:
        lead = "to keep it without loadertune" if entry.get("mode") == "apply" else "change the code"
        lines.append(f"    {lead}: {item['change']}")
    if item.get("lr_note"):
        lines.append(f"    and {item['lr_note']}")
    if item.get("caveat"):
        lines.append(f"    but {item['caveat']}")
    for advice in item.get("advice") or ():
        lines.append(f"    also: {advice}")
    return lines


def _config_text(config: dict[str, Any]) -> str:
    parts = [f"num_workers={config.get('num_workers')}", f"batch_size={config.get('batch_size')}"]
    if config.get("num_workers"):
        parts.append(f"prefetch_factor={config.get('prefetch_factor')}")
        if config.get("persistent_workers"):
            parts.append("persistent_workers=True")
    if config.get("pin_memory"):
        parts.append("pin_memory=True")
    return ", ".join(parts)
