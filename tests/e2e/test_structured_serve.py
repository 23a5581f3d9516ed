"""Structured output through a real server on 127.0.0.1 and the official `openai` client: its parse()
helper with a Pydantic model, json_object replies, tool calls with tool_choice required / named (streamed
too) whose arguments validate, and a tool-call history sent back. The model is a tiny random Llama: only
the constraint makes its replies parse."""

import json
import socket
import threading
import time

import pytest
import torch
from pydantic import BaseModel, ConfigDict, Field

from tests.chat_templates import QWEN_TOOLS_TEMPLATE

openai = pytest.importorskip("openai")
transformers = pytest.importorskip("transformers")
uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("llguidance")

CORPUS = ['{"name": "Ada", "age": 36, "tags": ["math", "code"]}\n' * 20,
          "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>\n" * 20,
          "The quick brown fox jumps over the lazy dog. Hello world!\n" * 20]


class Person(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(max_length=8)
    age: int = Field(ge=0, le=150)
    admin: bool


class Weather(BaseModel):
    """Look up the forecast."""

    model_config = ConfigDict(extra="forbid")

    city: str = Field(max_length=8)
    days: int = Field(ge=1, le=7)


def make_model_dir(path):
    """A tiny random Llama saved by transformers, a byte-level BPE tokenizer.json and Qwen2.5's chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(CORPUS, trainer)
    path.mkdir(parents=True)
    tokenizer.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>",
                                                            "chat_template": QWEN_TOOLS_TEMPLATE}))
    config = transformers.LlamaConfig(vocab_size=tokenizer.get_vocab_size(), hidden_size=64,
                                      intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=2048,
                                      eos_token_id=tokenizer.token_to_id("<|endoftext|>"))
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(path)


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    """The app `cybertron serve` runs, served by uvicorn on 127.0.0.1 from a thread of this process."""
    from cybertron.runs import load_for_inference
    from cybertron.serve.engine import Engine
    from cybertron.serve.server import create_app

    path = tmp_path_factory.mktemp("structured") / "tiny-tools"
    make_model_dir(path)
    model, tokenizer, _ = load_for_inference(path, False, torch.device("cpu"))
    engine = Engine(model, tokenizer, max_batch_size=8, num_blocks=1024, block_size=16)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(engine, tokenizer, "tiny-tools"), host="127.0.0.1",
                                           port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.05)
    yield openai.OpenAI(api_key="unused", base_url=f"http://127.0.0.1:{port}/v1", max_retries=0)
    server.should_exit = True
    thread.join(timeout=10)


MESSAGES = [{"role": "user", "content": "Who is Ada? And the weather in Paris?"}]


def parse(client, **kwargs):
    """The client's structured-output helper: chat.completions.parse, beta.chat.completions.parse before 2.0."""
    completions = client.chat.completions if hasattr(client.chat.completions, "parse") else client.beta.chat.completions
    return completions.parse(**kwargs)


def test_parse_helper_returns_a_validated_model(client):
    completion = parse(client, model="tiny-tools", messages=MESSAGES, response_format=Person, max_tokens=300,
                       seed=1)
    choice = completion.choices[0]
    assert choice.finish_reason == "stop"
    assert isinstance(choice.message.parsed, Person)
    assert Person.model_validate_json(choice.message.content) == choice.message.parsed


def test_json_object_reply_parses(client):
    # Any object: its strings are unbounded, so a random model's reply ends when it draws a closing quote;
    # with this seed that is soon (a trained model would write ordinary JSON).
    reply = client.chat.completions.create(model="tiny-tools", messages=MESSAGES, max_tokens=300,
                                           response_format={"type": "json_object"}, seed=1)
    assert reply.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(reply.choices[0].message.content), dict)


def test_required_tool_calls_have_valid_arguments(client):
    tools = [openai.pydantic_function_tool(Weather, name="get_weather")]
    completion = parse(client, model="tiny-tools", messages=MESSAGES, tools=tools, tool_choice="required",
                       max_tokens=400, seed=3)
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    for call in choice.message.tool_calls:
        assert call.type == "function" and call.id.startswith("call_") and call.function.name == "get_weather"
        assert isinstance(call.function.parsed_arguments, Weather)  # the client validated the arguments

    # The calls and a result go back through the template, and the conversation goes on.
    history = [*MESSAGES, choice.message.model_dump(exclude_none=True, exclude={"parsed"}),
               {"role": "tool", "tool_call_id": choice.message.tool_calls[0].id, "content": "sunny, 21 C"}]
    for message in history[1:2]:
        for call in message["tool_calls"]:
            call["function"].pop("parsed_arguments", None)
    follow_up = client.chat.completions.create(model="tiny-tools", messages=history, tools=tools, max_tokens=5)
    assert follow_up.choices[0].message.role == "assistant"


def test_named_tool_call_streams_as_tool_call_deltas(client):
    tools = [{"type": "function", "function": {"name": "get_time", "parameters": {"type": "object",
                                                                                  "properties": {}}}},
             {"type": "function", "function": {"name": "get_weather",
                                               "parameters": Weather.model_json_schema()}}]
    stream = client.chat.completions.create(model="tiny-tools", messages=MESSAGES, tools=tools, stream=True,
                                            tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                            max_tokens=300, seed=5)
    calls: dict[int, dict] = {}
    finish = None
    for chunk in stream:
        for choice in chunk.choices:
            assert not choice.delta.content
            for delta in choice.delta.tool_calls or ():
                call = calls.setdefault(delta.index, {"name": "", "arguments": ""})
                call["name"] += delta.function.name or ""
                call["arguments"] += delta.function.arguments or ""
            finish = choice.finish_reason or finish
    assert finish == "tool_calls" and len(calls) == 1
    assert calls[0]["name"] == "get_weather"
    Weather.model_validate_json(calls[0]["arguments"])


def test_completions_take_a_json_schema_too(client):
    schema = {"type": "json_schema", "json_schema": {"name": "person", "schema": Person.model_json_schema()}}
    reply = client.completions.create(model="tiny-tools", prompt="Ada:", max_tokens=300, seed=2,
                                      extra_body={"response_format": schema})
    assert reply.choices[0].finish_reason == "stop"
    Person.model_validate_json(reply.choices[0].text)
