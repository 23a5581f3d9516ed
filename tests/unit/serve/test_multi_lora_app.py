"""The `model` field picks the base or a LoRA adapter by name (in-process app), and `cybertron serve --lora`'s
one-line errors. (tests/e2e/test_serve_lora.py runs a real server with the official client.)"""

import copy
import re

import pytest
from fastapi.testclient import TestClient

from cybertron.cli import main as cli_main
from cybertron.finetune.lora import LoRASpec, merge_lora_
from cybertron.finetune.peft_format import write_peft_adapter
from cybertron.hf_runs import convert_from_hf
from cybertron.models.hf import save_hf_model
from cybertron.runs import adapter_from_model
from cybertron.serve.engine import Engine
from cybertron.serve.sampling import SamplingParams
from cybertron.serve.server import create_app
from tests.unit.serve.test_multi_lora import _trained

SPECS = {"a": LoRASpec(rank=4, alpha=8.0, targets=["q_proj", "v_proj", "down_proj"]),
         "b": LoRASpec(rank=2, alpha=2.0, targets=["o_proj", "up_proj"], dora=True)}
PARAMS = dict(max_tokens=6, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def trained(text_model):
    return {name: _trained(text_model, spec, seed) for seed, (name, spec) in enumerate(SPECS.items(), start=1)}


@pytest.fixture
def client(text_model, tokenizer, trained):
    engine = Engine(copy.deepcopy(text_model), tokenizer, max_batch_size=8, num_blocks=64, block_size=8,
                    adapters=[adapter_from_model(name, model) for name, model in trained.items()])
    with TestClient(create_app(engine, tokenizer, "tiny")) as client:
        yield client


def test_models_lists_the_base_and_its_adapters(client):
    data = client.get("/v1/models").json()["data"]
    assert [m["id"] for m in data] == ["tiny", "a", "b"]
    assert "parent" not in data[0] and [m["parent"] for m in data[1:]] == ["tiny", "tiny"]


def test_the_model_field_chooses_the_adapter(client, text_model, tokenizer, trained):
    prompt = tokenizer.encode("The quick brown")
    texts = {}
    for name in ("tiny", "a", "b"):
        response = client.post("/v1/completions", json={"model": name, "prompt": "The quick brown", **PARAMS})
        assert response.status_code == 200 and response.json()["model"] == name
        texts[name] = response.json()["choices"][0]["text"]
        reference = text_model if name == "tiny" else merge_lora_(copy.deepcopy(trained[name])).eval()
        expected = Engine(reference, tokenizer, num_blocks=16, block_size=8).generate(
            [prompt], SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True))[0].text
        assert texts[name] == expected, name
    assert len(set(texts.values())) == 3  # the adapters do change the text
    chat = client.post("/v1/chat/completions", json={"model": "b", "messages": [{"role": "user", "content": "Hi"}],
                                                     **PARAMS})
    assert chat.status_code == 200 and chat.json()["model"] == "b"


def test_an_unknown_model_is_404_naming_it(client):
    for path, extra in [("/v1/completions", {"prompt": "Hi"}),
                        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]})]:
        response = client.post(path, json={"model": "c", **extra})
        assert response.status_code == 404
        error = response.json()["error"]
        assert error["code"] == "model_not_found" and error["param"] == "model"
        assert error["message"] == "the model 'c' does not exist; this server serves 'tiny', 'a', 'b'"


@pytest.fixture(scope="module")
def dirs(text_model, tokenizer, trained, tmp_path_factory):
    """A base as a Hugging Face directory, and adapter `a` in PEFT's format over it."""
    root = tmp_path_factory.mktemp("lora_cli")
    save_hf_model(text_model.state_dict(), text_model.config, root / "base")
    tokenizer.save(root / "base")
    write_peft_adapter(trained["a"], SPECS["a"], str(root / "base"), root / "a")
    convert_from_hf(root / "base", root / "whole")  # a run whose checkpoint holds every weight
    return root


@pytest.mark.parametrize("lora, message", [
    (["x"], "--lora 'x': give NAME=PATH"),
    (["a={root}/a", "a={root}/a"], "the name 'a' is already taken by another --lora"),
    (["base={root}/a"], "the name 'base' is already taken by the base model"),
    (["a={root}/nowhere"], "--lora a={root}/nowhere: not a directory"),
    (["a={root}"], "--lora a={root} is neither a PEFT adapter directory"),
    (["a={root}/whole"], "--lora a={root}/whole is a pretrain run whose checkpoints hold every weight"),
])
def test_serve_lora_flag_mistakes_are_one_line_errors(dirs, lora, message, capsys):
    argv = ["serve", "--model", str(dirs / "base"), "--device", "cpu", "--port", "0"]
    for entry in lora:
        argv += ["--lora", entry.format(root=dirs)]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --lora ") and message.format(root=dirs) in err and err.count("\n") == 1


def test_serve_refuses_an_adapter_made_for_another_model(dirs, tokenizer, capsys):
    from cybertron.models.llama import build_model
    from cybertron.models.presets import preset_config

    other = build_model(preset_config("debug", vocab_size=tokenizer.vocab_size, dim=32, n_heads=2, n_kv_heads=1,
                                      ffn_dim=64), seed=0)
    save_hf_model(other.state_dict(), other.config, dirs / "other")
    tokenizer.save(dirs / "other")
    argv = ["serve", "--model", str(dirs / "other"), "--device", "cpu", "--port", "0", "--lora", f"a={dirs}/a"]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert re.fullmatch(r"error: adapter 'a': layers\.0\.\w+\.\w+ A has shape \(4, (64|128)\) but the base needs "
                        r"\(4, (32|64)\); it was made for another model\n", err)
