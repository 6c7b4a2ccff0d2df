"""Live output of a running task on core NATS (`dtf.log.<submitter>.<task_id>.<worker_id>`), batched so a chatty task sends a
few messages a second rather than one per write.

`append` is synchronous (the runner's output callback); a background task publishes what has gathered
every `interval` seconds, in messages of at most `max_message` bytes. If more than `max_buffer` bytes
pile up between flushes (a disconnected client, a task printing very fast) the oldest are dropped and
a `[dtf] ... dropped` marker says how many: the live view is best-effort, the stored log is complete.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from nats.aio.client import Client

log = logging.getLogger("dtf.worker.livelog")

INTERVAL_S = 0.2
MAX_MESSAGE = 64 * 1024
MAX_BUFFER = 1024 * 1024


class LiveLog:
    def __init__(self, nc: Client, subject: str, *, interval: float = INTERVAL_S,
                 max_message: int = MAX_MESSAGE, max_buffer: int = MAX_BUFFER) -> None:
        self.nc = nc
        self.subject = subject
        self.interval = interval
        self.max_message = max_message
        self.max_buffer = max_buffer
        self._buffer = bytearray()
        self._dropped = 0
        self._task: asyncio.Task[None] | None = None

    def append(self, chunk: bytes) -> None:
        self._buffer += chunk
        excess = len(self._buffer) - self.max_buffer
        if excess > 0:
            del self._buffer[:excess]
            self._dropped += excess

    def start(self) -> LiveLog:
        self._task = asyncio.create_task(self._run(), name=f"livelog {self.subject}")
        return self

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            await self.flush()

    async def flush(self) -> None:
        if self._dropped:
            marker = f"\n[dtf] {self._dropped} bytes of live output dropped\n".encode()
            self._dropped = 0
            await self._send(marker)
        while self._buffer:
            piece = bytes(self._buffer[: self.max_message])
            del self._buffer[: self.max_message]
            await self._send(piece)

    async def _send(self, data: bytes) -> None:
        try:
            await self.nc.publish(self.subject, data)
        except Exception as exc:  # noqa: BLE001 - best-effort: the live view must not break the task
            log.debug("live log publish to %s failed: %s", self.subject, exc)

    async def aclose(self) -> None:
        """Stop the background flusher and send what is left."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self.flush()
