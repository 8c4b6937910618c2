"""Retry delays shared by every peer the service reconnects to (CAN adapter, relay boards, remote outputs).

Neutral on purpose: the outputs and the CAN link both back off the same way without one importing the other.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Backoff:
    """Doubling delay from `initial` to `maximum` seconds; `reset` after a success."""

    initial: float = 0.1
    maximum: float = 5.0
    current: float = 0.0

    def next_delay(self) -> float:
        self.current = self.initial if self.current == 0 else min(self.current * 2, self.maximum)
        return self.current

    def reset(self) -> None:
        self.current = 0.0
