"""The ``loadertune`` command line: ``probe``, ``demo``, ``report`` and ``run``.

Exit status: 0 done; 1 the run failed (an error in the dataset's own code, say); 2 bad input
(a TARGET that does not import, a bad option, an unreadable log), with one line on stderr saying
what is wrong and what to do; 130 interrupted by Ctrl-C. ``--debug`` adds the traceback.

Each subcommand lives in its own module, imported only when it runs, so ``loadertune --help``
stays quick and torch loads only when needed.
"""

from __future__ import annotations

import argparse
import importlib
import math
import sys
import traceback
from collections.abc import Callable, Sequence

from loadertune.errors import LoadertuneError

__all__ = ["EXIT_FAILURE", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_USAGE", "UsageError", "main"]

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class UsageError(LoadertuneError, ValueError):
    """Bad input on the command line; the message says what is wrong and what to do."""


class _Parser(argparse.ArgumentParser):
    # argparse prints the usage and exits; the CLI promises one line and its own exit path.
    def error(self, message: str) -> None:  # type: ignore[override]
        exc = UsageError(f"{message} (see {self.prog} --help)")
        exc.prog = self.prog  # type: ignore[attr-defined]
        raise exc


def _positive(unit: str, example: str) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a number of {unit}, e.g. {example}"
            ) from None
        if not math.isfinite(value) or value <= 0:
            raise argparse.ArgumentTypeError(
                f"{text!r} must be a positive number of {unit}, e.g. {example}"
            )
        return value

    return parse


_seconds = _positive("seconds", "60")
_milliseconds = _positive("milliseconds", "20")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number, e.g. 32") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be 1 or more")
    return value


def _workers(text: str) -> tuple[int, ...]:
    from loadertune.cli.sweep import parse_workers

    try:
        return parse_workers(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix(f"--workers {text!r}: ")) from None


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``loadertune`` command."""
    common = _Parser(add_help=False)
    # SUPPRESS: `--debug` after the subcommand must not reset one given before it.
    common.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks"
    )

    parser = _Parser(
        prog="loadertune",
        description="Keeps PyTorch training jobs from starving for data.",
        epilog="Exit status: 0 ok, 1 the run failed, 2 bad input, 130 interrupted.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    from loadertune import __version__

    parser.add_argument("--version", action="version", version=f"loadertune {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    probe = sub.add_parser(
        "probe",
        parents=[common],
        help="report the machine; with a TARGET, sweep num_workers and recommend one",
        description=(
            "Without TARGET: report Python, torch, GPUs, usable CPUs, RAM, /dev/shm and the torch "
            "settings that cost speed. With TARGET: also measure the loader's throughput at "
            "several "
            "num_workers and recommend the smallest count within 5% of the best."
        ),
    )
    probe.add_argument(
        "target",
        nargs="?",
        metavar="TARGET",
        help="pkg.module:name or path/to/file.py:name naming a Dataset, a DataLoader, or a "
        "function taking no arguments that returns one",
    )
    probe.add_argument(
        "--batch-size",
        type=_positive_int,
        metavar="N",
        help="batch size (default: the DataLoader's, else 32)",
    )
    probe.add_argument(
        "--workers",
        type=_workers,
        metavar="LIST",
        help="worker counts to measure, all of them: 0,1,2,4 or 0-8 (inclusive) or 0:16:2 "
        "(inclusive, step 2), combinable with commas (default: 0,1,2,4,6,8,12,16,... up to 8 per "
        "usable CPU, stopping past the knee)",
    )
    probe.add_argument(
        "--budget",
        type=_seconds,
        default=60.0,
        metavar="SECONDS",
        help="time for the whole sweep (default 60)",
    )
    probe.add_argument("--json", action="store_true", help="print JSON on stdout, nothing else")
    probe.add_argument(
        "--plot", metavar="FILE.png", help="plot samples/s against workers (needs loadertune[plot])"
    )
    probe.set_defaults(module="probe")

    demo = sub.add_parser(
        "demo",
        parents=[common],
        help="watch the tuner speed up a simulated training run",
        description=(
            "A simulated training run (a 20 ms GPU step) over a built-in dataset that waits ~4 ms "
            "per sample, like reading files over the network. It starts at num_workers=0 and "
            "loadertune.tune(mode='apply') retunes it live."
        ),
    )
    demo.add_argument(
        "--seconds", type=_seconds, default=30.0, help="how long to train (default 30)"
    )
    demo.add_argument(
        "--batch-size", type=_positive_int, default=32, metavar="N", help="batch size (default 32)"
    )
    demo.add_argument(
        "--step-ms",
        type=_milliseconds,
        default=20.0,
        metavar="MS",
        help="simulated GPU step (default 20)",
    )
    demo.add_argument(
        "--sample-ms",
        type=_milliseconds,
        default=4.0,
        metavar="MS",
        help="wait per sample (default 4)",
    )
    demo.add_argument("--log-file", metavar="RUN.jsonl", help="write the tuner's event log here")
    demo.add_argument("--json", action="store_true", help="print JSON on stdout, nothing else")
    demo.set_defaults(module="demo")

    report = sub.add_parser(
        "report",
        parents=[common],
        help="summarize an event log written by tune(..., log_file=...)",
        description=(
            "Summarize a JSONL event log: configurations over time, changes, recommendations."
        ),
    )
    report.add_argument("log", metavar="RUN.jsonl", help="the event log")
    report.add_argument("--json", action="store_true", help="print JSON on stdout, nothing else")
    report.add_argument(
        "--plot", metavar="FILE.png", help="plot samples/s over time (needs loadertune[plot])"
    )
    report.set_defaults(module="report")
    _add_run(sub, common)
    return parser


def _add_run(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    run = sub.add_parser(
        "run",
        parents=[common],
        help="run a training command and watch (or tune) every DataLoader in it, no code change",
        description=(
            "Runs COMMAND (python train.py, torchrun ..., accelerate launch ...) with every torch "
            "DataLoader iterated in its Python processes timed, diagnosed and (--mode apply) tuned "
            "live; at exit, a report per loader and rank on stderr. The job's output, signals and "
            "exit status pass through unchanged."
        ),
        usage="loadertune run [--mode recommend|apply] [--log-dir DIR] [--json FILE] [options] -- COMMAND [ARGS...]",
    )
    run.add_argument(
        "--mode",
        choices=("recommend", "apply"),
        default="recommend",
        help="recommend (default): change nothing, report what to change; apply: tune the "
        "training loaders live with tune()",
    )
    run.add_argument("--log-dir", metavar="DIR", help="keep per-process event logs and reports here")
    run.add_argument("--json", metavar="FILE", help="also write the report as JSON to FILE")
    run.add_argument("--quiet", action="store_true", help="no live lines from the job, only the report")
    run.add_argument("--window-s", type=_seconds, metavar="S", help="least seconds per window (2)")
    run.add_argument(
        "--min-window-batches", type=_positive_int, metavar="N", help="least batches per window (10)"
    )
    run.add_argument("--interval-s", type=_seconds, metavar="S", help="sampler period (0.1)")
    run.add_argument("--max-workers", type=_positive_int, metavar="N", help="cap on workers")
    run.add_argument(
        "--ram-budget-share",
        type=float,
        metavar="F",
        help="share of available RAM all workers may use, in (0, 1] (0.5)",
    )
    run.add_argument("--gpu", choices=("auto", "none"), default="auto", help="NVML GPU readings")
    run.add_argument("--no-host", action="store_true", help="no psutil host readings")
    run.add_argument("command", nargs=argparse.REMAINDER, metavar="COMMAND", help="the command to run")
    run.set_defaults(module="run")


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the ``loadertune`` command line.

    Args:
        argv: Arguments without the program name (default: ``sys.argv[1:]``).

    Returns:
        The exit status (see the module docstring).
    """
    parser = build_parser()
    args_list = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args_list
    try:
        args = parser.parse_args(args_list)
    except UsageError as exc:
        return _fail(exc, EXIT_USAGE, debug, getattr(exc, "prog", "loadertune"))
    debug = bool(getattr(args, "debug", False))
    name = f"loadertune {args.command}"
    try:
        module = importlib.import_module(f"loadertune.cli.{args.module}")
        return int(module.run(args))
    except UsageError as exc:
        return _fail(exc, EXIT_USAGE, debug, name)
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader (e.g. `| head`) went away; nothing left to say to it.
        return EXIT_FAILURE
    except Exception as exc:
        return _fail(exc, EXIT_FAILURE, debug, name, hint=True)


def _fail(exc: BaseException, status: int, debug: bool, name: str, hint: bool = False) -> int:
    if debug:
        traceback.print_exception(exc)
    message = str(exc).splitlines()[0] if str(exc) else ""
    if not isinstance(exc, UsageError):
        message = f"{type(exc).__name__}: {message}" if message else type(exc).__name__
    if hint and not debug:
        message += " (run with --debug for the traceback)"
    print(f"{name}: error: {message}", file=sys.stderr)
    return status
