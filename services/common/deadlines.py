"""Deadlines and the clocks they run on; no gRPC, so engines can take a caller's deadline.

A :class:`Deadline` is an absolute point in time on a monotonic clock. Servers make one from
``context.time_remaining()``, pass it down to engines and backends (which stop early past it), and the
gateway shrinks it as it calls the stages (:meth:`Deadline.timeout_for`). Every clock is injectable
(``monotonic()`` in seconds), so tests run on a fake clock without sleeping.
"""

from __future__ import annotations

import time
from typing import Protocol

from services.common.errors import DeadlineExceeded


class Clock(Protocol):
    """A monotonic clock, in seconds."""

    def monotonic(self) -> float:
        """Seconds from an arbitrary origin; never goes back."""
        ...


class SystemClock:
    """The process's monotonic clock."""

    def monotonic(self) -> float:
        """``time.monotonic()``."""
        return time.monotonic()


class Deadline:
    """An absolute point in time (on ``clock``) by which a call must be done; ``None`` for no deadline.

    Args:
        at_s: Absolute time on ``clock``, in seconds, or ``None``.
        clock: The clock ``at_s`` is on.
    """

    def __init__(self, at_s: float | None, clock: Clock | None = None):
        self.at_s = at_s
        self.clock: Clock = clock or SystemClock()

    @classmethod
    def after(cls, timeout_s: float | None, clock: Clock | None = None) -> Deadline:
        """The deadline ``timeout_s`` seconds from now (``None`` -> no deadline)."""
        clock = clock or SystemClock()
        return cls(None if timeout_s is None else clock.monotonic() + timeout_s, clock)

    def extend_to(self, other: Deadline) -> None:
        """Moves this deadline to the later of itself and ``other`` (no deadline is the latest)."""
        if other.at_s is None or self.at_s is None:
            self.at_s = None
        else:
            self.at_s = max(self.at_s, other.at_s)

    def remaining_s(self) -> float | None:
        """Seconds left (may be negative), or ``None`` without a deadline."""
        return None if self.at_s is None else self.at_s - self.clock.monotonic()

    def expired(self) -> bool:
        """True once the deadline has passed."""
        remaining = self.remaining_s()
        return remaining is not None and remaining <= 0

    def timeout_for(self, stage_timeout_s: float | None, margin_s: float) -> float | None:
        """Timeout for one downstream call: the remaining time minus ``margin_s``, capped by the stage's own.

        The margin leaves the caller time to turn the downstream answer (or its failure) into its own
        response before its deadline.

        Args:
            stage_timeout_s: The stage's own timeout, in seconds; ``None`` or 0 for none.
            margin_s: Time kept back for the caller, in seconds.

        Returns:
            Seconds, or ``None`` when neither the caller nor the stage sets a limit.

        Raises:
            DeadlineExceeded: When less than ``margin_s`` is left.
        """
        remaining = self.remaining_s()
        limits = [t for t in (stage_timeout_s or None,) if t is not None]
        if remaining is not None:
            budget = remaining - margin_s
            if budget <= 0:
                raise DeadlineExceeded(
                    f"the caller's deadline leaves {max(remaining, 0) * 1000:.0f} ms, less than the "
                    f"{margin_s * 1000:.0f} ms margin"
                )
            limits.append(budget)
        return min(limits) if limits else None
