"""``reconciler install-service``: run ``reconciler serve`` under systemd.

    reconciler install-service (--profile FILE | --profiles DIR) [--user] [--name NAME]
                               [--gpu SPEC] [--state-dir DIR] [--listen HOST:PORT]
                               [--gateway HOST:PORT] [--token-file FILE] [--env-file FILE] [--node NAME]
                               [--print] [--unit-dir DIR]

Writes a systemd unit (:mod:`reconciler.render.systemd` says what is in it
and why — ``Type=notify``, ``Restart=on-failure``, ``KillMode=process`` so a
restart of the reconciler leaves the GPU services running) to
``/etc/systemd/system/NAME.service``, or with ``--user`` to
``~/.config/systemd/user/NAME.service``, and prints how to enable it.
``--print`` shows the unit and writes nothing. Paths are made absolute; the
command is this reconciler's own executable. Variables the profile reads
(``${NAME}``) are not copied into the unit — a unit file is no place for a
secret: give them with ``--env-file`` (``NAME=value`` lines, ``chmod 600``).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from reconciler.errors import GuardError
from reconciler.host.specs import SPEC_HELP
from reconciler.render.systemd import UnitOptions, unit_text

SYSTEM_UNIT_DIR = Path("/etc/systemd/system")


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "install-service", help="write a systemd unit that runs `reconciler serve` (and say how to enable it)",
        description="Write a systemd unit for `reconciler serve` with these options; --print only shows it.",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--profile", metavar="FILE", help="the profile (YAML)")
    source.add_argument("--profiles", metavar="DIR", help="a directory of profiles (the largest that fits the GPU)")
    parser.add_argument("--user", action="store_true", help="a user unit (~/.config/systemd/user), not a system one")
    parser.add_argument("--name", default="reconciler", help="the unit's name (default: reconciler)")
    parser.add_argument("--gpu", metavar="SPEC", help=f"GPU backend; {SPEC_HELP}")
    parser.add_argument("--state-dir", metavar="DIR",
                        help="state directory (default: /var/lib/reconciler for a system unit, the usual for --user)")
    parser.add_argument("--listen", metavar="HOST:PORT", help="where the API listens (default 127.0.0.1:7700)")
    parser.add_argument("--gateway", metavar="HOST:PORT", help="also serve the model gateway there (off unless given)")
    parser.add_argument("--token-file", metavar="FILE",
                        help="the API's and the gateway's token (required to listen off loopback)")
    parser.add_argument("--env-file", metavar="FILE", help="NAME=value lines the profile's ${NAME}s read (chmod 600)")
    parser.add_argument("--node", metavar="NAME", help="node name")
    parser.add_argument("--print", dest="print_only", action="store_true", help="print the unit, write nothing")
    parser.add_argument("--unit-dir", metavar="DIR", help="where to write the unit (default: systemd's)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    argv = [*_executable(), "serve"]
    if args.profile:
        argv += ["--profile", _existing(args.profile, "--profile")]
    else:
        argv += ["--profiles", _existing(args.profiles, "--profiles")]
    for flag, value in (("--gpu", args.gpu), ("--listen", args.listen), ("--gateway", args.gateway),
                        ("--node", args.node)):
        if value:
            argv += [flag, value]
    if args.token_file:
        argv += ["--token-file", _existing(args.token_file, "--token-file")]
    system_state = not args.user and not args.state_dir
    state_dir = args.state_dir and str(Path(args.state_dir).absolute())
    argv += ["--state-dir", state_dir or "/var/lib/reconciler"] if (state_dir or system_state) else []
    text = unit_text(argv, UnitOptions(
        description=f"reconciler: GPU services of {Path(args.profile or args.profiles).name}",
        user_unit=args.user, state_directory=system_state, environment={"PYTHONUNBUFFERED": "1"},
        env_file=_existing(args.env_file, "--env-file") if args.env_file else None,
    ))
    if args.print_only:
        sys.stdout.write(text)
        return 0
    unit_dir = Path(args.unit_dir) if args.unit_dir else _unit_dir(args.user)
    path = unit_dir / f"{args.name}.service"
    try:
        unit_dir.mkdir(parents=True, exist_ok=True)
        existed = path.exists()
        path.write_text(text)
    except OSError as exc:
        hint = "" if args.user else " (a system unit needs root: run it with sudo, or add --user)"
        raise GuardError(f"cannot write {path}: {exc.strerror or exc}{hint}") from None
    scope = " --user" if args.user else ""
    print(f"{'updated' if existed else 'wrote'} {path}")
    print(f"enable and start it:  systemctl{scope} daemon-reload && systemctl{scope} enable --now {args.name}.service")
    print(f"its log:              journalctl{scope} -u {args.name}.service -f")
    if args.user:
        print("to keep it running without a login session:  loginctl enable-linger \"$USER\"")
    print("stopping the unit leaves the GPU services running (KillMode=process); `reconciler down` stops them")
    return 0


def _executable() -> list[str]:
    """This reconciler's own command: the console script beside the interpreter, else ``python -m reconciler``."""
    script = Path(sys.executable).parent / "reconciler"
    return [str(script)] if script.is_file() and os.access(script, os.X_OK) else [sys.executable, "-m", "reconciler"]


def _existing(path: str, flag: str) -> str:
    absolute = Path(path).absolute()
    if not absolute.exists():
        raise GuardError(f"{flag} {path}: no such file or directory")
    return str(absolute)


def _unit_dir(user: bool) -> Path:
    if not user:
        return SYSTEM_UNIT_DIR
    config = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(config) / "systemd" / "user"
