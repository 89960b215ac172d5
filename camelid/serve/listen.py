"""The network side of `camelid serve`: the listening socket, bound before anything loads, and uvicorn's
HTTP/1.1 protocol with a deadline for request headers."""

from __future__ import annotations

import ipaddress
import socket

from uvicorn.protocols.http.h11_impl import H11Protocol

from camelid.errors import CamelidError

# uvicorn closes idle keep-alive connections, but not one whose request headers never finish arriving:
# enough of those would hold every file descriptor.
HEADER_SECONDS = 10.0
KEEP_ALIVE_SECONDS = 5
LOOPBACK_NAMES = ["127.0.0.1", "localhost", "::1"]


def listening_socket(host: str, port: int) -> socket.socket:
    if not 1 <= port <= 65535:
        raise CamelidError(f"--port {port}: must be in 1..65535")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, UnicodeError) as exc:
        raise CamelidError(f"--host {host!r}: not an address or a host name this machine can resolve ({exc})") \
            from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise CamelidError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


def allowed_hosts(host: str, extra: list[str]) -> list[str]:
    """The Host header values to answer: the bound address (and this machine's loopback names when it is
    one), plus any the user names. A wildcard bind answers any host, as the user chose to be reachable."""
    if "*" in extra:
        return ["*"]
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return [host, *extra]
    if ip.is_unspecified:
        return ["*"]
    return [host, *(LOOPBACK_NAMES if ip.is_loopback else []), *extra]


class HeaderTimeoutH11(H11Protocol):
    """Closes a connection whose request headers have not all arrived within HEADER_SECONDS of its first
    byte or of the previous response."""

    def connection_made(self, transport):
        super().connection_made(transport)
        self._header_timer = None
        self._arm()

    def data_received(self, data: bytes):
        super().data_received(data)
        if self._awaiting_headers():
            if self._header_timer is None:
                self._arm()
        else:
            self._disarm()

    def on_response_complete(self):
        super().on_response_complete()
        self._disarm()  # uvicorn's keep-alive timer takes over until the next request's first bytes

    def connection_lost(self, exc):
        self._disarm()
        super().connection_lost(exc)

    def _awaiting_headers(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def _arm(self):
        self._header_timer = self.loop.call_later(HEADER_SECONDS, self._headers_too_slow)

    def _disarm(self):
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self):
        self._header_timer = None
        if self._awaiting_headers() and not self.transport.is_closing():
            self.transport.close()
