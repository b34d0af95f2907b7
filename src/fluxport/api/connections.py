"""Slow and greedy clients, cut off at the connection: a header timeout, a body read timeout and a
cap on one client's open connections.

uvicorn times out idle keep-alive connections but not a request whose headers or body trickle in,
and it counts no connections per client: fifty clients sending a header byte a second hold fifty
sockets (and file descriptors) for as long as they like. `guarded_http_protocol` returns uvicorn's
httptools protocol with three additions, each answered the way an HTTP client understands:

- the request line and headers must arrive within `header_timeout_s` of the connection opening (or,
  on a kept-alive connection, of the request's first byte): else 408 and the connection is closed;
- once the headers are in, the body may pause at most `body_timeout_s` between two reads (time
  spent with reading paused because the application is busy does not count): else 408 and close;
- one client address may hold at most `max_per_client` connections: the next one is answered 429
  with Retry-After and closed at once, before anything is read. Addresses of trusted proxies are
  not capped (every client behind a load balancer shares its address); the proxy caps its clients.

The 408 and 429 bodies are OpenAI-shaped errors naming the setting that decided them.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from fluxport.settings import Settings

__all__ = ["ConnectionLimits", "guarded_http_protocol"]

logger = logging.getLogger("fluxport.connections")

_Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    """What one connection may take; 0 turns a limit off."""

    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    max_per_client: int = 100
    exempt: tuple[str, ...] = ()  # trusted proxies: IPs, networks, or "*"

    def exempts(self, host: str) -> bool:
        if not self.exempt:
            return False
        if "*" in self.exempt:
            return True
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return host in self.exempt
        return any(address in network for network in _networks(self.exempt))


def _networks(entries: Sequence[str]) -> list[_Network]:
    out: list[_Network] = []
    for entry in entries:
        try:
            out.append(ipaddress.ip_network(entry, strict=False))
        except ValueError:
            continue  # a host name: compared as text in `exempts`
    return out


def _error_response(status: int, reason: str, message: str, code: str, extra_headers: bytes = b"") -> bytes:
    body = json.dumps(
        {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}}
    ).encode()
    return (
        f"HTTP/1.1 {status} {reason}\r\n".encode()
        + b"content-type: application/json\r\n"
        + b"content-length: "
        + str(len(body)).encode()
        + b"\r\n"
        + extra_headers
        + b"connection: close\r\n\r\n"
        + body
    )


_HEADER_TIMEOUT = _error_response(
    408,
    "Request Timeout",
    "The request headers did not arrive in time (FLUXPORT_HEADER_TIMEOUT_S); the connection is closed.",
    "request_timeout",
)
_BODY_TIMEOUT = _error_response(
    408,
    "Request Timeout",
    "The request body stopped arriving (FLUXPORT_BODY_TIMEOUT_S); the connection is closed.",
    "request_timeout",
)
_TOO_MANY = _error_response(
    429,
    "Too Many Requests",
    "Too many open connections from this client (FLUXPORT_MAX_CONNECTIONS_PER_CLIENT); "
    "reuse a kept-alive connection or close some.",
    "too_many_connections",
    b"retry-after: 1\r\n",
)


def guarded_http_protocol(limits: ConnectionLimits) -> type[asyncio.Protocol]:
    """uvicorn's httptools protocol with `limits` applied; pass it as `uvicorn.run(http=...)`."""
    open_per_client: Counter[str] = Counter()  # shared by every connection of this server

    class GuardedHttpToolsProtocol(HttpToolsProtocol):
        _counted: str | None = None
        _timer: asyncio.TimerHandle | None = None
        _reading_body = False

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            host = self.client[0] if self.client else None
            if limits.max_per_client and host is not None and not limits.exempts(host):
                open_per_client[host] += 1
                self._counted = host
                if open_per_client[host] > limits.max_per_client:
                    logger.warning(
                        "refused a connection from %s: %d open (FLUXPORT_MAX_CONNECTIONS_PER_CLIENT=%d)",
                        host,
                        open_per_client[host] - 1,
                        limits.max_per_client,
                    )
                    self._reject(_TOO_MANY)
                    return
            self._arm(limits.header_timeout_s, self._header_timed_out)

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            if self._counted is not None:
                open_per_client[self._counted] -= 1
                if open_per_client[self._counted] <= 0:
                    del open_per_client[self._counted]
                self._counted = None
            super().connection_lost(exc)

        # Parser callbacks (httptools calls them from data_received)

        def on_message_begin(self) -> None:
            super().on_message_begin()
            if self._timer is None:  # a request on a kept-alive connection: its headers' clock starts
                self._arm(limits.header_timeout_s, self._header_timed_out)

        def on_headers_complete(self) -> None:
            self._disarm()
            super().on_headers_complete()
            self._reading_body = True
            self._arm(limits.body_timeout_s, self._body_timed_out)

        def on_body(self, body: bytes) -> None:
            super().on_body(body)
            self._arm(limits.body_timeout_s, self._body_timed_out)

        def on_message_complete(self) -> None:
            self._reading_body = False
            self._disarm()
            super().on_message_complete()

        # Timers

        def _arm(self, delay_s: float, callback: Any) -> None:
            self._disarm()
            if delay_s > 0 and not self.transport.is_closing():
                self._timer = self.loop.call_later(delay_s, callback)

        def _disarm(self) -> None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

        def _header_timed_out(self) -> None:
            self._timer = None
            logger.info("closed a connection from %s: headers too slow", self.client and self.client[0])
            self._reject(_HEADER_TIMEOUT)

        def _body_timed_out(self) -> None:
            self._timer = None
            if not self._reading_body:
                return
            if self.flow.read_paused:  # we stopped reading (the application is busy), not the client
                self._arm(limits.body_timeout_s, self._body_timed_out)
                return
            logger.info("closed a connection from %s: body too slow", self.client and self.client[0])
            cycle = self.cycle
            if cycle is not None and not cycle.response_started:
                cycle.keep_alive = False
                self._reject(_BODY_TIMEOUT)
            else:
                self.transport.close()

        def _reject(self, response: bytes) -> None:
            if not self.transport.is_closing():
                self.transport.write(response)
                self.transport.close()

    return GuardedHttpToolsProtocol


def limits_from_settings(settings: Settings) -> ConnectionLimits:
    return ConnectionLimits(
        header_timeout_s=settings.header_timeout_s,
        body_timeout_s=settings.body_timeout_s,
        max_per_client=settings.max_connections_per_client,
        exempt=tuple(settings.trusted_proxies),
    )


_from_settings: type[asyncio.Protocol] | None = None


def __getattr__(name: str) -> type[asyncio.Protocol]:
    """`SettingsGuardedProtocol`: the guarded protocol with the limits of this process's settings,
    as an import string (`fluxport.api.connections:SettingsGuardedProtocol`) for uvicorn's worker
    processes, which are started afresh and cannot be handed a class built in the parent."""
    global _from_settings
    if name != "SettingsGuardedProtocol":
        raise AttributeError(name)
    if _from_settings is None:
        _from_settings = guarded_http_protocol(limits_from_settings(Settings()))
    return _from_settings
