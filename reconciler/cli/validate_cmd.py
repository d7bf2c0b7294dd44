"""``reconciler validate PATH…``: check profiles and snapshots without touching the host.

    reconciler validate PATH… [--format text|json|github] [--kind auto|profile|snapshot]

Exit 0 when every file is valid, 1 when any is not. Everything goes to
stdout, so CI can capture it: ``text`` prints one ``file:line:col: message``
line per problem and ``ok: PATH`` for each valid file; ``json`` prints a list
of ``{file, line, col, message}`` (empty when all are valid); ``github``
prints ``::error`` workflow commands, which GitHub Actions shows as
annotations on the lines concerned. With ``--kind auto`` a document with a
top-level ``format_version`` is a snapshot, anything else a profile. Given
one snapshot among the paths, each profile is also checked against the host
it shows (a ``gpu_count`` larger than its GPUs is an error).
``${VAR}`` references are expanded from this process's environment, exactly
as the reconciler would when loading the profile.
"""

from __future__ import annotations

import argparse
import json

from reconciler.errors import Diagnostic, InputError

EXIT_OK = 0
EXIT_INVALID = 1


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "validate",
        help="check profiles and snapshots; print located errors",
        description="Check profiles and snapshots; print one file:line:col: message per problem.",
    )
    parser.add_argument("paths", nargs="+", metavar="PATH", help="profile or snapshot files (YAML or JSON)")
    parser.add_argument(
        "--format", choices=("text", "json", "github"), default="text", help="output format (default: text)"
    )
    parser.add_argument(
        "--kind", choices=("auto", "profile", "snapshot"), default="auto", help="what the files are (default: auto)"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from reconciler.core.checks import check_host
    from reconciler.core.snapshot import Snapshot
    from reconciler.loading import load_document, load_profile

    problems: list[Diagnostic] = []
    valid: list[str] = []
    loaded = {}
    for path in args.paths:
        try:
            loaded[path] = load_document(path, args.kind)
        except InputError as exc:
            problems.extend(exc.diagnostics)
        else:
            valid.append(path)
    hosts = [doc for doc in loaded.values() if isinstance(doc, Snapshot)]
    if len(hosts) == 1:  # profiles given with one snapshot are checked against its host
        for path, doc in loaded.items():
            if isinstance(doc, Snapshot) or not check_host(doc, hosts[0]):
                continue
            try:
                load_profile(path, host=hosts[0])
            except InputError as exc:
                problems.extend(exc.diagnostics)
                valid.remove(path)
    if args.format == "json":
        print(json.dumps([_as_dict(d) for d in problems], indent=2, ensure_ascii=False))
    elif args.format == "github":
        for diagnostic in problems:
            print(_github(diagnostic))
    else:
        for diagnostic in problems:
            print(_one_line(diagnostic))
        for path in valid:
            print(f"ok: {path}")
    return EXIT_INVALID if problems else EXIT_OK


def _as_dict(diagnostic: Diagnostic) -> dict[str, object]:
    return {"file": diagnostic.file, "line": diagnostic.line, "col": diagnostic.col, "message": diagnostic.message}


def _one_line(diagnostic: Diagnostic) -> str:
    # A message never spans lines, so each problem is one greppable line.
    return str(diagnostic).replace("\r", "\\r").replace("\n", "\\n")


def _github(diagnostic: Diagnostic) -> str:
    def prop(value: str) -> str:
        return _escape(value).replace(":", "%3A").replace(",", "%2C")

    return (
        f"::error file={prop(diagnostic.file)},line={diagnostic.line},col={diagnostic.col}::"
        f"{_escape(diagnostic.message)}"
    )


def _escape(value: str) -> str:
    return value.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")
