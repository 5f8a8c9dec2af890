"""uvicorn, hardened: a deadline for a request's head, and a shutdown that drains first.

uvicorn closes idle keep-alive connections but gives a new connection forever to send its
request line and headers, so slow clients could hold connections open. And when its graceful
shutdown period runs out it cancels the handlers, cutting streams with no error event and
answering queued requests with a bare 500; here the runtime fails what is left first (an
error event and [DONE] on every stream, a 503 with an OpenAI error body for the rest), and
uvicorn's own timeout only lets those replies go out.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import uvicorn
from uvicorn.protocols.http.auto import AutoHTTPProtocol

FLUSH_S = 5  # after the drain, for failed requests' last bytes to go out


def header_timeout_protocol(timeout_s: float) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol class, closing a connection that has not sent a whole request
    head within `timeout_s` of connecting."""

    class Protocol(AutoHTTPProtocol):  # type: ignore[misc, valid-type]
        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._head_timer = self.loop.call_later(timeout_s, self._head_deadline)

        def _head_deadline(self) -> None:
            if self.cycle is None and not self.transport.is_closing():
                self.transport.close()  # nothing arrived in time: no reply is owed

        def connection_lost(self, exc: Exception | None) -> None:
            self._head_timer.cancel()
            super().connection_lost(exc)

    return Protocol


class DrainingServer(uvicorn.Server):
    """On SIGINT/SIGTERM: stop listening, `drain()` (the runtime's grace period and failing
    of what is left), then uvicorn's shutdown with only a short flush period."""

    def __init__(self, config: uvicorn.Config, drain: Callable[[], Awaitable[None]]) -> None:
        super().__init__(config)
        self._drain = drain

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        for server in self.servers:
            server.close()
        if not self.force_exit:
            await self._drain()
        await super().shutdown(sockets)
