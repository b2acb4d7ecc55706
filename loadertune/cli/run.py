"""``loadertune run -- COMMAND``: watch (or tune) every DataLoader of a job without changing its code.

The parent puts ``loadertune/_boot`` first on ``PYTHONPATH`` and describes the run in
``LOADERTUNE_RUN_*`` variables; every Python process the command starts then imports
:mod:`loadertune._boot.sitecustomize`, which patches torch's DataLoader once torch loads it.
The parent only waits: the job's stdin, stdout and stderr are the parent's own (nothing is piped
or rewritten), signals are passed on, and the exit status is the job's (128 + N when a signal N
ended it, as a shell reports it). Then it gathers the per-process reports and prints the report
on stderr, each line marked ``[loadertune]``, and writes ``--json FILE`` if asked.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

__all__ = ["boot_dir", "child_environment", "exit_status", "run"]

_MARK = "[loadertune]"
# Signals a parent passes on. SIGINT and SIGQUIT come from the terminal to the whole foreground
# process group, the job included; they are forwarded only when they were not (see _Forwarder).
_FORWARDED = ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2")
_TERMINAL = ("SIGINT", "SIGQUIT")
# Exit statuses a shell uses when the command cannot be run.
_NOT_EXECUTABLE = 126
_NOT_FOUND = 127


def boot_dir() -> str:
    """The directory holding loadertune's ``sitecustomize``."""
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "_boot")


def child_environment(
    environ: dict[str, str], *, run_dir: str, run_id: str, options: dict[str, Any], quiet: bool
) -> dict[str, str]:
    """The job's environment: ``environ`` plus the boot directory first on ``PYTHONPATH`` and the
    run's description in ``LOADERTUNE_RUN_*``.

    Args:
        environ: The environment to extend (not modified).
        run_dir: Where processes write their event logs and reports.
        run_id: Ties the reports to this run (a reused log directory holds older ones).
        options: The :class:`~loadertune.options.TuneOptions` fields that differ from the
            defaults, JSON-ready.
        quiet: No live lines from the job's processes.
    """
    env = dict(environ)
    path = [boot_dir()]
    if env.get("PYTHONPATH"):
        path.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(path)
    env["LOADERTUNE_RUN_DIR"] = run_dir
    env["LOADERTUNE_RUN_ID"] = run_id
    env["LOADERTUNE_RUN_OPTIONS"] = json.dumps(options)
    env["LOADERTUNE_RUN_QUIET"] = "1" if quiet else "0"
    return env


def exit_status(returncode: int) -> int:
    """The job's status as a shell reports it: its code, or 128 + N when signal N ended it."""
    return 128 - returncode if returncode < 0 else returncode


def _options(args: argparse.Namespace) -> dict[str, Any]:
    """The tune options the command line sets, checked by :class:`TuneOptions`."""
    from loadertune.cli import UsageError
    from loadertune.options import TuneOptions

    given: dict[str, Any] = {"mode": args.mode}
    for name in ("window_s", "min_window_batches", "interval_s", "max_workers", "ram_budget_share"):
        value = getattr(args, name)
        if value is not None:
            given[name] = value
    if args.gpu == "none":
        given["gpu"] = None
    if args.no_host:
        given["host"] = None
    try:
        TuneOptions(**given)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    return given


def _command(args: argparse.Namespace) -> list[str]:
    from loadertune.cli import UsageError

    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise UsageError("give the command to run after --, e.g. loadertune run -- python train.py")
    return command


def run(args: argparse.Namespace) -> int:
    """Runs the job under loadertune; returns its exit status."""
    from loadertune.cli import UsageError

    command = _command(args)
    options = _options(args)
    if args.json is not None and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
        # Found out now, not after an hours-long job.
        raise UsageError(f"--json {args.json!r}: its directory does not exist")
    if args.log_dir is not None:
        run_dir = os.path.abspath(args.log_dir)
        try:
            os.makedirs(run_dir, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"--log-dir {args.log_dir!r}: {exc.strerror}") from None
        keep = True
    else:
        run_dir = tempfile.mkdtemp(prefix="loadertune-run-")
        keep = False
    run_id = f"{os.getpid()}-{time.time_ns()}"
    env = child_environment(dict(os.environ), run_dir=run_dir, run_id=run_id, options=options, quiet=args.quiet)
    try:
        status = _launch(command, env)
        _report(args, command, run_dir, run_id, status, keep)
    finally:
        if not keep:
            shutil.rmtree(run_dir, ignore_errors=True)
    return status


def _launch(command: list[str], env: dict[str, str]) -> int:
    try:
        proc = subprocess.Popen(command, env=env)
    except FileNotFoundError:
        print(f"{_MARK} {command[0]}: command not found", file=sys.stderr)
        return _NOT_FOUND
    except PermissionError:
        print(f"{_MARK} {command[0]}: permission denied", file=sys.stderr)
        return _NOT_EXECUTABLE
    forwarder = _Forwarder(proc)
    forwarder.install()
    try:
        # Signal handlers run between the retries of wait() (PEP 475): the job gets them.
        return exit_status(proc.wait())
    finally:
        forwarder.uninstall()


class _Forwarder:
    """Passes the signals the parent receives on to the job.

    A Ctrl-C at a terminal goes to every process of the foreground group: the job already has
    it, and a second SIGINT would interrupt its own clean-up. So SIGINT and SIGQUIT are passed
    on only when this process is not in the terminal's foreground group (sent by ``kill``, a
    scheduler, a test); every other signal always.
    """

    def __init__(self, proc: subprocess.Popen[Any]) -> None:
        self._proc = proc
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        for name in _FORWARDED:
            number = getattr(signal, name, None)
            if number is None:
                continue
            try:
                self._previous[number] = signal.signal(number, self._handle)
            except (OSError, ValueError):  # not the main thread, or not catchable here
                continue

    def uninstall(self) -> None:
        for number, handler in self._previous.items():
            with contextlib.suppress(OSError, ValueError):
                signal.signal(number, handler)

    def _handle(self, number: int, frame: object) -> None:
        if signal.Signals(number).name in _TERMINAL and _in_foreground():
            return
        with contextlib.suppress(OSError):  # the job has just exited
            self._proc.send_signal(number)


def _in_foreground() -> bool:
    """Whether this process's group is its terminal's foreground group (so a terminal signal
    reached the job too)."""
    try:
        fd = os.open("/dev/tty", os.O_RDONLY | os.O_NOCTTY)
    except OSError:
        return False
    try:
        return os.tcgetpgrp(fd) == os.getpgrp()
    except OSError:
        return False
    finally:
        os.close(fd)


def _report(args: argparse.Namespace, command: Sequence[str], run_dir: str, run_id: str, status: int, keep: bool) -> None:
    from loadertune.runreport import format_report, read_process_reports, report_json

    reports = read_process_reports(run_dir, run_id)
    document = report_json(reports, command=command, mode=args.mode, exit_status=status, log_dir=run_dir if keep else None)
    if not args.quiet or document["loaders"]:
        for line in format_report(document):
            print(f"{_MARK} {line}", file=sys.stderr)
    if args.json is not None:
        try:
            with open(args.json, "w", encoding="utf-8") as f:
                json.dump(document, f, indent=2)
                f.write("\n")
        except OSError as exc:
            print(f"{_MARK} could not write --json {args.json}: {exc.strerror}", file=sys.stderr)
