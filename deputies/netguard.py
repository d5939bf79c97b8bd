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
import re
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
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


def _unmapped(ip: Address) -> Address:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def allowed_by(ip: Address, allowed: Iterable[Network]) -> bool:
    """Whether ``ip`` is inside one of the operator's allowed ranges."""
    ip = _unmapped(ip)
    return any(ip in net for net in allowed if net.version == ip.version)


def refusal(ip: Address, allowed: Iterable[Network] = ()) -> str:
    """Why ``ip`` may not be connected to, or "" when it may."""
    ip = _unmapped(ip)
    if allowed_by(ip, allowed):
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
    from django.conf import settings

    if not getattr(settings, "RESOLVE_NAMES", True):
        # No DNS: IP literals and the hosts file only (locked-down installs; the test suite, whose
        # traffic must stay on loopback, and a DNS query would not).
        found = hosts_file_addresses(host)
        if not found:
            raise UnsafeAddress(
                f"cannot resolve {host!r}: DEPUTIES_RESOLVE_NAMES=false allows IP addresses and "
                f"names in {HOSTS_FILE} only"
            )
        return found
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


HOSTS_FILE = "/etc/hosts"


def hosts_file_addresses(host: str) -> list[Address]:
    """The addresses ``host`` has in the hosts file, in file order."""
    found: list[Address] = []
    try:
        with open(HOSTS_FILE, encoding="utf-8", errors="replace") as fh:
            lines = fh.read().splitlines()
    except OSError:
        lines = []
    for line in lines:
        fields = line.split("#", 1)[0].split()
        if len(fields) >= 2 and host.lower() in (name.lower() for name in fields[1:]):
            try:
                ip = ipaddress.ip_address(fields[0].split("%", 1)[0])
            except ValueError:
                continue
            if ip not in found:
                found.append(ip)
    return found


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


# --- git remotes ------------------------------------------------------------------------------

GIT_PORTS = {"https": 443, "http": 80, "ssh": 22, "git": 9418}
# A DNS name (labels of letters, digits, "-" and "_", not starting with "-") or an IP literal.
_HOST_NAME = re.compile(r"^(?!-)[A-Za-z0-9_-]{1,63}(?:\.(?!-)[A-Za-z0-9_-]{1,63})*\.?$")
_USER = re.compile(r"^[A-Za-z0-9._~%+-]{1,100}$")
# scp-like syntax, as git reads it: [user@]host:path, with no slash before the first colon.
# git's remote-helper syntax, ``transport::address`` (``ext::sh -c ...`` runs a command).
_HELPER = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*::")
_SCP_LIKE = re.compile(r"^(?:(?P<user>[^@/:]+)@)?(?P<host>\[[0-9A-Fa-f:.]+\]|[^@/:\[\]]+):(?P<path>.*)$")


@dataclass(frozen=True)
class GitRemote:
    """Where a git remote URL connects: enough for the address rules and for pinning the connection."""

    scheme: str  # https, http, ssh or git; scp-like ``user@host:path`` is ssh
    host: str  # lower case, IPv6 without brackets
    port: int | None
    user: str
    path: str

    @property
    def connect_port(self) -> int:
        return self.port or GIT_PORTS[self.scheme]

    @property
    def host_is_address(self) -> bool:
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            return False
        return True


def parse_git_remote(url: str) -> GitRemote:
    """Split a remote repository URL the way git would read it, refusing what git and Python might
    read differently (backslashes, several ``@``, odd host characters) and anything option-like
    (``ssh://-oProxyCommand=...``), so the host checked is the host git connects to."""
    if _HELPER.match(url):
        raise UnsafeAddress("git's transport::address syntax is not accepted")
    if "://" not in url and not _SCP_LIKE.match(url):
        raise UnsafeAddress(
            "not a git URL (https://host/path, ssh://host/path, git://host/path or user@host:path)"
        )
    if any(c.isspace() or ord(c) < 32 or ord(c) == 127 or c == "\\" for c in url):
        raise UnsafeAddress("the URL contains spaces, control characters or backslashes")
    if "://" in url:
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise UnsafeAddress(f"not a valid URL: {exc}") from None
        scheme, netloc = parts.scheme.lower(), parts.netloc
        if netloc.count("@") > 1:
            raise UnsafeAddress("the URL has more than one '@' before its host")
        if parts.password is not None:
            raise UnsafeAddress(
                "the URL contains a password; give the worker's git its credentials (a credential "
                "helper or an SSH key), never in the URL, which every team member and event shows"
            )
        host, user, path = (parts.hostname or ""), (parts.username or ""), parts.path
        if netloc.rpartition("@")[2].startswith("-"):
            host = "-" + host.lstrip("-")  # refused below, with its own words
    else:
        match = _SCP_LIKE.match(url)
        assert match is not None  # checked above
        scheme, port = "ssh", None
        host, user, path = match["host"].strip("[]").lower(), match["user"] or "", match["path"]
    if not host:
        raise UnsafeAddress("the URL has no host")
    if host.startswith("-") or user.startswith("-"):
        raise UnsafeAddress(
            f"{(user + '@' if user else '') + host!r} looks like a command-line option, not a host"
        )
    if user and not _USER.match(user):
        raise UnsafeAddress(f"{user!r} is not a user name")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if not _HOST_NAME.match(host):
            raise UnsafeAddress(f"{host!r} is not a host name") from None
    if path.startswith("-"):
        raise UnsafeAddress(f"the path {path!r} looks like a command-line option")
    if not path.strip("/"):
        raise UnsafeAddress("the URL names no repository path")
    return GitRemote(scheme=scheme, host=host, port=port, user=user, path=path)


def check_git_remote(
    url: str,
    *,
    allowed: Sequence[Network],
    setting: str = "DEPUTIES_REPOSITORY_ALLOWED_NETWORKS",
    schemes: Sequence[str] = ("https", "ssh", "git"),
    allowed_network_schemes: Sequence[str] = ("http",),
) -> tuple[GitRemote, list[Address]]:
    """Parse a remote repository URL and check where it connects: the remote and the addresses it
    resolves to now. ``allowed_network_schemes`` (plain http) are accepted only when every address
    is inside ``allowed``: unencrypted fetches stay inside networks the operator named."""
    remote = parse_git_remote(url)
    if remote.scheme not in (*schemes, *allowed_network_schemes):
        names = " or ".join(schemes)
        raise UnsafeAddress(f"the scheme must be {names} (or user@host:path), not {remote.scheme!r}")
    addresses = check_host(remote.host, remote.connect_port, allowed, setting)
    if remote.scheme in allowed_network_schemes and not all(allowed_by(ip, allowed) for ip in addresses):
        raise UnsafeAddress(f"plain {remote.scheme} is accepted only for hosts inside {setting}; use https")
    return remote, addresses


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
