"""The studio's HTTP server: the static page and a small JSON API (standard library only; who may call it: guard.py)."""

from __future__ import annotations

import json
import logging
import threading
import traceback
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

from lmtune.errors import LmtuneError
from lmtune.studio import forms
from lmtune.studio.guard import MAX_BODY, Forbidden, Guard, under
from lmtune.studio.runs import Chat, Runs

STATIC = Path(__file__).parent / "static"
TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
         ".css": "text/css; charset=utf-8", ".png": "image/png"}
log = logging.getLogger("lmtune")
MAX_NEW_TOKENS = 1024  # the most a chat request may generate per side


class Studio:
    """The API: each method takes the request's JSON (or query) and returns JSON."""

    def __init__(self, runs_root: Path) -> None:
        self.root = runs_root
        self.runs, self.chat, self.estimator = Runs(runs_root), Chat(), forms.Estimator()

    def _dir(self, path: str) -> Path:
        return under(self.root, path, "run directory")

    def warm(self) -> None:
        try:
            self.estimator(forms.build([f"data.train={json.dumps([forms.NO_DATA])}"]))
        except Exception:  # noqa: BLE001  (a default model that cannot be estimated shows up on the page instead)
            pass

    def get_schema(self, q: dict) -> dict:
        return forms.schema()

    def post_validate(self, body: dict) -> dict:
        return {"yaml": forms.to_yaml(forms.build(body["overrides"]))}

    def post_estimate(self, body: dict) -> dict:
        # The estimate reads no data (as `lmtune estimate`): it needs no training file yet.
        placeholder = f'data.train={json.dumps([forms.NO_DATA])}'
        return self.estimator(forms.build([placeholder if o == "data.train=[]" else o for o in body["overrides"]]))

    def post_load_yaml(self, body: dict) -> dict:
        return {"values": forms.values(forms.from_yaml(body["text"]))}

    def post_launch(self, body: dict) -> dict:
        cfg = forms.build(body["overrides"])
        under(self.root, cfg.output_dir, "output_dir")
        return self.runs.status(self.runs.launch(cfg, body["overrides"]))

    def post_stop(self, body: dict) -> dict:
        self.runs.stop(self._dir(body["dir"]))
        return {"ok": True}

    def get_runs(self, q: dict) -> dict:
        return {"runs": self.runs.listing()}

    def get_run(self, q: dict) -> dict:
        return self.runs.status(self._dir(q["dir"][0]))

    def get_compare(self, q: dict) -> dict:
        return {"runs": [self.runs.compare_row(self._dir(d)) for d in q.get("dir", [])]}

    def post_chat(self, body: dict) -> dict:
        tokens = body.get("max_new_tokens", 64)
        if not isinstance(tokens, int) or not 1 <= tokens <= MAX_NEW_TOKENS:
            raise LmtuneError(f"max_new_tokens must be a whole number from 1 to {MAX_NEW_TOKENS} (got {tokens!r})")
        return self.chat.reply(self._dir(body["dir"]), body["history"], tokens)


class Handler(BaseHTTPRequestHandler):
    studio: Studio
    guard: Guard
    timeout = 60  # seconds a client may take to send its request or read the answer; then the thread is freed

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002  (quiet: one line per request is noise)
        pass

    def _send(self, status: int, body: bytes, content_type: str, *headers: tuple[str, str]) -> None:
        self.send_response(status)
        for name, value in (("Content-Type", content_type), ("Content-Length", str(len(body))),
                            ("Cache-Control", "no-store"), ("X-Content-Type-Options", "nosniff"), *headers):
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, data: Any) -> None:
        self._send(status, json.dumps(data).encode(), "application/json")

    def _error(self, status: int, message: str, api: bool) -> None:
        if api:
            return self._json(status, {"errors": [{"field": "", "message": message}]})
        self._send(status, message.encode(), "text/plain; charset=utf-8")

    def _allowed(self, url, post: bool) -> bool:
        """The guard's checks; a refusal is answered here (403, one line)."""
        try:
            self.guard.check(self.headers, parse_qs(url.query).get("token", [None])[0], post)
        except Forbidden as err:
            self._error(HTTPStatus.FORBIDDEN, str(err), api=url.path.startswith("/api/"))
            return False
        return True

    def do_GET(self) -> None:  # noqa: N802
        url = urlparse(self.path)
        if not self._allowed(url, post=False):
            return None
        if url.path.startswith("/api/"):
            return self._api("get_" + url.path[5:], lambda: parse_qs(url.query))  # name -> list of values
        if "token" in parse_qs(url.query):  # opened from the printed address: keep the secret in a cookie, not the URL
            return self._send(HTTPStatus.SEE_OTHER, b"", "text/plain", ("Location", url.path or "/"),
                              ("Set-Cookie", self.guard.set_cookie()))
        name = "index.html" if url.path in ("", "/") else url.path.lstrip("/")
        path = (STATIC / name).resolve()
        if STATIC.resolve() not in path.parents or not path.is_file():
            return self._send(HTTPStatus.NOT_FOUND, b"not found", "text/plain")
        self._send(HTTPStatus.OK, path.read_bytes(), TYPES.get(path.suffix, "application/octet-stream"))

    def do_POST(self) -> None:  # noqa: N802
        url = urlparse(self.path)
        if not self._allowed(url, post=True):
            return None
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if not 0 <= length <= MAX_BODY:
            self.close_connection = True  # the unread body must not be taken for the next request
            return self._error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE if length > MAX_BODY else HTTPStatus.BAD_REQUEST,
                               f"request body must be 0 to {MAX_BODY} bytes (Content-Length: "
                               f"{self.headers.get('Content-Length')})", api=True)
        raw = self.rfile.read(length)

        def body() -> dict:
            try:
                data = json.loads(raw or b"{}")
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise LmtuneError("the request body is not JSON") from None
            if not isinstance(data, dict):
                raise LmtuneError("the request body must be a JSON object")
            return data

        self._api("post_" + url.path[5:], body)

    def _api(self, name: str, read) -> None:
        """Field errors -> 422 with each message tied to its key; user errors -> 400 with one line; a bug -> 500
        with one line (the traceback goes to the studio's terminal, never to the page)."""
        method = getattr(self.studio, name.replace("-", "_"), None)
        if method is None:
            return self._json(HTTPStatus.NOT_FOUND, {"error": f"no API {name}"})
        try:
            return self._json(HTTPStatus.OK, method(read()))
        except Forbidden as err:
            return self._error(HTTPStatus.FORBIDDEN, str(err), api=True)
        except forms.FieldErrors as err:
            return self._json(HTTPStatus.UNPROCESSABLE_ENTITY,
                              {"errors": [{"field": k, "message": m} for k, m in err.errors]})
        except LmtuneError as err:
            return self._json(HTTPStatus.BAD_REQUEST, {"errors": [{"field": forms._key_of(str(err)),
                                                                   "message": str(err)}]})
        except Exception as err:  # noqa: BLE001
            log.error("studio: %s failed:\n%s", name, traceback.format_exc())
            line = str(err).strip().splitlines()[0] if str(err).strip() else ""
            return self._json(HTTPStatus.INTERNAL_SERVER_ERROR,
                              {"errors": [{"field": "", "message": f"{type(err).__name__}: {line}"}]})


def make_server(host: str = "127.0.0.1", port: int = 7860, runs_root: Path = Path("runs")) -> ThreadingHTTPServer:
    """The server, bound (port 0: a free port; read it from `server.server_address`); call `serve_forever`."""
    handler = type("StudioHandler", (Handler,), {"studio": Studio(runs_root)})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    handler.guard = Guard(host, server.server_address[1])
    server.url = handler.guard.url()  # with the secret: what the user opens
    return server


def serve(host: str, port: int, runs_root: Path) -> None:
    try:
        server = make_server(host, port, runs_root)
    except OSError as err:
        raise LmtuneError(f"cannot listen on {host}:{port} ({err.strerror}); choose another --port") from None
    # The first estimate imports and traces the model: do it now for the default form, not on the first click.
    threading.Thread(target=server.RequestHandlerClass.studio.warm, daemon=True).start()
    print(f"lmtune studio: {server.url}  (open this address: the token in it is this start's secret; runs under "
          f"{runs_root}; Ctrl-C quits)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
