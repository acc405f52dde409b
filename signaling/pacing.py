"""The one paced clock of the agent's senders (the WebRTC track, the RTP stream).

Audio goes out as a packet every 20 ms, on a schedule kept from the first packet, so
that small delays in the event loop do not add up. When a packet's time has long passed
(the loop stalled, or nobody asked for audio for a while), the schedule restarts from
now: a burst to catch up would reach the caller as garbled, sped-up audio.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

PACKET_S = 0.02  # one packet of audio: 20 ms (a SNAC frame, 2048 samples, is snac.FRAME_S)
RESET_AFTER_S = 0.1  # a packet this late means the sender stalled: restart the schedule, don't burst


class PacedClock:
    """wait() returns at each packet's due time: the first at once, then one every
    `interval_s` after it."""

    def __init__(self, interval_s: float = PACKET_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval_s = interval_s
        self.clock = clock
        self._start: float | None = None
        self._sent = 0  # packets since the schedule (re)started

    async def wait(self) -> None:
        now = self.clock()
        due = None if self._start is None else self._start + self._sent * self.interval_s
        if due is None or now - due > RESET_AFTER_S:
            self._start, self._sent, due = now, 0, now
        if due > now:
            await asyncio.sleep(due - now)
        self._sent += 1
