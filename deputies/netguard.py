"""Address rules for every connection Deputies opens to a place a user named.

Callback URLs, remote repository URLs and anything else a user hands us are checked here, and
nowhere else: by default they may not reach loopback, link-local (cloud metadata lives there),
private, shared (CGNAT), multicast, reserved or unspecified addresses. An operator opens ranges on
purpose with an allow list (``DEPUTIES_CALLBACK_ALLOWED_NETWORKS``,
``DEPUTIES_REPOSITORY_ALLOWED_NETWORKS``), e.g. a self-hosted team calling internal services.

A check at submit time gives the user a clear 400; it is not enough on its own, because a name may
resolve elsewhere when we connect (DNS rebinding). ``guarded_client`` therefore checks the address
it actually connects to, at connect time, and never follows redirects or environment proxies.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable, Sequence
from urllib.parse import urlsplit

import httpcore
import httpx

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address

# Named so a refusal can say what the address is; the generic flags below catch the rest.
METADATA_ADDRESSES = {
    ipaddress.ip_address("169.254.169.254"),  # AWS, GCP, Azure, OpenStack
    ipaddress.ip_address("169.254.170.2"),  # AWS ECS task metadata
    ipaddress.ip_address("fd00:ec2::254"),  # AWS over IPv6
    ipaddress.ip_address("100.100.100.200"),  # Alibaba Cloud
}
SHARED_ADDRESS_SPACE = ipaddress.ip_network("100.64.0.0/10")  # CGNAT, not flagged private by ipaddress


class UnsafeAddress(ValueError):
    """A user-given address may not be used; the message says why and how to allow it."""


def parse_networks(value: str, name: str) -> tuple[Network, ...]:
    """A comma-separated list of CIDR ranges (or single addresses), for settings; ``name`` for errors."""
    networks = []
    for item in (part.strip() for part in value.split(",")):
        if not item:
            continue
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ValueError(f"{name}: {item!r} is not an IP network (e.g. 10.0.0.0/8 or ::1)") from None
    return tuple(networks)


def refusal(ip: Address, allowed: Iterable[Network] = ()) -> str:
    """Why ``ip`` may not be connected to, or "" when it may."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if any(ip in net for net in allowed if net.version == ip.version):
        return ""
    if ip in METADATA_ADDRESSES:
        kind = "a cloud metadata address"
    elif ip.is_loopback:
        kind = "a loopback address"
    elif ip.is_link_local:
        kind = "a link-local address"
    elif ip.is_unspecified:
        kind = "an unspecified address"
    elif ip.is_multicast:
        kind = "a multicast address"
    elif ip.version == 4 and ip in SHARED_ADDRESS_SPACE:
        kind = "a shared (carrier-grade NAT) address"
    elif ip.is_private:
        kind = "a private address"
    elif ip.is_reserved or not ip.is_global:
        kind = "a reserved address"
    else:
        return ""
    return f"{ip} is {kind}"


def resolve(host: str, port: int | None = None) -> list[Address]:
    """Every address ``host`` resolves to (an IP literal resolves to itself)."""
    host = host.strip("[]")
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise UnsafeAddress(f"cannot resolve {host!r}: {exc}") from None
    seen: list[Address] = []
    for info in infos:
        ip = ipaddress.ip_address(info[4][0].split("%", 1)[0])
        if ip not in seen:
            seen.append(ip)
    return seen


def check_host(host: str, port: int | None, allowed: Sequence[Network], setting: str) -> list[Address]:
    """Resolve ``host`` and refuse it unless every address is allowed (so one good record among
    bad ones does not let a round-robin name through). ``setting`` names the allow list."""
    if not host:
        raise UnsafeAddress("the address has no host")
    if host.startswith("-"):
        raise UnsafeAddress(f"{host!r} is not a host name")
    addresses = resolve(host, port)
    if not addresses:
        raise UnsafeAddress(f"{host!r} resolves to no address")
    for ip in addresses:
        why = refusal(ip, allowed)
        if why:
            shown = host if host.strip("[]") == str(ip) else f"{host} ({ip})"
            raise UnsafeAddress(
                f"{shown} is not allowed: {why.split(' is ', 1)[1]}; add its range to {setting} to allow it"
            )
    return addresses


def check_url(
    url: str,
    *,
    schemes: Sequence[str] = ("http", "https"),
    allowed: Sequence[Network] = (),
    setting: str = "DEPUTIES_CALLBACK_ALLOWED_NETWORKS",
    resolve_host: bool = True,
) -> None:
    """Refuse a URL whose scheme is not one of ``schemes`` or whose host is not allowed."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise UnsafeAddress(f"not a valid URL: {exc}") from None
    if parts.scheme.lower() not in schemes:
        raise UnsafeAddress(f"the scheme must be {' or '.join(schemes)}, not {parts.scheme or 'none'!r}")
    if not parts.hostname:
        raise UnsafeAddress("the URL has no host")
    if resolve_host:
        check_host(parts.hostname, port, allowed, setting)


class _GuardedBackend(httpcore.SyncBackend):
    """Connects only to addresses the allow rules accept, checked on the address actually used."""

    def __init__(self, allowed: Sequence[Network], setting: str) -> None:
        self.allowed, self.setting = tuple(allowed), setting

    def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):
        addresses = check_host(host, port, self.allowed, self.setting)
        last: Exception | None = None
        for ip in addresses:
            try:
                return super().connect_tcp(str(ip), port, timeout, local_address, socket_options)
            except httpcore.ConnectError as exc:
                last = exc
        raise last or httpcore.ConnectError(f"cannot connect to {host}")

    def connect_unix_socket(self, path, timeout=None, socket_options=None):
        raise UnsafeAddress("unix sockets are not allowed")


def guarded_client(
    allowed: Sequence[Network], setting: str, *, timeout: float = 10.0, **kwargs
) -> httpx.Client:
    """An httpx client for user-given URLs: addresses checked at connect time, no redirects, no
    proxies from the environment. A refused address raises ``UnsafeAddress`` from the request."""
    transport = httpx.HTTPTransport(retries=0)
    # httpx does not expose httpcore's network_backend; its pool is the transport's only pool
    # when no proxy is configured (trust_env=False below makes sure of that).
    transport._pool._network_backend = _GuardedBackend(allowed, setting)
    return httpx.Client(
        transport=transport, timeout=timeout, follow_redirects=False, trust_env=False, **kwargs
    )


def guarded_async_client(allowed: Sequence[Network], setting: str, *, timeout: float = 30.0, **kwargs):
    """The async twin of ``guarded_client`` for the ``mcp`` SDK, which speaks httpx2: the same
    connect-time address check (DNS resolution on a thread), no redirects, no environment proxies."""
    import anyio
    import httpcore2
    import httpx2

    class _GuardedAsyncBackend(httpcore2.AsyncNetworkBackend):
        def __init__(self) -> None:
            self.inner = httpcore2.AnyIOBackend()

        async def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):
            addresses = await anyio.to_thread.run_sync(check_host, host, port, tuple(allowed), setting)
            last: Exception | None = None
            for ip in addresses:
                try:
                    return await self.inner.connect_tcp(
                        str(ip),
                        port,
                        timeout=timeout,
                        local_address=local_address,
                        socket_options=socket_options,
                    )
                except httpcore2.ConnectError as exc:
                    last = exc
            raise last or httpcore2.ConnectError(f"cannot connect to {host}")

        async def connect_unix_socket(self, path, timeout=None, socket_options=None):
            raise UnsafeAddress("unix sockets are not allowed")

        async def sleep(self, seconds: float) -> None:
            await self.inner.sleep(seconds)

    transport = httpx2.AsyncHTTPTransport(retries=0, trust_env=False)
    transport._pool._network_backend = _GuardedAsyncBackend()  # see guarded_client
    return httpx2.AsyncClient(
        transport=transport,
        timeout=httpx2.Timeout(timeout),
        follow_redirects=False,
        trust_env=False,
        **kwargs,
    )
