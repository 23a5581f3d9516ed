"""A DeepSeek-V3-shaped model as a user runs it: `cybertron train --model deepseek-moe` on CPU, `export` to a
directory transformers loads as DeepseekV3ForCausalLM with our logits (and `convert` brings back), and
`cybertron serve` over that directory answering greedily with what transformers generate produces."""

import subprocess
import sys

import pytest
import torch

from tests.conftest import cli_env, read_metrics


def _cli(args):
    return subprocess.run([sys.executable, "-m", "cybertron", *args], capture_output=True, text=True,
                          env=cli_env(), timeout=300)


@pytest.mark.slow
def test_deepseek_preset_trains_exports_and_serves(tmp_path, fast_run_args):
    transformers = pytest.importorskip("transformers")
    openai = pytest.importorskip("openai")
    from cybertron.runs import load_run
    from tests.e2e.test_serve import running_server

    done = _cli([*fast_run_args, "--model", "deepseek-moe", "--steps", "3", "--out", str(tmp_path / "run")])
    assert done.returncode == 0, done.stderr
    assert [r["step"] for r in read_metrics(tmp_path / "run") if "loss" in r] == [1, 2, 3]
    exported = _cli(["export", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "hf")])
    assert exported.returncode == 0, exported.stderr
    ours = load_run(tmp_path / "run").model.eval()
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").float().eval()
    assert type(hf).__name__ == "DeepseekV3ForCausalLM"
    tokens = torch.randint(0, 300, (2, 17), generator=torch.Generator().manual_seed(0))
    converted = _cli(["convert", "--from-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "back")])
    assert converted.returncode == 0, converted.stderr
    back = load_run(tmp_path / "back").model.eval()
    with torch.no_grad():
        assert (hf(tokens).logits - ours(tokens)).abs().max() <= 1e-5
        assert (back(tokens) - ours(tokens)).abs().max() <= 1e-6
        prompt = tokens[0, :9]
        want = hf.generate(prompt[None], do_sample=False, max_new_tokens=10)[0, 9:].tolist()
    with running_server(tmp_path / "hf") as (url, _):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="test-key", max_retries=0)
        reply = client.completions.create(model="hf", prompt=prompt.tolist(), max_tokens=10, temperature=0.0,
                                          logprobs=0)
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tmp_path / "hf" / "tokenizer.json"))
    eos = hf.generation_config.eos_token_id
    want = [t for t in want if t != eos]
    assert want  # something was generated to compare
    assert reply.choices[0].text == tokenizer.decode(want)
