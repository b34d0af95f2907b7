"""Which result image URLs a provider adapter may fetch: https from its allowed hosts that resolve
only to public addresses, or exactly the origin of a configured provider base URL. Every redirect
hop is checked again by the caller (providers/_hosted.py)."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from yarl import URL

if TYPE_CHECKING:
    from fluxport.settings import Settings

__all__ = ["DEFAULT_PORTS", "DownloadGuard", "RefusedURL", "Resolver", "origin_of"]

Resolver = Callable[[str, int], Awaitable[list[str]]]
DEFAULT_PORTS = {"http": 80, "https": 443}


class RefusedURL(ValueError):
    """A result image URL the download policy does not allow (the message says why)."""


async def _resolve(host: str, port: int) -> list[str]:
    """Every address `host` resolves to, looked up off the event loop."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


def _public(address: str) -> bool:
    """True for a globally routable unicast address (not private, loopback, link-local, ...)."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # drop an IPv6 zone id
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not (
        ip.is_multicast or ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_reserved
    )


@dataclass(frozen=True)
class DownloadGuard:
    """Which result image URLs may be fetched: https from `hosts` (a domain and its subdomains) that
    resolve only to public addresses; or exactly the scheme, host and port of a configured provider
    base URL (`trusted`: that is how loopback emulators work in tests; the operator chose them)."""

    hosts: tuple[str, ...]
    trusted: frozenset[tuple[str, str, int]] = frozenset()
    resolver: Resolver = field(default=_resolve, compare=False)
    max_redirects: int = 3

    @classmethod
    def of(cls, hosts: Iterable[str], provider_urls: Iterable[str] = (), **kw: Any) -> DownloadGuard:
        domains = tuple(h.strip().lower().rstrip(".") for h in hosts if h.strip().strip("."))
        trusted = set()
        for raw in provider_urls:
            with contextlib.suppress(TypeError, ValueError):
                url = URL(raw)
                if url.scheme in DEFAULT_PORTS and url.host:
                    trusted.add(origin_of(url))
        return cls(domains, frozenset(trusted), **kw)

    @classmethod
    def for_provider(cls, settings: Settings, hosts: Iterable[str], base_url: str) -> DownloadGuard:
        """A provider's guard: FLUXPORT_DOWNLOAD_HOSTS if set, else the provider's own image hosts;
        and its configured base URL as trusted."""
        chosen = settings.download_hosts if settings.download_hosts is not None else hosts
        return cls.of(chosen, (base_url,))

    def allowed_host(self, host: str) -> bool:
        host = host.lower().rstrip(".")
        return any(host == d or host.endswith("." + d) for d in self.hosts)

    async def check(self, url: str | URL) -> URL:
        """The parsed URL when it may be fetched; RefusedURL otherwise."""
        try:
            parsed = url if isinstance(url, URL) else URL(url)
            host = parsed.host
        except (TypeError, ValueError) as exc:
            raise RefusedURL(f"malformed URL ({exc})") from None
        if parsed.scheme not in DEFAULT_PORTS or not host:
            raise RefusedURL(f"scheme {parsed.scheme!r} is not https")
        if parsed.user or parsed.password:
            raise RefusedURL("credentials in the URL")
        if origin_of(parsed) in self.trusted:
            return parsed
        if parsed.scheme != "https":
            raise RefusedURL("only https downloads are allowed")
        if not self.allowed_host(host):
            raise RefusedURL(f"host {host!r} is not an allowed download host")
        port = parsed.port or 443
        try:
            addresses = await self.resolver(host, port)
        except OSError as exc:
            raise RefusedURL(f"host {host!r} does not resolve ({exc})") from None
        if not addresses:
            raise RefusedURL(f"host {host!r} does not resolve")
        for address in addresses:
            try:
                public = _public(address)
            except ValueError:
                public = False
            if not public:
                raise RefusedURL(f"host {host!r} resolves to the non-public address {address}")
        return parsed


def origin_of(url: URL) -> tuple[str, str, int]:
    host = (url.host or "").lower().rstrip(".")
    return url.scheme, host, url.port or DEFAULT_PORTS.get(url.scheme, 0)
