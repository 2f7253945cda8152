"""The network half of the SSRF boundary: which addresses an image download may connect to.

Why hand-written: requests and urllib3 have no address policy (no hook that says "refuse private
addresses"), and a check done before the request (resolve, check, then let urllib3 resolve again)
is defeated by DNS rebinding. So the connection class below resolves the host itself, checks every
address, and connects to exactly the addresses it checked. Proxies (which would connect elsewhere)
and cookies (which would carry one host's session to another) are switched off on the session.
Every socket joins the wall-clock deadline of the fetch that uses it (:mod:`backend.core.images.deadline`).
"""

from __future__ import annotations

import http.cookiejar
import ipaddress
import socket
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import ConnectTimeoutError, NameResolutionError, NewConnectionError

from backend.core.images.deadline import current_deadline
from backend.core.images.errors import ImageError

_NAT64 = ipaddress.ip_network("64:ff9b::/96")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Origin = tuple[str, str, int]
Guard = Callable[[str, str, int, IPAddress], bool]


def is_public(ip: IPAddress) -> bool:
    """True for globally routable unicast addresses; v4 embedded in v6 is judged as v4."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        elif ip.sixtofour is not None:
            ip = ip.sixtofour
        elif ip.teredo is not None:
            return False
        elif ip in _NAT64:
            ip = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return ip.is_global and not (ip.is_multicast or ip.is_reserved or ip.is_unspecified
                                 or ip.is_loopback or ip.is_link_local or ip.is_private)


def address_guard(*, allow_private: bool, trusted_origin: Origin | None) -> Guard:
    """The connection-time rule: public addresses only, except for the trusted origin (Label
    Studio, which usually runs next door) or when private addresses are allowed outright."""

    def allowed(scheme: str, host: str, port: int, ip: IPAddress) -> bool:
        if allow_private or (scheme, host, port) == trusted_origin:
            return True
        return is_public(ip)

    return allowed


def origin(url: str) -> Origin | None:
    """(scheme, host, port) of an http(s) URL, default ports filled in; None for anything else."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        return None
    try:
        port = parts.port or (443 if scheme == "https" else 80)
    except ValueError:
        return None
    return scheme, parts.hostname.lower(), port


def redact(url: str) -> str:
    """URL for messages and logs: no userinfo, no query (presigned signatures), no data payload."""
    if url.startswith("data:"):
        return url[:30] + "..."
    parts = urlsplit(url)
    netloc = parts.netloc.rpartition("@")[2]
    shown = f"{parts.scheme}://{netloc}{parts.path}" if parts.scheme else parts.path
    return shown + ("?..." if parts.query else "")


#: getaddrinfo cannot be interrupted, so a lookup under a deadline runs on one of these threads and the
#: fetch stops waiting when its deadline passes. A hung resolver then holds at most this many threads;
#: later lookups queue behind them and end at their own deadlines.
RESOLVER_THREADS = 4
_resolver = ThreadPoolExecutor(max_workers=RESOLVER_THREADS, thread_name_prefix="image-dns")


def resolve(name: str, port: int, timeout: float | None) -> list[tuple[Any, ...]]:
    """``getaddrinfo`` for a TCP connection, given up after ``timeout`` seconds (TimeoutError); None waits."""
    if timeout is None:
        return socket.getaddrinfo(name, port, type=socket.SOCK_STREAM)
    if timeout <= 0:
        raise TimeoutError(name)
    future = _resolver.submit(socket.getaddrinfo, name, port, type=socket.SOCK_STREAM)
    try:
        return future.result(timeout=timeout)
    except FutureTimeout:
        future.cancel()  # still queued: never runs; running: its answer is dropped
        raise TimeoutError(name) from None


class _GuardedConnectionMixin:
    """Resolves the host itself, refuses if any address is not allowed, then connects to exactly
    the addresses it checked (the TLS server name and Host header keep the original name)."""

    guard: Guard
    scheme: str

    def _new_conn(self) -> socket.socket:
        name: str = self._dns_host  # type: ignore[attr-defined]
        port: int = self.port  # type: ignore[attr-defined]
        fetch = current_deadline()
        try:
            infos = resolve(name, port, None if fetch is None else fetch.remaining())
        except socket.gaierror as exc:
            raise NameResolutionError(name, self, exc) from exc  # type: ignore[arg-type]
        except TimeoutError:
            raise ConnectTimeoutError(self, f"resolving {name} outlived the fetch deadline") from None  # type: ignore[arg-type]
        addresses = list(dict.fromkeys(info[4][0] for info in infos))
        host = name.strip("[]").lower()
        for address in addresses:
            if not self.guard(self.scheme, host, port, ipaddress.ip_address(address.split("%")[0])):
                raise ImageError("forbidden_url", f"{host} resolves to a non-public address ({address})")
        last: Exception | None = None
        for address in addresses:
            if fetch is not None:  # several addresses must not multiply the fetch's deadline
                if fetch.remaining() <= 0:
                    break
                if isinstance(self.timeout, (int, float)):  # type: ignore[attr-defined]
                    self.timeout = min(self.timeout, fetch.remaining())  # type: ignore[attr-defined]
            self._dns_host = address  # type: ignore[attr-defined]
            try:
                sock = super()._new_conn()  # type: ignore[misc]
            except (NewConnectionError, ConnectTimeoutError) as exc:
                last = exc
                continue
            finally:
                self._dns_host = name  # type: ignore[attr-defined]
            if fetch is not None:
                fetch.watch(sock)  # TLS handshake and reads from here on end at the deadline
                self._watched_by = fetch
            return sock
        raise last or ConnectTimeoutError(self, f"connecting to {host} outlived the fetch deadline")  # type: ignore[arg-type]

    def request(self, *args: Any, **kwargs: Any) -> Any:
        """A pooled keep-alive connection reused by another fetch joins that fetch's deadline."""
        fetch = current_deadline()
        sock = getattr(self, "sock", None)
        if fetch is not None and sock is not None and getattr(self, "_watched_by", None) is not fetch:
            fetch.watch(sock)
            self._watched_by = fetch
        return super().request(*args, **kwargs)  # type: ignore[misc]


class _GuardedAdapter(HTTPAdapter):
    """A requests adapter whose connection pools use the guarded connections above."""

    def __init__(self, guard: Guard, **kwargs: Any) -> None:
        self._guard = guard
        super().__init__(**kwargs)

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        guard = staticmethod(self._guard)
        http_conn = type("GuardedHTTPConnection", (_GuardedConnectionMixin, HTTPConnection),
                         {"guard": guard, "scheme": "http"})
        https_conn = type("GuardedHTTPSConnection", (_GuardedConnectionMixin, HTTPSConnection),
                          {"guard": guard, "scheme": "https"})
        self.poolmanager.pool_classes_by_scheme = {
            "http": type("GuardedHTTPPool", (HTTPConnectionPool,), {"ConnectionCls": http_conn}),
            "https": type("GuardedHTTPSPool", (HTTPSConnectionPool,), {"ConnectionCls": https_conn}),
        }

    def proxy_manager_for(self, *args: Any, **kwargs: Any) -> Any:
        raise ImageError("forbidden_url", "proxies are not used for image downloads")


class _NoCookies(http.cookiejar.DefaultCookiePolicy):
    """A shared session must not carry one host's cookies (e.g. a LS session) to requests."""

    def set_ok(self, cookie: http.cookiejar.Cookie, request: Any) -> bool:
        return False

    def return_ok(self, cookie: http.cookiejar.Cookie, request: Any) -> bool:
        return False


def guarded_session(guard: Guard) -> requests.Session:
    """A requests session whose every connection passes ``guard``; no env proxies, no .netrc, no
    cookies. Thread-safe for simple GETs (its connection pools are)."""
    session = requests.Session()
    session.trust_env = False  # no env proxies (they bypass the address check), no .netrc
    session.cookies.set_policy(_NoCookies())
    session.headers["Accept"] = "image/*,*/*;q=0.8"
    adapter = _GuardedAdapter(guard, pool_connections=16, pool_maxsize=32, max_retries=0)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session
