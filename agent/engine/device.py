"""The device thread: one thread owns the device and runs all model work off the event loop.

Jobs that callers queue (a Voxtral step, tokenizing a prompt) run in order; between
them the thread runs the steps of the attached steppers (the batchers), which advance
every active stream together. Results go back to each call's event loop as they are
made; the loop never waits on the device.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

log = logging.getLogger(__name__)

_STOP = object()


class Stepper(Protocol):
    """Work the device thread advances whenever no job is waiting."""

    def has_work(self) -> bool: ...

    def step(self) -> None: ...


class DeviceThread:
    """The one thread that runs model work, in order: queued jobs first, then one step of
    each attached stepper, again and again; it sleeps when there is nothing to do.

    `busy_s` adds up the time spent working, so callers can tell model time from their own
    overhead."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._steppers: list[Stepper] = []
        self._lock = threading.Lock()
        self.busy_s = 0.0
        self._thread = threading.Thread(target=self._loop, name="device", daemon=True)
        self._stopped = False
        self._thread.start()

    def attach(self, stepper: Stepper) -> None:
        self._steppers.append(stepper)

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run fn(*args) on the device thread and return its result (or raise its error)."""
        return await asyncio.wrap_future(self.submit(fn, *args))

    async def open(self, fn: Callable[..., Any], *args: Any) -> Any:
        """run() for a function that starts something with a close() (a stream): if the
        caller is cancelled (barge-in, hang-up) before the result arrives, the result is
        closed when it does, so no stream is left running with nobody reading it."""
        future = self.submit(fn, *args)
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            if not future.cancel():  # already running (or done): close what it returns
                future.add_done_callback(_close_result)
            raise

    def submit(self, fn: Callable[..., Any], *args: Any) -> concurrent.futures.Future:
        if self._stopped:
            raise RuntimeError("the device thread has stopped")
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._jobs.put((fn, args, future))
        return future

    def _loop(self) -> None:
        while True:
            idle = not any(s.has_work() for s in self._steppers)
            try:
                job = self._jobs.get(block=idle)
            except queue.Empty:
                job = None
            while job is not None:
                if job is _STOP:
                    return
                self._run_job(*job)
                try:
                    job = self._jobs.get_nowait()  # every job queued so far goes before the next step
                except queue.Empty:
                    job = None
            for stepper in self._steppers:
                if stepper.has_work():
                    try:
                        self._timed(stepper.step)
                    except Exception:  # a stepper handles its own failures; never lose the thread
                        log.exception("device step failed")

    def _run_job(self, fn: Callable[..., Any], args: tuple, future: concurrent.futures.Future) -> None:
        if not future.set_running_or_notify_cancel():
            return  # the caller gave up waiting
        try:
            future.set_result(self._timed(fn, *args))
        except BaseException as e:
            future.set_exception(e)

    def _timed(self, fn: Callable[..., Any], *args: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(*args)
        finally:
            with self._lock:
                self.busy_s += time.perf_counter() - t0

    def shutdown(self) -> None:
        if not self._stopped:
            self._stopped = True
            self._jobs.put(_STOP)
            self._thread.join()


def _close_result(future: concurrent.futures.Future) -> None:
    if not future.cancelled() and future.exception() is None:
        future.result().close()
