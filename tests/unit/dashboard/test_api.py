"""The dashboard's JSON API in-process (fastapi's TestClient) over run directories written by cybertron's own
writers: the runs table, the incremental metrics tail, refusal of paths as run names, and the chat relay to a
real serve app."""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
import urllib.request

import httpx
import pytest
from fastapi.testclient import TestClient

from cybertron.cli import main as cli_main
from cybertron.dashboard.app import create_app
from cybertron.dashboard.folder import RunsFolder
from cybertron.dashboard.proxy import ServeProxy
from cybertron.dashboard.server import in_thread
from cybertron.runs import RunMeta
from cybertron.train.metrics import MetricsLogger
from tests.unit.dashboard.conftest import lora_dpo_meta, make_run, train_record


def client_for(root, serve_url="http://127.0.0.1:9"):
    return TestClient(create_app(RunsFolder(root), ServeProxy(serve_url)))


def test_runs_table_has_method_status_step_loss_and_speed(tmp_path):
    make_run(tmp_path, "pre", [5.0, 4.0, 3.5], total_steps=3, checkpoints=(3,),
             extra=({"step": 3, "val_loss": 3.4, "val_ppl": 30.0},), age_s=3600)
    make_run(tmp_path, "dpo", [0.69, 0.6], total_steps=10, meta=lora_dpo_meta(), checkpoints=(2,))
    make_run(tmp_path, "diverged", [5.0, 4.9], total_steps=10, age_s=3600,
             extra=({"step": 3, "skipped": "grad norm nan", "skipped_in_a_row": 1},))
    make_run(tmp_path, "killed", [5.0], total_steps=10, meta=RunMeta("reward", "/models/base"), age_s=3600)
    (tmp_path / "not-a-run").mkdir()
    with client_for(tmp_path) as client:
        rows = {r["name"]: r for r in client.get("/api/runs").json()}
    assert set(rows) == {"pre", "dpo", "diverged", "killed"}
    assert rows["pre"] | {"updated": None} == {
        "name": "pre", "method": "pretrain", "status": "finished", "step": 3, "total_steps": 3, "loss": 3.5,
        "val_loss": 3.4, "tokens_per_s": 1003.0, "checkpoints": 1, "updated": None}
    assert (rows["dpo"]["method"], rows["dpo"]["status"], rows["dpo"]["step"]) == ("dpo (lora)", "running", 2)
    assert (rows["diverged"]["status"], rows["diverged"]["loss"]) == ("failed", 4.9)
    assert (rows["killed"]["method"], rows["killed"]["status"]) == ("reward (full)", "stopped")


def test_metrics_tail_returns_only_new_whole_lines_and_restarts_after_a_resume(tmp_path):
    run_dir = make_run(tmp_path, "live", [5.0, 4.5], total_steps=10)
    logger = MetricsLogger(run_dir, None, resumed_at=2)  # the run goes on, appending
    with client_for(tmp_path) as client:
        def poll(cursor):
            reply = client.get("/api/runs/live/metrics", params={"cursor": cursor})
            assert reply.status_code == 200
            return reply.json()

        first = poll("")
        expected = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert first["records"] == expected and not first["reset"]
        assert poll(first["cursor"])["records"] == []
        logger.log(train_record(3, 4.2))
        with (run_dir / "metrics.jsonl").open("a") as f:
            f.write('{"step": 4, "lo')  # a line the trainer is still writing
        second = poll(first["cursor"])
        assert second["records"] == [train_record(3, 4.2)] and not second["reset"]
        with (run_dir / "metrics.jsonl").open("a") as f:
            f.write('ss": 4.0}\n')
        third = poll(second["cursor"])
        assert third["records"] == [{"step": 4, "loss": 4.0}]
        MetricsLogger(run_dir, None, resumed_at=1)  # resumed from step 1: later records go
        after = poll(third["cursor"])
        assert after["reset"] and [r["step"] for r in after["records"]] == [0, 1]


@pytest.fixture(scope="module")
def exposed(tmp_path_factory):
    """A dashboard on a real socket over RUNS_DIR/ok, with a run `secret` one level above RUNS_DIR and a symlink
    to it named .hidden inside."""
    root = tmp_path_factory.mktemp("exposed")
    make_run(root / "runs", "ok", [5.0], total_steps=1)
    make_run(root, "secret", [1.0], total_steps=1)
    (root / "runs" / ".hidden").symlink_to(root / "secret")
    with in_thread(create_app(RunsFolder(root / "runs"), ServeProxy("http://127.0.0.1:9"))) as url:
        yield url


@pytest.mark.parametrize("path", ["/api/runs/../metrics", "/api/runs/.../metrics", "/api/runs/..%2Fsecret/metrics",
                                  "/api/runs/%2E%2E/metrics", "/api/runs/a%00b/metrics", "/api/runs/~root/metrics",
                                  "/api/runs/.hidden/metrics", "/api/runs/missing/metrics",
                                  "/api/runs/../../secret/metrics", "/api/runs/ok/../../secret/metrics"])
def test_paths_as_run_names_are_refused(exposed, path):
    # http.client sends the path as written: no client normalizes the dots away before the server sees them.
    conn = http.client.HTTPConnection(exposed.removeprefix("http://"), timeout=10)
    conn.request("GET", path)
    reply = conn.getresponse()
    body = reply.read().decode()
    conn.close()
    assert 400 <= reply.status < 500, (reply.status, body)
    assert "records" not in body
    assert urllib.request.urlopen(f"{exposed}/api/runs/ok/metrics").status == 200  # the listed run is served


def test_chat_is_relayed_to_serve_streamed_and_whole(tmp_path, serve_url):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 6,
            "temperature": 0}
    reference = httpx.post(f"{serve_url}/v1/chat/completions", json=body, timeout=60).json()
    text = reference["choices"][0]["message"]["content"]
    assert text
    with client_for(tmp_path, serve_url) as client:
        assert client.get("/api/models").json()["data"][0]["id"] == "tiny"
        whole = client.post("/api/chat", json=body).json()
        assert whole["choices"][0]["message"]["content"] == text
        with client.stream("POST", "/api/chat", json={**body, "stream": True}) as reply:
            assert reply.headers["content-type"].startswith("text/event-stream")
            events = [line[6:] for line in reply.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e)["choices"][0]["delta"].get("content") or "" for e in events[:-1]]
    assert len(chunks) > 1 and "".join(chunks) == text


def test_an_unreachable_server_is_a_502_naming_it(tmp_path):
    with client_for(tmp_path, "http://127.0.0.1:9") as client:
        reply = client.post("/api/chat", json={"messages": []})
    assert reply.status_code == 502 and "cannot reach cybertron serve at http://127.0.0.1:9" in reply.text


@pytest.mark.parametrize("argv, fragment", [
    (["{missing}"], "RUNS_DIR {missing} is not a directory"),
    ([], "give the folder of run directories"),
    (["{tmp}", "--serve-url", "localhost:8000"], "--serve-url must be an http:// or https:// URL"),
    (["{tmp}", "--port", "70000"], "--port must be in 0..65535"),
])
def test_bad_arguments_are_one_line(tmp_path, capsys, argv, fragment):
    fill = {"missing": str(tmp_path / "nope"), "tmp": str(tmp_path)}
    code = cli_main(["dashboard", *(a.format(**fill) for a in argv)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and fragment.format(**fill) in err[0], err


def test_cli_bad_runs_dir_exits_2_with_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "cybertron", "dashboard", str(tmp_path / "nope")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and result.stderr.strip() == (
        f"error: RUNS_DIR {tmp_path / 'nope'} is not a directory; give the folder that holds your run directories "
        "(e.g. runs/)")


@pytest.mark.slow  # a real training run: seconds on 2 cores; the files' format is covered above by the same writers
def test_a_real_training_run_is_summarized_and_tailed(tmp_path, fast_run_args):
    runs = tmp_path / "runs"
    assert cli_main(["train", *fast_run_args, "--steps", "3", "--eval.every", "0", "--out", str(runs / "real")]) == 0
    expected = [json.loads(line) for line in (runs / "real" / "metrics.jsonl").read_text().splitlines()]
    with client_for(runs) as client:
        [row] = client.get("/api/runs").json()
        tail = client.get("/api/runs/real/metrics").json()
    last_loss = [r for r in expected if "loss" in r][-1]
    assert (row["name"], row["method"], row["status"], row["step"], row["total_steps"]) == \
        ("real", "pretrain", "finished", 3, 3)
    assert (row["loss"], row["tokens_per_s"], row["checkpoints"]) == (last_loss["loss"], last_loss["tokens_per_s"], 1)
    assert row["val_loss"] == expected[-1]["val_loss"] and tail["records"] == expected
