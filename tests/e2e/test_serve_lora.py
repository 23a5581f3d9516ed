"""`cybertron serve --model BASE --lora NAME=PATH ...` as a user runs it: the official `openai` client picks the
base, a cybertron DoRA fine-tuning run or a PEFT-saved LoRA adapter by `model`, with concurrent requests for
all three decoded in shared batches; each answer is what that adapter merged into the base gives alone."""

import concurrent.futures
import contextlib
import os
import subprocess
import sys

import pytest
import torch

openai = pytest.importorskip("openai")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from cybertron.data.tokenizer import TextTokenizer  # noqa: E402
from cybertron.models.hf import load_hf_model  # noqa: E402
from cybertron.runs import load_peft_model, load_run  # noqa: E402
from cybertron.serve.engine import Engine  # noqa: E402
from cybertron.serve.sampling import SamplingParams  # noqa: E402
from tests.e2e.test_serve import free_port, wait_healthy  # noqa: E402
from tests.parity.test_lora_export import _finetune  # noqa: E402
from tests.parity.test_multi_lora_peft import _save_with_peft  # noqa: E402

MAX_TOKENS = 8


@contextlib.contextmanager
def lora_server(base, adapters):
    port = free_port()
    log = open(base.parent / "server.log", "w+")
    argv = [sys.executable, "-m", "cybertron", "serve", "--model", str(base), "--port", str(port), "--device",
            "cpu", "--num-blocks", "256", "--max-batch-size", "16"]
    for name, path in adapters.items():
        argv += ["--lora", f"{name}={path}"]
    process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, process, log)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


@pytest.mark.slow
def test_openai_client_chooses_adapters_by_model_in_concurrent_requests(tmp_path):
    run = _finetune(tmp_path, "llama", "dora", steps=3)  # base: tmp_path / "hf"
    base = tmp_path / "hf"
    lora_dir = _save_with_peft(base, tmp_path / "peft-lora", 1, r=4, lora_alpha=8,
                               target_modules=["q_proj", "v_proj", "down_proj"])
    references = {"hf": load_hf_model(base).eval(), "tuned": load_run(run.run_dir).model,
                  "support": load_peft_model(lora_dir)}  # adapters merged into plain weights
    tokenizer = TextTokenizer.load(base)
    prompts = ["the cat sat on", "what is the color of the sky", "tell me a story about a small dog"]
    expected = {}
    for name, model in references.items():
        engine = Engine(model, tokenizer, num_blocks=64, block_size=16)
        results = engine.generate([tokenizer.encode(p) for p in prompts],
                                  SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True))
        expected.update({(name, p): r.text for p, r in zip(prompts, results)})
    assert len({expected[(name, prompts[2])] for name in references}) == 3  # three different models

    with lora_server(base, {"tuned": run.run_dir, "support": lora_dir}) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["hf", "tuned", "support"]

        def complete(name, prompt):
            response = client.completions.create(model=name, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                                                 extra_body={"ignore_eos": True})
            assert response.model == name
            return response.choices[0].text

        jobs = [(name, p) for p in prompts for name in references] * 2  # 18 requests, models interleaved
        with concurrent.futures.ThreadPoolExecutor(max_workers=9) as pool:
            answers = list(pool.map(lambda job: complete(*job), jobs))
        assert answers == [expected[job] for job in jobs]

        stream = client.completions.create(model="support", prompt=prompts[1], max_tokens=MAX_TOKENS,
                                           temperature=0, stream=True, extra_body={"ignore_eos": True})
        assert "".join(chunk.choices[0].text for chunk in stream if chunk.choices) == expected[("support",
                                                                                                prompts[1])]
        with pytest.raises(openai.NotFoundError) as err:
            client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
        assert err.value.body["code"] == "model_not_found" and "'nope'" in err.value.body["message"]
    assert torch.is_grad_enabled()  # nothing above changed process-wide settings
