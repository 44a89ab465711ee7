"""The studio's server side without a browser: the form's overrides validate exactly as `lmtune train` does (the
CLI's config loader is the oracle), every field error comes back tied to its key, YAML goes in and out
losslessly, and the HTTP API answers mistakes and bugs with one line, never a traceback."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

from lmtune.config import dump_config, load_config
from lmtune.studio import forms
from lmtune.studio.server import make_server

EXAMPLES = sorted(Path(__file__).parent.parent.glob("examples/*.yaml"))
FORM = ['data.train=["a.jsonl", {"path": "b.jsonl", "weight": 2}]', "method.name=\"ia3\"", "task=\"sft\"",
        "model.name=", "train.lr=1e-3", "train.steps=", "train.gradient_checkpointing=true",
        'method.target_modules=["q_proj", "v_proj"]', 'output_dir="runs/123"']


@pytest.mark.parametrize("form", [FORM, ["data.train=x.jsonl", "method.r=16"], ["data.train=x.jsonl", "method=ia3"]])
def test_form_overrides_make_the_config_the_cli_makes(form):
    assert dump_config(forms.build(form)) == dump_config(load_config(None, form))


def test_every_field_error_is_reported_with_its_key():
    with pytest.raises(forms.FieldErrors) as err:
        forms.build(["data.train=[]", "train.batch_size=0", "train.lr=fast", "method.name=lora", "method.r=x",
                     "task=\"teach\"", "train.bogus=1"])
    keys = [k for k, _ in err.value.errors]
    assert sorted(keys) == ["data.train", "method.r", "task", "train.batch_size", "train.bogus", "train.lr"]
    assert dict(err.value.errors)["train.batch_size"] == "must be >= 1"
    with pytest.raises(forms.FieldErrors) as err:
        forms.build(["method.name=nope"])
    assert dict(err.value.errors)["method.name"].startswith("unknown method 'nope'; choose one of: ")
    with pytest.raises(forms.FieldErrors) as err:
        forms.build([])
    assert err.value.errors == [("data", "Field required")]


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_yaml_loads_into_the_form_and_saves_back_unchanged(path, tmp_path):
    expected = dump_config(load_config(path))
    loaded = forms.from_yaml(path.read_text())
    assert dump_config(loaded) == expected
    # What the page shows, sent back as the form's overrides, is the same config again.
    overrides = [f"{k}={json.dumps(v) if v is not None else ''}" for k, v in forms.values(loaded).items()]
    assert dump_config(forms.build(overrides)) == expected
    saved = tmp_path / "saved.yaml"
    saved.write_text(forms.to_yaml(loaded))
    assert dump_config(load_config(saved)) == expected


def test_bad_yaml_is_one_message():
    with pytest.raises(forms.FieldErrors) as err:
        forms.from_yaml("train: [unclosed")
    assert "not valid YAML" in err.value.errors[0][1]


SECRET: dict[str, str] = {}  # the running test server's token header


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    import threading

    server = make_server("127.0.0.1", 0, tmp_path_factory.mktemp("runs"))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    SECRET["X-Lmtune-Token"] = server.RequestHandlerClass.guard.token
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def base_url(server):
    return f"http://127.0.0.1:{server.server_address[1]}"


def call(url: str, body: dict | bytes | None = None, headers: dict[str, str] | None = None,
         secret: bool = True) -> tuple[int, dict | bytes]:
    data = body if body is None or isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={**(SECRET if secret else {}), **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=60) as res:
            raw, code = res.read(), res.status
    except urllib.error.HTTPError as err:
        raw, code = err.read(), err.code
    try:
        return code, json.loads(raw)
    except json.JSONDecodeError:
        return code, raw


def announce_body(base_url: str, path: str, length: int) -> tuple[int, dict]:
    """A POST that declares a `length`-byte body and sends none: the server must refuse it from the header
    alone. (Sending the body races the server's early reply: a broken pipe on a loaded machine.)"""
    import http.client
    from urllib.parse import urlsplit

    url = urlsplit(base_url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    try:
        conn.putrequest("POST", path)
        for key, value in SECRET.items():
            conn.putheader(key, value)
        conn.putheader("Content-Length", str(length))
        conn.endheaders()
        res = conn.getresponse()
        return res.status, json.loads(res.read())
    finally:
        conn.close()


def test_api_answers_mistakes_and_bugs_in_one_line(server, base_url):
    root = server.RequestHandlerClass.studio.root.resolve()
    code, body = call(base_url + "/api/validate", {"overrides": ["data.train=x.jsonl", "train.lr=-1"]})
    assert code == 422 and body == {"errors": [{"field": "train.lr", "message": "must be > 0"}]}
    code, body = call(base_url + "/api/chat", {"dir": str(root / "nonexistent"), "history": {}})
    assert code == 400 and "no finished run" in body["errors"][0]["message"]
    assert call(base_url + "/api/nothing", {})[0] == 404
    code, body = call(base_url + "/api/validate", {"no overrides": 1})  # a bug's request: one line too
    assert code == 500 and body["errors"][0]["message"] == "KeyError: 'overrides'"
    code, body = call(base_url + "/api/stop", {"dir": str(root / "nonexistent")})
    assert code == 400 and body["errors"][0]["message"] == f"{root / 'nonexistent'} is not running"
    code, body = call(base_url + "/api/validate", b"{not json")
    assert code == 400 and body["errors"][0]["message"] == "the request body is not JSON"
    code, body = call(base_url + "/api/chat", {"dir": str(root / "x"), "history": {}, "max_new_tokens": 10**9})
    assert code == 400 and body["errors"][0]["message"].startswith("max_new_tokens must be a whole number from 1 to")


def test_only_this_studios_page_may_drive_it(server, base_url):
    """Every API call needs the start's secret, this machine's Host and (POSTs) the studio's own Origin: 403."""
    port = server.server_address[1]
    post = (base_url + "/api/validate", {"overrides": ["data.train=x.jsonl"]})
    assert call(*post)[0] == 200
    assert call(*post, headers={"Origin": f"http://127.0.0.1:{port}"})[0] == 200  # the page itself
    refused = {"no secret": call(*post, secret=False), "wrong secret": call(*post, headers={"X-Lmtune-Token": "x"}),
               "no secret, GET": call(base_url + "/api/runs", secret=False),
               "page without the secret": call(base_url + "/", secret=False),
               "another site's page": call(*post, headers={"Origin": "http://evil.example"}),
               "another port's page": call(*post, headers={"Origin": f"http://127.0.0.1:{port + 1}"}),
               "a sandboxed page": call(*post, headers={"Origin": "null"}),
               "a rebound DNS name": call(*post, headers={"Host": f"evil.example:{port}"}),
               "another port": call(*post, headers={"Host": f"127.0.0.1:{port + 1}"})}
    for case, (code, body) in refused.items():
        assert code == 403, case
        message = body["errors"][0]["message"] if isinstance(body, dict) else body.decode()
        assert message and "\n" not in message, case
    assert "studio token" in refused["no secret"][1]["errors"][0]["message"]
    assert "evil.example may not drive this studio" in refused["another site's page"][1]["errors"][0]["message"]
    assert "is not this studio" in refused["a rebound DNS name"][1]["errors"][0]["message"]


def test_the_printed_address_sets_the_secret_as_a_cookie(server):
    """Opening `?token=...` answers with a cookie and a redirect to the bare page; the cookie alone then suffices."""
    import http.client

    port, guard = server.server_address[1], server.RequestHandlerClass.guard
    assert server.url == f"http://localhost:{port}/?token={guard.token}"
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", f"/?token={guard.token}")
    res = conn.getresponse()
    res.read()
    cookie = res.getheader("Set-Cookie")
    assert res.status == 303 and res.getheader("Location") == "/"
    assert cookie.startswith(f"lmtune_studio_{port}={guard.token};") and "HttpOnly" in cookie and "SameSite=Strict" in cookie
    cookie_header = {"Cookie": cookie.split(";")[0]}
    assert call(f"http://127.0.0.1:{port}/api/runs", headers=cookie_header, secret=False)[0] == 200
    assert call(f"http://127.0.0.1:{port}/api/runs", headers={"Cookie": f"lmtune_studio_{port}=wrong"},
                secret=False)[0] == 403


def test_paths_outside_the_runs_root_and_oversized_bodies_are_refused(server, base_url, tmp_path):
    outside = str(tmp_path / "elsewhere")
    for url, body in (("/api/stop", {"dir": outside}), ("/api/chat", {"dir": outside, "history": {}}),
                      ("/api/launch", {"overrides": ["data.train=x.jsonl", f"output_dir={outside}"]})):
        code, answer = call(base_url + url, body)
        assert code == 403 and "is not under the studio's runs directory" in answer["errors"][0]["message"], url
    assert call(f"{base_url}/api/run?dir=/etc")[0] == 403
    assert call(f"{base_url}/api/run?dir={server.RequestHandlerClass.studio.root}/../x")[0] == 403
    assert not Path(outside).exists()
    code, answer = announce_body(base_url, "/api/load-yaml", 2 << 20)
    assert code == 413 and "request body must be 0 to" in answer["errors"][0]["message"]


def test_a_runaway_estimate_is_stopped_and_the_next_one_answers(server, base_url, model_dir, monkeypatch):
    """An estimate that never ends (here: a traced step that keeps issuing ops, as a huge batch once did) stops at
    the time limit, or as soon as a newer request arrives, and leaves the estimator free for that one."""
    import threading
    import time

    import lmtune.memory.trace as trace

    real = trace.token_logps_loss

    def runaway(model, input_ids, *args, **kwargs):
        while input_ids.shape[0] == 7:  # the request with train.batch_size=7 never finishes
            torch.zeros(1) + 1
        return real(model, input_ids, *args, **kwargs)

    monkeypatch.setattr(trace, "token_logps_loss", runaway)
    form = [f"model.name={model_dir}", "data.train=[]", "data.max_length=16", "method.r=2"]
    estimator = server.RequestHandlerClass.studio.estimator
    monkeypatch.setattr(estimator, "seconds", 3.0)
    answers = {}
    slow = threading.Thread(target=lambda: answers.update(slow=call(base_url + "/api/estimate",
                                                                   {"overrides": [*form, "train.batch_size=7"]})))
    start = time.monotonic()
    slow.start()
    slow.join(timeout=30)
    assert time.monotonic() - start < 20
    code, body = answers["slow"]
    assert code == 422 and "ran past 3 s and was stopped" in body["errors"][0]["message"]
    assert call(base_url + "/api/estimate", {"overrides": [*form, "train.batch_size=2"]})[0] == 200
    # A newer request does not wait for the runaway: it supersedes it.
    monkeypatch.setattr(estimator, "seconds", 120.0)
    slow = threading.Thread(target=lambda: answers.update(slow=call(base_url + "/api/estimate",
                                                                   {"overrides": [*form, "train.batch_size=7"]})))
    slow.start()
    time.sleep(1.0)
    start = time.monotonic()
    code, body = call(base_url + "/api/estimate", {"overrides": [*form, "train.batch_size=3"]})
    assert code == 200 and body["plan"]["batch_size"] == 3, body
    assert time.monotonic() - start < 30
    slow.join(timeout=30)
    assert answers["slow"][0] == 400 and "superseded" in answers["slow"][1]["errors"][0]["message"]


def test_static_files_and_nothing_else(base_url):
    code, page = call(base_url + "/")
    assert code == 200 and b"lmtune studio" in page
    assert call(base_url + "/app.js")[0] == 200
    assert call(base_url + "/../server.py")[0] == 404
    assert call(base_url + "/%2e%2e/server.py")[0] == 404


def test_schema_holds_every_config_key_and_method():
    from lmtune.config import describe_keys
    from lmtune.methods import method_names

    schema = forms.schema()
    assert sorted(schema["methods"]) == method_names()
    defs = schema["config"]["$defs"]
    sections = {name: prop["$ref"].split("/")[-1] for name, prop in schema["config"]["properties"].items()
                if "$ref" in prop and "properties" in defs[prop["$ref"].split("/")[-1]]}
    assert {"model", "data", "train", "preference", "grpo"} <= set(sections)
    def flatten(prefix: str, ref: str) -> set[str]:  # nested sections (data.preserve) by their dotted keys
        out = set()
        for k, prop in defs[ref]["properties"].items():
            inner = [r["$ref"] for r in [prop, *prop.get("anyOf", [])] if "$ref" in r]
            nested = inner and "properties" in defs[inner[0].split("/")[-1]]
            out |= flatten(f"{prefix}.{k}", inner[0].split("/")[-1]) if nested else {f"{prefix}.{k}"}
        return out

    keys = {k for section, ref in sections.items() for k in flatten(section, ref)}
    keys |= {k for k in schema["config"]["properties"] if k not in sections}
    documented = {line.split()[0] for line in describe_keys().splitlines()
                  if line.startswith("  ") and not line.startswith(("  method", "  (none)"))}
    assert documented <= keys | {"method"}


def test_studio_on_a_busy_port_is_one_line(capfd):
    import socket

    from lmtune.cli import main

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        assert main(["studio", "--port", str(busy.getsockname()[1])]) == 2
    err = capfd.readouterr().err
    assert err.startswith("lmtune: error: cannot listen on 127.0.0.1:") and err.count("\n") == 1


def test_estimate_needs_no_data_but_a_run_does(base_url, model_dir):
    from lmtune.memory import estimate
    from lmtune.memory.report import plan_from_config

    form = [f"model.name={model_dir}", "data.train=[]", "train.batch_size=3", "data.max_length=16", "method.r=2"]
    code, body = call(base_url + "/api/estimate", {"overrides": form})
    expected = estimate(plan_from_config(load_config(None, [*form, "data.train=x.jsonl"])))
    assert code == 200, body
    assert body["per_device"] == expected.per_device and body["plan"]["batch_size"] == 3
    for api in ("validate", "launch"):
        code, body = call(f"{base_url}/api/{api}", {"overrides": form})
        assert code == 422 and body["errors"][0]["field"] == "data.train"


def test_a_launched_run_that_fails_shows_its_one_line_error(tmp_path, model_dir):
    import time

    from lmtune.studio.runs import Runs

    runs = Runs(tmp_path)
    form = [f"model.name={model_dir}", f"data.train={tmp_path / 'missing.jsonl'}", f"output_dir={tmp_path / 'bad'}",
            "train.device=cpu"]
    out = runs.launch(forms.build(form), form)
    deadline = time.monotonic() + 120
    while runs.status(out)["status"] == "running" and time.monotonic() < deadline:
        time.sleep(0.2)
    status = runs.status(out)
    assert status["status"] == "failed" and status["returncode"] == 2
    assert status["message"].startswith("lmtune: error: ") and "missing.jsonl" in status["message"]
    assert "Traceback" not in status["log"]
    assert [r["name"] for r in runs.listing()] == ["bad"]
