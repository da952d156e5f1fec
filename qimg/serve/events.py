"""In-process job events: the worker thread publishes, async request handlers subscribe per job.

Event dicts have a `type`: "status" (job changed state), "progress" (a denoising step, maybe with a preview),
"partial" (a full-size partial image for OpenAI streaming) and "done" (terminal; carries the job and, in memory
only, the `outcome`: a result object or an exception). Transport (SSE) is the routes' business.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field


@dataclass(eq=False)
class Subscription:
    job_id: str
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    previews: bool = False  # wants live preview thumbnails (the /events stream and the web page)
    partials: int = 0  # wants this many full-size partial images (OpenAI streaming)


class EventBus:
    def __init__(self):
        self._lock = threading.Lock()
        self._subs: dict[str, list[Subscription]] = {}
        self._progress: dict[str, dict] = {}

    def subscribe(self, job_id: str, *, previews: bool = False, partials: int = 0) -> Subscription:
        """Call from a running event loop (a request handler)."""
        sub = Subscription(job_id, asyncio.get_running_loop(), previews=previews, partials=partials)
        with self._lock:
            self._subs.setdefault(job_id, []).append(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        with self._lock:
            subs = self._subs.get(sub.job_id, [])
            if sub in subs:
                subs.remove(sub)
            if not subs:
                self._subs.pop(sub.job_id, None)

    def wants_previews(self, job_id: str) -> bool:
        with self._lock:
            return any(s.previews for s in self._subs.get(job_id, []))

    def partials_wanted(self, job_id: str) -> int:
        with self._lock:
            return max((s.partials for s in self._subs.get(job_id, [])), default=0)

    def publish(self, job_id: str, event: dict) -> None:
        """Thread-safe; events reach each subscriber's queue in order."""
        if event.get("type") == "progress":
            self._progress[job_id] = {k: v for k, v in event.items() if k not in ("preview", "type")}
        elif event.get("type") == "done":
            self._progress.pop(job_id, None)
        with self._lock:
            subs = list(self._subs.get(job_id, []))
        for sub in subs:
            try:
                sub.loop.call_soon_threadsafe(sub.queue.put_nowait, event)
            except RuntimeError:  # that loop is closed: the subscriber is gone
                self.unsubscribe(sub)

    def subscribed(self) -> list[str]:
        """The jobs someone in this process waits on."""
        with self._lock:
            return list(self._subs)

    def progress(self, job_id: str) -> dict | None:
        """The last progress report of a running job (without the preview)."""
        return self._progress.get(job_id)
