"""The dashboard's page in headless Chromium (Debian's chromium driven by playwright): the runs table lists the
run, the chart draws one point per metrics record, a record appended to metrics.jsonl reaches the open page, and
the chat playground streams the reply that the served model gives."""

from __future__ import annotations

import json
import shutil

import httpx
import pytest

from cybertron.dashboard.app import create_app
from cybertron.dashboard.folder import RunsFolder
from cybertron.dashboard.proxy import ServeProxy
from cybertron.dashboard.server import in_thread
from tests.unit.dashboard.conftest import make_run, train_record

# The flags that keep Chromium from reaching the network (there is none here) or a GPU.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def chromium_path() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:  # .ci/run installs it; elsewhere: apt-get install chromium
        pytest.skip("no chromium executable on PATH (Debian/Ubuntu: apt-get install chromium)")
    return path


@pytest.fixture(scope="module")
def browser():
    executable = chromium_path()
    from playwright.sync_api import sync_playwright  # the `test` extra

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def polyline_points(page, run: str) -> int:
    return page.evaluate("(run) => { const p = document.querySelector(`polyline[data-run='${run}']`); "
                         "return p ? p.getAttribute('points').trim().split(/\\s+/).length : 0; }", run)


def open_page(browser, url: str, run: str):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(url)
    page.wait_for_selector(f"polyline[data-run='{run}']", timeout=10_000)
    return page


def screenshot(page, path) -> None:
    page.screenshot(path=str(path), full_page=True)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_page_lists_the_run_and_draws_one_point_per_record(tmp_path, browser):
    losses = [5.5, 5.1, 4.8, 4.4, 4.3]
    run_dir = make_run(tmp_path / "runs", "tiny-pretrain", losses, total_steps=10)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    with in_thread(create_app(RunsFolder(tmp_path / "runs"), ServeProxy("http://127.0.0.1:9"))) as url:
        page = open_page(browser, url, "tiny-pretrain")
        cells = page.locator("tr[data-run='tiny-pretrain'] td").all_inner_texts()
        assert cells[1:6] == ["tiny-pretrain", "pretrain", "running", "5 / 10", "4.3"], cells
        assert polyline_points(page, "tiny-pretrain") == sum("loss" in r for r in records) == len(losses)
        page.select_option("#metric", "val_loss")  # the step-0 evaluation alone
        assert polyline_points(page, "tiny-pretrain") == 1
        screenshot(page, tmp_path / "dashboard.png")


@pytest.mark.slow  # the browser, a served model and polling: several seconds on 2 cores
def test_page_follows_appended_metrics_and_chats_with_the_served_model(tmp_path, browser, serve_url):
    run_dir = make_run(tmp_path / "runs", "tiny-pretrain", [5.5, 5.1, 4.8], total_steps=10)
    make_run(tmp_path / "runs", "other", [5.6, 5.0, 4.9, 4.7], total_steps=4, checkpoints=(4,), age_s=600)
    request = {"model": "tiny", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 8,
               "temperature": 0}
    expected = httpx.post(f"{serve_url}/v1/chat/completions", json=request, timeout=60).json()
    expected = expected["choices"][0]["message"]["content"]

    with in_thread(create_app(RunsFolder(tmp_path / "runs"), ServeProxy(serve_url))) as url:
        page = open_page(browser, url, "tiny-pretrain")
        page.locator("tr[data-run='other'] input[type=checkbox]").check()  # overlay a second run
        page.wait_for_selector("polyline[data-run='other']", timeout=10_000)
        assert polyline_points(page, "other") == 4
        with (run_dir / "metrics.jsonl").open("a") as f:  # the trainer's next step, as MetricsLogger writes it
            f.write(json.dumps(train_record(4, 4.6)) + "\n")
        page.wait_for_function("() => document.querySelector(\"polyline[data-run='tiny-pretrain']\")"
                               ".getAttribute('data-points') === '4'", timeout=10_000)
        assert polyline_points(page, "tiny-pretrain") == 4

        assert page.locator("#model").inner_text() == "model: tiny"
        page.fill("#temperature", "0")
        page.fill("#max-tokens", "8")
        page.fill("#prompt", "Hello")
        page.click("#send")
        page.wait_for_selector(".msg[data-done='true']", timeout=30_000)
        assert page.locator(".msg.assistant").evaluate("e => e.textContent") == expected
        screenshot(page, tmp_path / "dashboard.png")
