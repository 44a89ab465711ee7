"""Who may drive the studio: only the user's own browser tab (or a client given the secret), on this machine.

Every request is checked before any work, as Jupyter does:
- the secret: a random token made at each start and printed in the address (`/?token=...`). The page opened with it
  gets it as a cookie (HttpOnly, SameSite=Strict, named after the port) that the browser sends with every API call
  of that page and with no other site's requests; other clients send it in the `X-Lmtune-Token` header;
- `Host`: this machine's names (localhost, 127.0.0.1, [::1]) or the bound address, with the studio's port. A page
  whose DNS name was rebound to 127.0.0.1 is same-origin with itself, not with the studio: it sends its own name;
- `Origin` of a POST (browsers always send one): the studio's own, so a cross-site form or fetch is refused even
  when it guessed nothing else.
Paths a request names (a run's `dir`, a launch's `output_dir`) must lie under the runs root; request bodies are
at most `MAX_BODY` bytes.
"""

from __future__ import annotations

import hmac
import secrets
from dataclasses import dataclass, field
from http.cookies import CookieError, SimpleCookie
from pathlib import Path
from urllib.parse import urlsplit

from lmtune.errors import LmtuneError

TOKEN_HEADER = "X-Lmtune-Token"
LOCAL_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
WILDCARDS = frozenset({"", "0.0.0.0", "::"})  # bound to every interface: the machine's names are not known here
MAX_BODY = 1 << 20
"""Largest request body accepted (a form, a YAML file, a chat history), in bytes."""


class Forbidden(LmtuneError):
    """A request that may not act: answered 403 with this one line."""


@dataclass
class Guard:
    host: str
    """The address the server is bound to."""
    port: int
    token: str = field(default_factory=lambda: secrets.token_urlsafe(24))

    @property
    def cookie(self) -> str:
        """Cookies are per host, not per port: one name per studio, so two studios do not log each other out."""
        return f"lmtune_studio_{self.port}"

    def url(self) -> str:
        """The address to open: the only place the secret is shown."""
        shown = "localhost" if self.host in LOCAL_NAMES else f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{shown}:{self.port}/?token={self.token}"

    def set_cookie(self) -> str:
        return f"{self.cookie}={self.token}; Path=/; HttpOnly; SameSite=Strict"

    def check(self, headers, query_token: str | None, post: bool) -> None:
        """Raise Forbidden unless Host, (for a POST) Origin and the secret are this studio's."""
        host = headers.get("Host") or ""
        self._check_host(host)
        origin = headers.get("Origin")
        if post and origin is not None and origin != f"http://{host}":
            raise Forbidden(f"a request from {origin} may not drive this studio")
        if not self.has_token(headers, query_token):
            raise Forbidden("missing or wrong studio token; open the address lmtune studio printed (it ends in "
                            "?token=...)")

    def has_token(self, headers, query_token: str | None) -> bool:
        given = headers.get(TOKEN_HEADER) or self._cookie_token(headers.get("Cookie")) or query_token or ""
        return hmac.compare_digest(given.encode(), self.token.encode())

    def _cookie_token(self, header: str | None) -> str | None:
        try:
            morsel = SimpleCookie(header or "").get(self.cookie)
        except CookieError:
            return None
        return morsel.value if morsel is not None else None

    def _check_host(self, host: str) -> None:
        if self.host in WILDCARDS:  # --host 0.0.0.0 on purpose: any of the machine's names; the secret still guards
            return
        url = urlsplit("//" + host)
        try:
            port = url.port if url.port is not None else 80
        except ValueError:
            port = -1
        if url.hostname not in LOCAL_NAMES | {self.host.strip("[]").lower()} or port != self.port:
            raise Forbidden(f"Host '{host}' is not this studio (a rebound DNS name?); open the address lmtune "
                            "studio printed")


def under(root: Path, path: str | Path, what: str) -> Path:
    """`path` resolved, when it lies under `root`; else Forbidden (a request may not reach the rest of the disk)."""
    resolved, top = Path(path).resolve(), root.resolve()
    if top not in resolved.parents:
        raise Forbidden(f"{what} {path} is not under the studio's runs directory {root}; choose a path inside it")
    return resolved
