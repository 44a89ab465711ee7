"""Screenshots of every studio page for the README (docs/studio/*.png), on the packaged default model.

Run from the repository root: python scripts/studio_screenshots.py [OUT_DIR]. It trains two short runs of
examples/quickstart.yaml (LoRA and IA3, 8 steps each) through the page: minutes on a CPU. The browser tests write
the same pages on a tiny model with LMTUNE_STUDIO_SCREENSHOTS=DIR.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import threading
from pathlib import Path

from playwright.sync_api import sync_playwright

from lmtune.studio.server import make_server

# Short runs: the pages, not the result, are the point (and the CPU is shared).
SETTINGS = {"train.steps": "8", "train.eval_every": "4", "train.warmup_steps": "2", "train.batch_size": "2",
            "data.max_length": "128"}


def shoot(page, path: Path) -> None:
    page.evaluate("window.scrollTo(0, 0)")
    page.screenshot(path=str(path))


def launch(page, out: Path, method: str | None = None) -> None:
    page.click('nav button[data-page="configure"]')
    if method:
        page.select_option('[name="method.name"]', method)
    page.fill('[name="output_dir"]', str(out))
    for key, value in SETTINGS.items():
        page.fill(f'[name="{key}"]', value)
    page.wait_for_selector("#estimate-peak", timeout=300_000)
    page.click("#launch")
    page.wait_for_function("document.querySelector('#run-status')?.textContent === 'finished'", timeout=1_800_000)


def main(out_dir: str = "docs/studio") -> None:
    shots = Path(out_dir)
    shots.mkdir(parents=True, exist_ok=True)
    runs = Path(tempfile.mkdtemp(prefix="studio-shots-"))
    server = make_server("127.0.0.1", 0, runs)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium") or "/usr/bin/chromium")
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(f"http://127.0.0.1:{server.server_address[1]}/")
        page.wait_for_selector('[name="train.batch_size"]')
        page.set_input_files("#load-yaml", "examples/quickstart.yaml")
        page.wait_for_function("document.querySelector('[name=\"train.steps\"]').value === '80'")
        page.fill('[name="output_dir"]', str(runs / "quickstart-lora"))
        page.wait_for_selector("#estimate-peak", timeout=300_000)
        shoot(page, shots / "configure.png")
        launch(page, runs / "quickstart-lora")
        shoot(page, shots / "runs.png")
        page.click('nav button[data-page="chat"]')
        page.wait_for_selector("#chat-run option")
        page.fill("#chat-max", "40")
        for question in ("Who are you?", "What is the capital of France?"):
            count = page.locator("#chat-run-out .msg.assistant").count()
            page.fill("#chat-text", question)
            page.click("#chat-send")
            page.wait_for_function(f"document.querySelectorAll('#chat-run-out .msg.assistant').length > {count}",
                                   timeout=300_000)
        shoot(page, shots / "chat.png")
        page.set_input_files("#load-yaml", "examples/quickstart.yaml")
        page.wait_for_function("document.querySelector('[name=\"train.steps\"]').value === '80'")
        launch(page, runs / "quickstart-ia3", method="ia3")
        page.click('nav button[data-page="compare"]')
        for name in ("quickstart-lora", "quickstart-ia3"):
            page.check(f'#compare-list input[value="{runs / name}"]')
        page.wait_for_function("document.querySelectorAll('#compare-rows tr').length === 3")
        shoot(page, shots / "compare.png")
        browser.close()
    server.shutdown()
    print(f"screenshots in {shots}; runs in {runs}")


if __name__ == "__main__":
    main(*sys.argv[1:])
