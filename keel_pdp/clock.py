"""The sidecar keeps time by the store's clock when its own is off.

Money depends on the clock in three places: the budget window a request is booked
in (a sidecar a day ahead books into tomorrow's daily window, a fresh cap), the
hold's expiry (a sidecar an hour behind gives its holds an hour less, and the
sweeper, which goes by Redis' clock, releases them while their provider calls
still run) and an exception grant's expiry. Every sidecar sharing a store reads
one clock alike: Redis ``TIME``.

So each sidecar measures its offset against ``TIME`` (at start, then with every
sweep: one command a second that the sweep makes anyway) and, once the offset
reaches ``TOLERANCE_MS``, keeps time by the store's clock: its own plus the
measured offset, until the offset is back under half the tolerance. Below the
tolerance (what NTP leaves) its own clock is used as it is, so a well-kept fleet
never steps its time by a sample's jitter.

An offset of more than ``MAX_FOLLOW_MS`` (a week) is not followed: two clocks that
far apart say one of them was reset (an RTC back at 1970 or 2000), and there is
no telling which; following a reset Redis host would move every sidecar of the
fleet into other budget windows at once. The sidecar then keeps its own clock
and the offset is exported (``keel_pdp_clock_offset_seconds``) for the alert.

A sample is the midpoint of the round trip (``TIME`` answered somewhere between
sending and receiving): its error is at most half the round trip, and samples
whose round trip took longer than ``MAX_RTT_MS`` are not used. While following,
the applied offset moves only when a sample differs by more than ``JITTER_MS``.
"""

from __future__ import annotations

from dataclasses import dataclass

TOLERANCE_MS = 250
MAX_RTT_MS = 100
JITTER_MS = 10
MAX_FOLLOW_MS = 7 * 24 * 3_600_000


@dataclass
class ClockSync:
    """What the samples said: ``offset_ms`` (store minus local, the last usable
    sample) and ``applied_ms`` (what the sidecar adds to its own clock: 0, or the
    offset while following the store's clock)."""

    tolerance_ms: int = TOLERANCE_MS
    offset_ms: int = 0
    applied_ms: int = 0
    samples: int = 0

    @property
    def following(self) -> bool:
        return self.applied_ms != 0

    def observe(self, sent_ms: int, store_ms: int, received_ms: int) -> bool:
        """Take one sample (local clock before and after asking, the store's answer);
        returns whether the applied offset changed."""
        rtt = received_ms - sent_ms
        if rtt < 0 or rtt > MAX_RTT_MS:
            return False  # the local clock stepped meanwhile, or the answer says little
        offset = store_ms - (sent_ms + received_ms) // 2
        self.offset_ms = offset
        self.samples += 1
        before = self.applied_ms
        if abs(offset) > MAX_FOLLOW_MS:
            self.applied_ms = 0
        elif abs(offset) >= self.tolerance_ms or (
                self.following and abs(offset) >= self.tolerance_ms // 2):
            if not self.following or abs(offset - self.applied_ms) > JITTER_MS:
                self.applied_ms = offset
        else:
            self.applied_ms = 0
        return self.applied_ms != before
