"""Safety checks before a profile is applied (DESIGN §5.3).

A profile with no ``services`` would stop every service the reconciler runs —
usually a mistake (an emptied file, a bad merge). It is refused unless the
operator asks for it explicitly (``--allow-empty``).
"""

from __future__ import annotations

from reconciler.core.profile import Profile
from reconciler.errors import GuardError


def check_profile_guard(profile: Profile, allow_empty: bool) -> None:
    """Raise :class:`GuardError` when applying ``profile`` would stop everything and that was not asked for."""
    if not profile.services and not allow_empty:
        raise GuardError(
            f"profile {profile.name!r} has no services: applying it would stop every service the "
            "reconciler runs; pass --allow-empty to do that on purpose"
        )
