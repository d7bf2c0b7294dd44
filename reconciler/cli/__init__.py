"""Command line: one module per command, each with ``register(subparsers)``.

A command imports only what it uses: the parser registers the one command
named on the command line (every command only for the top-level help, or
when the name is not one of ours, so argparse can list the choices), and each
command imports its parts when it runs — ``reconciler plan`` never loads the
HTTP stack, the runtime or the other commands' modules.

Every command returns its exit code. Deliberate errors (:mod:`reconciler.errors`)
print as located messages, never as tracebacks; an unexpected one (a bug) prints
one line saying so, and its traceback only with ``RECONCILER_DEBUG=1``. Usage
errors exit 64 (EX_USAGE).

``plan`` and ``validate`` are brief: they run with the cyclic collector off and, in a process of their
own, end without the interpreter's teardown once their output is flushed (:func:`_end_now`); argparse's
help formatter reads the terminal's width only to print help (:class:`_Formatter`). Issue 10.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import os
import signal
import sys
from typing import Any, NoReturn

from reconciler.cli.pydantic_plugins import skip_pydantic_plugins
from reconciler.errors import InputError, ReconcilerError

EXIT_USAGE = 64
EXIT_ERROR = 1
DEBUG_ENV = "RECONCILER_DEBUG"

# Each module defines register(subparsers); order is the order of --help.
COMMANDS = ("validate", "plan", "apply", "schema", "observe", "watch", "serve", "status", "lease", "why",
            "logs", "stop", "start", "restart", "reset", "down", "install-service")
# Commands that read their input, answer and exit: they run with the cyclic garbage collector off. Nearly all
# they allocate is the modules and models they load, which live until the end; collecting meanwhile only
# walks them again and again (26 M of plan's 814 M instructions on a tiny scenario, issue 10).
BRIEF = ("validate", "plan")


class _Formatter(argparse.HelpFormatter):
    """argparse's help formatter, which reads the terminal's width only when it lays out help or usage.

    argparse makes a formatter for every ``add_argument`` (to check its metavar), and the formatter's
    ``__init__`` imports :mod:`shutil` for the width, and shutil imports zlib, bz2 and lzma: 6 M instructions of every
    ``reconciler plan`` that prints no help at all (issue 10). The width, and the help position that
    depends on it, are the same as argparse's, computed the same way, at their first use.
    """

    def __init__(self, prog: str, indent_increment: int = 2, max_help_position: int = 24,
                 width: int | None = None) -> None:
        self._pending: tuple[int, int] | None = None
        super().__init__(prog, indent_increment, max_help_position, 80 if width is None else width)
        if width is None:
            self._pending = (indent_increment, max_help_position)

    def _resolve(self) -> None:
        if self._pending is not None:
            import shutil

            indent_increment, max_help_position = self._pending
            self._pending = None
            self._width = shutil.get_terminal_size().columns - 2
            self._max_help_position = min(max_help_position, max(self._width - 20, indent_increment * 2))

    @property
    def _width(self) -> int:
        self._resolve()
        return self._known_width

    @_width.setter
    def _width(self, width: int) -> None:
        self._known_width = width

    @property
    def _max_help_position(self) -> int:
        self._resolve()
        return self._known_help_position

    @_max_help_position.setter
    def _max_help_position(self, position: int) -> None:
        self._known_help_position = position


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:  # argparse would exit 2, which means "changes" for plan
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser; given the arguments, with only the command they name (the same parser for that command)."""
    parser = _Parser(prog="reconciler", description="Declarative reconciler for GPU services.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    named = _command_named(argv)
    for name in (named,) if named else COMMANDS:
        importlib.import_module(f"reconciler.cli.{name.replace('-', '_')}_cmd").register(sub)
    return parser


def _command_named(argv: list[str] | None) -> str | None:
    """The command ``argv`` runs, when it is one of ours (the top level takes no option but ``-h``, so it
    is the first argument; ``-h`` first is the top-level help, which lists them all)."""
    return argv[0] if argv and argv[0] in COMMANDS else None


def main(argv: list[str] | None = None) -> int:
    # Profiles (the demo's among them) may run Python services as ${RECONCILER_PYTHON}: the
    # interpreter running the reconciler, for every command, so plan and apply agree with watch.
    os.environ.setdefault("RECONCILER_PYTHON", sys.executable)
    # A shell that starts a command in the background (``cmd &`` in a script, CI runners) starts it with
    # SIGINT ignored, and an ignored signal stays ignored across exec: Ctrl-C (or a test's SIGINT) would
    # never reach us. Python installs its own handler only where SIGINT was not ignored, so do it here.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    skip_pydantic_plugins()  # before any model is built: see the module's docstring
    arguments = sys.argv[1:] if argv is None else argv
    parser = build_parser(arguments)
    args = parser.parse_args(arguments)
    paused = args.command in BRIEF and gc.isenabled()
    if paused:
        gc.disable()
    try:
        code = _run(args)
    finally:
        # A caller running a command in its own process (argv given: the tests) gets its collector back. Our own
        # process ends with it off: Python collects everything once more at exit when it is on (17 M for plan).
        if paused and argv is not None:
            gc.enable()
    if paused and argv is None:
        _end_now(code)
    return code


def _run(args: argparse.Namespace) -> int:
    try:
        return int(args.func(args))
    except InputError as exc:
        for diagnostic in exc.diagnostics:
            print(diagnostic, file=sys.stderr)
        return EXIT_ERROR
    except ReconcilerError as exc:
        print(f"reconciler: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # a bug: said in one line; the traceback only when asked for
        if os.environ.get(DEBUG_ENV):
            import traceback

            traceback.print_exc(file=sys.stderr)
        print(f"reconciler: internal error ({type(exc).__name__}: {exc}); nothing more was changed. This is a "
              f"bug: please report it with the command you ran (set {DEBUG_ENV}=1 to see the traceback)",
              file=sys.stderr)
        return EXIT_ERROR


def _end_now(code: int) -> None:
    """End a brief command's own process here, with its exit code, without the interpreter's teardown.

    ``plan`` and ``validate`` read, answer and exit; what they leave is the modules and models they loaded,
    and tearing those down one object at a time is 43 M instructions of a tiny plan's 712 M (issue 10). So
    once its output is flushed the process ends at once (``os._exit``) — unless anything could want the
    teardown: a function registered with :mod:`atexit` (coverage's, for one), a tracer or a profiler
    (``python -m cProfile`` prints after the command returns), or output that does not flush (then Python
    ends as it always does, and reports it as it always did). Returns only in those cases.
    """
    import atexit

    if atexit._ncallbacks() or sys.gettrace() is not None or sys.getprofile() is not None:
        return
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):
        return
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
