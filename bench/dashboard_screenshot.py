"""A screenshot of `cybertron dashboard` in headless Chromium, and how fast the page follows a run.

Without RUNS_DIR it first trains two tiny real runs (`cybertron train`, debug preset, stdlib corpus, two learning
rates) into a temporary folder. The dashboard is served over the folder, and the newest run is served by the
`cybertron serve` app for the chat playground. In the browser it measures the time from opening the page to the
first drawn curve and from appending a record to metrics.jsonl to the curve redrawn (the page polls once a
second), sends one chat message, and writes the screenshot.

    python bench/dashboard_screenshot.py [RUNS_DIR] [--out dashboard.png] [--steps 30]

Prints one JSON line; bench/RESULTS.md records it. Needs chromium (apt-get install chromium) and playwright.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cybertron.dashboard.app import create_app  # noqa: E402
from cybertron.dashboard.folder import RunsFolder  # noqa: E402
from cybertron.dashboard.proxy import ServeProxy  # noqa: E402
from cybertron.dashboard.server import in_thread  # noqa: E402

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def train_demo_runs(root: Path, steps: int) -> None:
    corpus = root.parent / "corpus.jsonl"
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    with corpus.open("w") as f:
        for p in sorted(stdlib.glob("*.py"))[:40]:
            f.write(json.dumps({"text": p.read_text(errors="ignore")}) + "\n")
    for name, lr in (("debug-lr3e-3", "3e-3"), ("debug-lr1e-3", "1e-3")):
        subprocess.run([sys.executable, "-m", "cybertron", "train", "--data.path", str(corpus), "--data.cache_dir",
                        str(root.parent / "cache"), "--data.vocab_size", "512", "--data.seq_len", "64",
                        "--model.preset", "debug", "--train.global_batch_size", "8", "--train.lr", lr,
                        "--steps", str(steps), "--eval.every", "10", "--eval.batches", "2", "--log.every", "1",
                        "--log.progress", "lines", "--log.tensorboard", "false", "--out", str(root / name)],
                       check=True, cwd=REPO, stdout=subprocess.DEVNULL,
                       env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})


def serve_app(run_dir: Path):
    from cybertron.runs import load_run
    from cybertron.serve.async_engine import AsyncEngine
    from cybertron.serve.engine import Engine
    from cybertron.serve.server import create_app as create_serve_app

    run = load_run(run_dir)
    engine = Engine(run.model, run.tokenizer, max_batch_size=4, num_blocks=128, block_size=16)
    return create_serve_app(AsyncEngine(engine), run.tokenizer, run_dir.name)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("runs_dir", nargs="?")
    ap.add_argument("--out", default="dashboard.png")
    ap.add_argument("--steps", type=int, default=30)
    args = ap.parse_args()
    chromium = shutil.which("chromium") or sys.exit("no chromium on PATH (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.runs_dir) if args.runs_dir else Path(tmp) / "runs"
        t0 = time.perf_counter()
        if not args.runs_dir:
            train_demo_runs(root, args.steps)
        train_s = time.perf_counter() - t0
        folder = RunsFolder(root)
        newest = folder.summaries()[0].name
        run_dir = folder.find(newest)
        with in_thread(serve_app(run_dir)) as serve_url, \
                in_thread(create_app(folder, ServeProxy(serve_url))) as url, sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 860})
            t0 = time.perf_counter()
            page.goto(url)
            page.wait_for_selector(f"polyline[data-run='{newest}']")
            first_curve_s = time.perf_counter() - t0
            for name in folder.runs():  # overlay every run
                box = page.locator(f"tr[data-run='{name}'] input[type=checkbox]")
                if not box.is_checked():
                    box.check()
            points = int(page.get_attribute(f"polyline[data-run='{newest}']", "data-points"))
            metrics = run_dir / "metrics.jsonl"
            last = [json.loads(line) for line in metrics.read_text().splitlines() if '"loss"' in line][-1]
            appended = {**last, "step": last["step"] + 1, "loss": last["loss"] * 0.99}
            original = metrics.read_text()
            t0 = time.perf_counter()
            with metrics.open("a") as f:
                f.write(json.dumps(appended) + "\n")
            page.wait_for_function(f"() => document.querySelector(\"polyline[data-run='{newest}']\")"
                                   f".getAttribute('data-points') === '{points + 1}'")
            follow_s = time.perf_counter() - t0
            metrics.write_text(original)  # leave the run as it was
            page.fill("#temperature", "0.8")
            page.fill("#max-tokens", "32")
            page.fill("#prompt", "def ")
            t0 = time.perf_counter()
            page.click("#send")
            page.wait_for_selector(".msg[data-done='true']", timeout=60_000)
            chat_s = time.perf_counter() - t0
            page.wait_for_timeout(300)
            page.screenshot(path=args.out, full_page=True)
            browser.close()
        n_runs = len(folder.runs())
    print(json.dumps({"bench": "dashboard", "runs": n_runs, "train_s": round(train_s, 1),
                      "first_curve_s": round(first_curve_s, 2), "append_to_redraw_s": round(follow_s, 2),
                      "chat_reply_s": round(chat_s, 2), "screenshot": str(Path(args.out).resolve())}))


if __name__ == "__main__":
    main()
