"""`lmtune studio` in a real browser (Debian's headless Chromium driven by Playwright), against a server started
here on a free localhost port and a tiny random model: fill the form, see field errors and the estimate move with
the batch size, launch a run and watch its loss curve, stop another cleanly, chat with the result, compare.

Oracles: the library itself called directly (the estimate `lmtune estimate` prints, the reply `lmtune generate`
gives, the metrics file `lmtune train` wrote), and the machine's available memory for the warning.
LMTUNE_STUDIO_SCREENSHOTS=DIR writes a screenshot of each page there (docs/studio/ in the README).
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path

import pytest

from lmtune.checkpoint import load
from lmtune.config import dump_config, load_config
from lmtune.inference import generate
from lmtune.memory import estimate
from lmtune.memory.report import available_memory, plan_from_config
from lmtune.models import load_model
from lmtune.studio.server import make_server
from lmtune.tuned import apply

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e .[test])")
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="no chromium (apt-get install -y chromium)")
SHOTS = os.environ.get("LMTUNE_STUDIO_SCREENSHOTS")
RECORDS = [{"prompt": "Who are you?", "completion": "I am a tiny test model."},
           {"prompt": "What is two plus two?", "completion": "It is four."},
           {"prompt": "Name three colors.", "completion": "Red, green and blue."}] * 3


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    root = tmp_path_factory.mktemp("studio")
    (root / "runs").mkdir()
    server = make_server("127.0.0.1", 0, root / "runs")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.url, root  # with the secret, as `lmtune studio` prints it
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def page(studio):
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(60_000)
        page.goto(studio[0])
        page.wait_for_selector('[name="train.batch_size"]')
        yield page
        browser.close()


def shot(page, name: str) -> None:
    if SHOTS:
        Path(SHOTS).mkdir(parents=True, exist_ok=True)
        page.evaluate("window.scrollTo(0, 0)")
        page.screenshot(path=str(Path(SHOTS) / f"{name}.png"), full_page=False)


def error_of(page, key: str):
    return page.locator(f'.field[data-key="{key}"] .error')


def peak(page) -> int:
    page.wait_for_selector("#estimate-peak")
    return int(page.get_attribute("#estimate-peak", "data-bytes"))


def fill_run(page, model_dir: str, data: Path, out: Path, steps: int) -> None:
    page.fill('[name="model.name"]', model_dir)
    page.fill('[name="data.train"]', str(data))
    page.fill('[name="data.max_length"]', "32")
    page.fill('[name="output_dir"]', str(out))
    page.fill('[name="train.steps"]', str(steps))
    page.fill('[name="train.lr"]', "0.01")
    page.select_option('[name="train.device"]', "cpu")
    page.fill('[name="method.r"]', "4")


def wait_estimate_for(page, batch: int) -> int:
    page.wait_for_function(f"document.querySelector('#estimate .help:not(#estimate-status)') && "
                           f"document.querySelector('#estimate').textContent.includes('{batch} ×')")
    return peak(page)


def test_configure_launch_watch_stop_chat_compare(page, studio, model_dir):
    url, root = studio
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    out, long_out = root / "runs" / "tiny", root / "runs" / "long"
    fill_run(page, model_dir, data, out, steps=8)

    # A field error appears next to its field, in words, never as a traceback.
    page.fill('[name="train.batch_size"]', "0")
    page.wait_for_function("document.querySelector('.field[data-key=\"train.batch_size\"] .error').textContent")
    assert error_of(page, "train.batch_size").inner_text() == "must be >= 1"
    page.fill('[name="train.lr"]', "fast")
    page.wait_for_function("document.querySelector('.field[data-key=\"train.lr\"] .error').textContent")
    assert "valid number" in error_of(page, "train.lr").inner_text()
    assert "Traceback" not in page.content()
    page.fill('[name="train.lr"]', "0.01")

    # The estimate is lmtune estimate's, and grows with the batch size.
    page.fill('[name="train.batch_size"]', "2")
    small = wait_estimate_for(page, 2)
    overrides = [f"model.name={model_dir}", f"data.train={data}", "data.max_length=32", "method.r=4",
                 "train.device=cpu"]
    assert small == estimate(plan_from_config(load_config(None, [*overrides, "train.batch_size=2"]))).per_device
    page.fill('[name="train.batch_size"]', "16")
    big = wait_estimate_for(page, 16)
    assert big == estimate(plan_from_config(load_config(None, [*overrides, "train.batch_size=16"]))).per_device
    assert big > small
    assert page.locator("#estimate-warning").count() == 0
    # More than this machine has: a warning beside the estimate.
    huge = 1 + available_memory("cpu") // (32 * 320 * 4)  # its logits alone would not fit
    page.fill('[name="train.batch_size"]', str(huge))
    page.wait_for_selector("#estimate-warning")
    assert "GiB available" in page.inner_text("#estimate-warning")
    page.fill('[name="train.batch_size"]', "2")
    wait_estimate_for(page, 2)
    shot(page, "configure")

    # Launch a long run first, then the short one; stop the long one cleanly once it has trained a step.
    page.fill('[name="output_dir"]', str(long_out))
    page.fill('[name="train.steps"]', "100000")
    page.click("#launch")
    page.wait_for_selector("#run-status")
    page.click('nav button[data-page="configure"]')
    page.fill('[name="output_dir"]', str(out))
    page.fill('[name="train.steps"]', "8")
    page.click("#launch")
    page.wait_for_function("document.querySelector('#run-status').textContent === 'finished'", timeout=180_000)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert page.locator('#run-chart polyline[data-label="train loss"]').get_attribute("points").count(",") == 8
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 9))
    shot(page, "runs")

    page.click(f'#run-list li[data-dir="{long_out}"]')
    page.wait_for_function("document.querySelector('#run-chart polyline') !== null", timeout=120_000)
    page.click("#run-stop")
    page.wait_for_function("document.querySelector('#run-status').textContent === 'stopped'", timeout=120_000)
    logged = [json.loads(line)["step"] for line in (long_out / "metrics.jsonl").read_text().splitlines()]
    assert (long_out / "checkpoints" / f"step-{logged[-1]:08d}").is_dir()  # the step it stopped after, kept
    assert "stopped after step" in page.inner_text("#run-message")

    # Chat: the page shows what the library answers, for the run and for its base model.
    page.click('nav button[data-page="chat"]')
    page.wait_for_function(f"[...document.querySelectorAll('#chat-run option')].some(o => o.value === '{out}')")
    page.select_option("#chat-run", str(out))
    page.fill("#chat-max", "8")
    page.fill("#chat-text", "Who are you?")
    page.click("#chat-send")
    page.wait_for_selector("#chat-run-out .msg.assistant")
    tuned, tokenizer = load(out)
    base = apply(load_model(model_dir)[0], "full")
    assert page.inner_text("#chat-run-out .msg.assistant") == generate(tuned, tokenizer, "Who are you?", 8)
    assert page.inner_text("#chat-base .msg.assistant") == generate(base, tokenizer, "Who are you?", 8)
    shot(page, "chat")

    # Compare: the table from summary.json, one curve per run.
    page.click('nav button[data-page="compare"]')
    for run in (out, long_out):
        page.check(f'#compare-list input[value="{run}"]')
    page.wait_for_function("document.querySelectorAll('#compare-rows tr').length === 3")
    summary = json.loads((out / "summary.json").read_text())
    row = next(r for r in (t.split("\t") for t in page.locator("#compare-rows tr").all_inner_texts()) if r[0] == "tiny")
    assert row[:2] == ["tiny", "lora"] and row[3].startswith(f"{summary['trainable_params']:,} (")
    assert float(row[6]) == pytest.approx(summary["loss"], rel=1e-3)
    long_row = next(r for r in (t.split("\t") for t in page.locator("#compare-rows tr").all_inner_texts())
                    if r[0] == "long")  # stopped: counts from its log, its last logged step and loss
    assert long_row[3] == row[3] and long_row[4] == str(logged[-1])
    assert page.locator("#compare-chart polyline.series").count() >= 2
    shot(page, "compare")

    # YAML in and out: an example loads into the form; Save writes what `lmtune train` reads as the same config.
    page.click('nav button[data-page="configure"]')
    example = Path(__file__).parent.parent / "examples" / "quickstart.yaml"
    page.set_input_files("#load-yaml", str(example))
    page.wait_for_function("document.querySelector('[name=\"method.target_modules\"]').value === 'all-linear'")
    assert page.input_value('[name="train.steps"]') == "80" and page.input_value('[name="method.dropout"]') == "0.05"
    with page.expect_download() as download:
        page.click("#save-yaml")
    saved = root / "saved.yaml"
    download.value.save_as(saved)
    assert dump_config(load_config(saved)) == dump_config(load_config(example))


def test_another_page_cannot_drive_the_studio(page, studio):
    """A page from another origin on this machine (so the browser even sends the studio's same-site cookie) posts
    a launch with a simple content type, as any site could: the studio answers 403 and nothing runs. Without the
    secret, the studio's own address shows only how to get in."""
    import http.server
    from urllib.parse import urlsplit

    url, root = studio
    port = urlsplit(url).port
    target = root / "runs" / "evil"
    attack = (f'<script>fetch("http://localhost:{port}/api/launch", {{method: "POST", mode: "no-cors", '
              f'credentials: "include", headers: {{"Content-Type": "text/plain"}}, body: JSON.stringify('
              f'{{overrides: ["data.train=x.jsonl", "output_dir={target}"]}})}})</script>').encode()

    class Evil(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.end_headers()
            self.wfile.write(attack)

        def log_message(self, *args):
            pass

    evil = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Evil)
    threading.Thread(target=evil.serve_forever, daemon=True).start()
    context = page.context.browser.new_context()
    other = context.new_page()
    try:
        # The user opened the studio's address: its cookie is in this browser (fetched without running the page,
        # whose first estimate would outlive the test).
        assert context.request.get(url, max_redirects=0).status == 303 and context.cookies()
        with other.expect_response(lambda r: "/api/launch" in r.url) as response:
            other.goto(f"http://localhost:{evil.server_address[1]}/")
        assert response.value.status == 403
        assert not target.exists()
        context.clear_cookies()
        other.goto(f"http://localhost:{port}/")
        assert "missing or wrong studio token" in other.inner_text("body")
    finally:
        context.close()
        evil.shutdown()
        evil.server_close()
