"""The studio's HTTP server: the static page and a small JSON API (standard library only)."""

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
from lmtune.studio.runs import Chat, Runs

STATIC = Path(__file__).parent / "static"
TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
         ".css": "text/css; charset=utf-8", ".png": "image/png"}
log = logging.getLogger("lmtune")


class Studio:
    """The API: each method takes the request's JSON (or query) and returns JSON."""

    def __init__(self, runs_root: Path) -> None:
        self.runs, self.chat, self.estimator = Runs(runs_root), Chat(), forms.Estimator()

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
        return self.runs.status(self.runs.launch(cfg, body["overrides"]))

    def post_stop(self, body: dict) -> dict:
        self.runs.stop(Path(body["dir"]))
        return {"ok": True}

    def get_runs(self, q: dict) -> dict:
        return {"runs": self.runs.listing()}

    def get_run(self, q: dict) -> dict:
        return self.runs.status(Path(q["dir"][0]))

    def get_compare(self, q: dict) -> dict:
        return {"runs": [self.runs.compare_row(Path(d)) for d in q.get("dir", [])]}

    def post_chat(self, body: dict) -> dict:
        return self.chat.reply(Path(body["dir"]), body["history"], int(body.get("max_new_tokens", 64)))


class Handler(BaseHTTPRequestHandler):
    studio: Studio

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002  (quiet: one line per request is noise)
        pass

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, data: Any) -> None:
        self._send(status, json.dumps(data).encode(), "application/json")

    def do_GET(self) -> None:  # noqa: N802
        url = urlparse(self.path)
        if url.path.startswith("/api/"):
            return self._api("get_" + url.path[5:], lambda: parse_qs(url.query))  # name -> list of values
        name = "index.html" if url.path in ("", "/") else url.path.lstrip("/")
        path = (STATIC / name).resolve()
        if STATIC.resolve() not in path.parents or not path.is_file():
            return self._send(HTTPStatus.NOT_FOUND, b"not found", "text/plain")
        self._send(HTTPStatus.OK, path.read_bytes(), TYPES.get(path.suffix, "application/octet-stream"))

    def do_POST(self) -> None:  # noqa: N802
        def body() -> dict:
            return json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")

        self._api("post_" + urlparse(self.path).path[5:], body)

    def _api(self, name: str, read) -> None:
        """Field errors -> 422 with each message tied to its key; user errors -> 400 with one line; a bug -> 500
        with one line (the traceback goes to the studio's terminal, never to the page)."""
        method = getattr(self.studio, name.replace("-", "_"), None)
        if method is None:
            return self._json(HTTPStatus.NOT_FOUND, {"error": f"no API {name}"})
        try:
            return self._json(HTTPStatus.OK, method(read()))
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
    return server


def serve(host: str, port: int, runs_root: Path) -> None:
    try:
        server = make_server(host, port, runs_root)
    except OSError as err:
        raise LmtuneError(f"cannot listen on {host}:{port} ({err.strerror}); choose another --port") from None
    # The first estimate imports and traces the model: do it now for the default form, not on the first click.
    threading.Thread(target=server.RequestHandlerClass.studio.warm, daemon=True).start()
    shown = "localhost" if host in ("127.0.0.1", "::1") else host
    print(f"lmtune studio: http://{shown}:{server.server_address[1]}/  (runs under {runs_root}; Ctrl-C quits)",
          flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
