"""Per-replica admission: how many requests a replica holds, and refusing the rest at once.

Ray Serve can bound its own queue (``max_queued_requests``), but the refusal then comes from
Serve's proxy as a plain-text body, which OpenAI clients cannot parse as an error. With a bound
queue, rayft therefore lets requests through to the replica (Serve's per-replica limit is
raised above the replica's capacity, see `serve.app.deployment_options`) and counts them here:
a replica holds ``max_ongoing_requests`` generating plus ``max_queued_requests`` waiting, and a
request beyond that gets an OpenAI-style 429 with ``Retry-After`` from the app itself.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

# Requests Serve may still route to a full replica so that they get the app's 429 (at least
# this many, and at least the replica's capacity): only past that do requests wait in Serve's
# router.
OVERFLOW_MIN = 64


def serve_limit(capacity: int) -> int:
    """Serve's ``max_ongoing_requests`` for a replica that holds `capacity` requests itself."""
    return capacity + max(capacity, OVERFLOW_MIN)


@dataclass
class Ticket:
    """One admitted request; `release` (idempotent) frees its place."""

    gate: Admission
    released: bool = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.gate.held -= 1


@dataclass
class Admission:
    """At most `capacity` requests in this replica (None: no bound); `active` generate at once.

    Only touched from the replica's event loop, so the counter needs no lock.
    """

    capacity: int | None
    active_limit: int
    held: int = 0
    active: asyncio.Semaphore = field(init=False)

    def __post_init__(self) -> None:
        self.active = asyncio.Semaphore(self.active_limit)

    def enter(self) -> Ticket | None:
        """A ticket for a new request, or None when the replica is full."""
        if self.capacity is not None and self.held >= self.capacity:
            return None
        self.held += 1
        return Ticket(self)
