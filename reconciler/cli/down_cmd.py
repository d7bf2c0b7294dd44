"""``reconciler down``: stop every instance this state directory started, dependents first.

    reconciler down [--state-dir D] [--profile P] [--gpu SPEC] [--url URL] [--token-file F] [--wait S]

Like ``docker compose down``, for what the reconciler started here;
adopted instances (an Ollama run by systemd) are left alone, and nothing
that is not ours is ever signalled. It works whether or not a server runs:

* **a server runs on the state directory** (its lock is held, and the API
  recorded its address in the store) — or ``--url`` names one: ``down``
  asks it (``POST /v1/down``). The server holds every service stopped
  (stored: a restart of the server keeps them down) until ``reconciler
  start --all`` or ``start SERVICE``; the server itself keeps running.
* **no server runs**: ``down`` opens the state directory itself (taking its
  lock, as ``apply`` does), recovers what a previous run left half done,
  and converges once with every service held stopped, with the profile
  the last ``serve``/``watch``/``apply`` here used (``--profile`` to give
  another) so that dependents stop first; these holds are not stored, so
  the next ``serve`` starts what its profile wants again. When no profile
  can be loaded (none recorded, or it no longer loads), everything of ours
  is stopped as if the profile were empty, without the dependency order,
  and ``down`` says so. The GPU backend is the recorded ``--gpu`` (or
  ``--gpu``).
* a ``watch`` or ``apply`` without an API holds the directory: ``down``
  cannot reach it, and says which pid to stop first.

Exit 0 when nothing of ours runs any more; 1 otherwise (or on an error).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from reconciler.cli.status_cmd import add_url_argument
from reconciler.host.specs import SPEC_HELP

if TYPE_CHECKING:
    from reconciler.core.profile import Profile


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "down", help="stop every instance this state directory started (dependents first; adopted ones stay)",
        description="Stop every instance the reconciler started in this state directory, dependents first, "
        "leaving adopted ones alone: through the API when a server runs there, else directly.",
    )
    parser.add_argument("--state-dir", metavar="DIR", help="state directory (default: the reconciler's own)")
    parser.add_argument("--profile", metavar="FILE",
                        help="without a server: the profile giving the dependency order (default: the one the "
                             "last serve/watch/apply here used)")
    parser.add_argument("--gpu", metavar="SPEC", help=f"without a server: GPU backend; {SPEC_HELP} "
                        "(default: the one the last run here used, else auto)")
    parser.add_argument("--node", default="local", help="node name (default: local)")
    parser.add_argument("--wait", type=float, default=120.0, metavar="S",
                        help="give up waiting after S seconds (default: 120)")
    add_url_argument(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from reconciler.errors import GuardError
    from reconciler.runtime.lock import StateLock
    from reconciler.store import default_state_dir

    if not 0 < args.wait <= 3600:
        print(f"reconciler down: --wait must be more than 0 and at most 3600 seconds, got {args.wait:g}",
              file=sys.stderr)
        return 64
    if args.url:
        return _through_api(args.url, args)
    state_dir = Path(args.state_dir) if args.state_dir else default_state_dir()
    if not (state_dir / "state.db").exists():
        print(f"nothing to stop: no reconciler state in {state_dir}")
        return 0
    lock = StateLock(state_dir, purpose="down")
    try:
        lock.acquire()
    except GuardError as held:
        url = _recorded(state_dir, "api_url")
        if url is None:
            raise GuardError(f"{held}; it serves no API that `down` could ask: stop it first (Ctrl-C, or "
                             "`systemctl stop`), then run `reconciler down` again") from None
        return _through_api(url, args)
    lock.release()  # the assembly takes it again (a server starting meanwhile: the assembly says so)
    return _direct(args, state_dir)


def _recorded(state_dir: Path, key: str) -> str | None:
    from reconciler.host.clock import SYSTEM_CLOCK
    from reconciler.store import open_store

    with open_store(state_dir, SYSTEM_CLOCK) as store:
        return store.get_meta(key)


def _through_api(url: str, args: argparse.Namespace) -> int:
    from reconciler.api.client import ApiClient, load_token

    url = url.replace("://0.0.0.0:", "://127.0.0.1:").replace("://[::]:", "://[::1]:")
    with ApiClient(url, load_token(args.token_file), timeout_s=args.wait + 30) as client:
        done = client.post(f"/v1/down?wait_s={min(args.wait, 600):g}")
    print(f"{done['message']} (asked the server at {url})")
    return 0 if done["done"] else 1


def _direct(args: argparse.Namespace, state_dir: Path) -> int:
    import asyncio

    profile, note = _profile(args, state_dir)
    if note:
        print(f"reconciler down: {note}", file=sys.stderr)
    gpu = args.gpu or _recorded(state_dir, "gpu") or "auto"
    return asyncio.run(_converge(profile, gpu, args, state_dir))


def _profile(args: argparse.Namespace, state_dir: Path) -> tuple[Profile, str | None]:
    from reconciler.core.profile import Profile
    from reconciler.errors import ProfileError
    from reconciler.loading import load_profile

    path = args.profile or _recorded(state_dir, "profile")
    empty = Profile(schema_version=1, name="down", services={})
    if path is None:
        return empty, "no profile recorded here: stopping everything of ours without a dependency order"
    try:
        return load_profile(path), None
    except ProfileError as exc:
        first = exc.diagnostics[0] if exc.diagnostics else "invalid"
        if args.profile:
            raise
        return empty, (f"the last profile used here does not load ({first}): stopping everything of ours "
                       "without a dependency order")


async def _converge(profile: Profile, gpu: str, args: argparse.Namespace, state_dir: Path) -> int:
    from reconciler.host.clock import SYSTEM_CLOCK
    from reconciler.host.gpu import open_gpu_backend
    from reconciler.runtime.assembly import Assembly
    from reconciler.runtime.controls import down_holds

    backend = open_gpu_backend(gpu, default_sim_mb=profile.vram_total_mb)
    async with Assembly(state_dir=state_dir, gpu_backend=backend, clock=SYSTEM_CLOCK, node=args.node,
                        purpose="down") as parts:
        runtime = parts.runtime
        await runtime.recover()
        ours = sorted(i.service for i in runtime.store.instances() if i.origin == "started")
        hold, left = down_holds(runtime, profile)
        runtime.transient_holds = set(hold)
        await runtime.converge(profile, args.wait)
        still = sorted(i.service for i in runtime.store.instances() if i.origin == "started")
    stopped = [s for s in ours if s not in still]
    print(f"stopped {', '.join(stopped)}" if stopped else "nothing of ours was running", end="")
    print(f"; adopted, left running: {', '.join(left)}" if left else "", end="")
    print(f"; still running: {', '.join(still)}" if still else "")
    return 1 if still else 0
