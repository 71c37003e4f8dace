"""Stopping a tab's long job: its Stop button, the browser going away, the host's own Interrupt.

Each job asks ``should_stop()`` before every sampler step (or between batches, images, runs); the core
then raises :class:`~medical_diffusion.errors.Cancelled`. gradio 3.41's ``cancels=`` only drops the
event (the worker thread runs on), so the Stop button also sets the tab's flag, and a job run from
gradio's queue watches its websocket: when the browser closes it, the job stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from typing import Callable, Iterator

from medical_diffusion.training.progress import format_duration

log = logging.getLogger(__name__)

ShouldStop = Callable[[], bool]


class StopFlag:
    """The Stop button of one tab's jobs (like the webui's Interrupt: it stops the job that runs now).

    A job starts with :meth:`running`, which clears a stop asked for before it began.
    """

    def __init__(self) -> None:
        self._event = threading.Event()

    def stop(self) -> None:
        """Ask the running job to stop at its next step (the Stop button's handler)."""
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()

    @contextlib.contextmanager
    def running(self, *also: ShouldStop | None, host_session=None, job: str = "job") -> Iterator[ShouldStop]:
        """Around one job: yields ``should_stop()``, True once Stop was pressed, the browser that
        started the job has gone (when run from gradio's queue), one of ``also`` says so, or the host
        says so (``host_session(job)``: :attr:`UIContext.job_session`, the webui's Interrupt)."""
        self._event.clear()
        checks = [self._event.is_set] + [c for c in also if c is not None]
        session = host_session(job) if host_session is not None else contextlib.nullcontext(None)
        with session as host_stop, watch_browser() as gone:
            checks += [c for c in (host_stop, gone) if c is not None]
            yield lambda: any(check() for check in checks)


def _queue_event():
    """gradio's queue event of the handler running in this thread, and the server's event loop; None
    outside gradio's queue (a test, a direct call, gradio without a queue)."""
    try:
        from gradio.context import thread_data
    except ImportError:  # pragma: no cover
        return None
    blocks, event_id = getattr(thread_data, "blocks", None), getattr(thread_data, "event_id", None)
    queue = getattr(blocks, "_queue", None)
    if queue is None or event_id is None:
        return None
    for job in list(getattr(queue, "active_jobs", None) or ()):
        for event in job or ():
            if getattr(event, "_id", None) == event_id and getattr(event, "websocket", None) is not None:
                try:
                    import anyio.from_thread

                    loop = anyio.from_thread.run_sync(asyncio.get_running_loop)
                except Exception:  # noqa: BLE001 - not an anyio worker thread: no loop to watch from
                    return None
                return event, loop
    return None


async def _wait_for_close(websocket, gone: threading.Event) -> None:
    """Receive on the event's websocket (the browser sends nothing while its job runs) until it closes."""
    try:
        while True:
            message = await websocket.receive()
            if message.get("type") == "websocket.disconnect":
                break
    except asyncio.CancelledError:
        raise
    except Exception:  # noqa: BLE001 - a closed or broken socket: the browser has gone
        pass
    gone.set()


@contextlib.contextmanager
def watch_browser() -> Iterator[ShouldStop | None]:
    """Inside a handler run by gradio's queue: yields ``gone()``, True once the browser's websocket for
    this event has closed (tab closed, page reloaded, event cancelled); None elsewhere."""
    found = _queue_event()
    if found is None:
        yield None
        return
    event, loop = found
    gone = threading.Event()
    watcher = asyncio.run_coroutine_threadsafe(_wait_for_close(event.websocket, gone), loop)

    told = []

    def is_gone() -> bool:
        if gone.is_set() and not told:
            told.append(True)
            log.info("the browser has gone; stopping its job")
        return gone.is_set()

    try:
        yield is_gone
    finally:
        watcher.cancel()


class StepClock:
    """An ETA from this job's own pace: ``text(done, total)`` -> ``"12/100 steps, about 8 s left"``."""

    def __init__(self, unit: str = "steps", clock: Callable[[], float] = time.monotonic):
        self.unit, self.clock = unit, clock
        self.start: float | None = None
        self.first_done = 0

    def text(self, done: float, total: float) -> str:
        now = self.clock()
        if self.start is None:  # the pace is measured from the first report on (model loading excluded)
            self.start, self.first_done = now, done
        shown = f"{done:g}/{total:g} {self.unit}"
        rate_done = done - self.first_done
        if rate_done <= 0 or done >= total:
            return shown
        left = (now - self.start) / rate_done * (total - done)
        return f"{shown}, about {format_duration(left)} left"


def stopping_progress(report: Callable[[str, int, int], None] | None,
                      should_stop: ShouldStop) -> Callable[[str, int, int], None]:
    """A ``progress(stage, done, total)`` for the evaluation core (FID features, bootstrap, classifier
    steps) that stops the work with :class:`Cancelled` at its next batch, repetition or step once
    ``should_stop()``; otherwise it passes the report on."""
    from medical_diffusion.errors import Cancelled

    def progress(stage: str, done: int, total: int) -> None:
        if should_stop():
            raise Cancelled(f"stopped during {stage} ({done}/{total})")
        if report is not None:
            report(stage, done, total)

    return progress


STOPPED = "**Stopped.**"


def add_stop_button(button, flag: StopFlag, events: list, status=None) -> None:
    """Wire a Stop button: it sets ``flag`` (the worker thread sees it at its next step), cancels
    ``events`` (gradio drops them and closes their websockets) and says so in ``status``. It runs
    outside the queue, so Stop does not wait behind the job it stops."""
    def stop():
        flag.stop()
        return STOPPED if status is not None else None

    button.click(stop, None, status, queue=False, cancels=events)
