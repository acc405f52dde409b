"""The one paced clock of the WebRTC track and the RTP stream (signaling/pacing.py)."""

import asyncio

from signaling.pacing import PACKET_S, RESET_AFTER_S, PacedClock


async def test_packets_keep_their_schedule_and_a_stall_restarts_it(monkeypatch):
    now = [100.0]
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(round(seconds, 6))
        now[0] += seconds

    pace = PacedClock(PACKET_S, lambda: now[0])
    monkeypatch.setattr(asyncio, "sleep", sleep)
    await pace.wait()  # the first packet goes at once
    assert slept == []
    now[0] += 0.005  # the sender's own work between packets does not push the schedule
    await pace.wait()
    assert slept == [0.015]
    now[0] += RESET_AFTER_S + 0.05  # a stall: the next packet goes now, and no burst follows
    await pace.wait()
    assert slept == [0.015]
    await pace.wait()
    assert slept == [0.015, PACKET_S]


async def test_a_late_packet_within_the_limit_is_caught_up(monkeypatch):
    now = [0.0]

    async def sleep(seconds: float) -> None:
        now[0] += seconds

    pace = PacedClock(PACKET_S, lambda: now[0])
    monkeypatch.setattr(asyncio, "sleep", sleep)
    await pace.wait()
    now[0] += 0.05  # 30 ms late for the second packet, under RESET_AFTER_S
    await pace.wait()
    await pace.wait()  # the third is due at 40 ms: already past, so it goes at once
    assert abs(now[0] - 0.05) < 1e-9
    await pace.wait()  # the fourth keeps the original schedule: 60 ms
    assert abs(now[0] - 0.06) < 1e-9
