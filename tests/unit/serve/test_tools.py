"""Tool calls: the format read off a chat template, the history rendered as transformers renders it,
constrained replies that are valid calls, parsing of free replies, and streaming that holds back only what
may become a call."""

import json
import sys

import pytest
import torch
from fastapi.testclient import TestClient
from pydantic import BaseModel, ConfigDict, Field

from cybertron.data.tokenizer import TextTokenizer
from cybertron.models.llama import build_model
from cybertron.models.presets import preset_config
from cybertron.serve.chat import render_chat
from cybertron.serve.engine import Engine, RequestOutput
from cybertron.serve.protocol import ChatRequest
from cybertron.serve.sampling import InvalidParameter, SamplingParams, mask_logits
from cybertron.serve.server import create_app
from cybertron.serve.structured import GrammarCompiler, token_mask
from cybertron.serve.tools import ToolCallFormat, ToolChatFormat, ToolUse, tool_use
from tests.chat_templates import LLAMA_TOOLS_TEMPLATE, QWEN_TOOLS_TEMPLATE


class Weather(BaseModel):
    model_config = ConfigDict(extra="forbid")

    city: str = Field(max_length=8)
    days: int = Field(ge=1, le=7)


WEATHER = {"name": "get_weather", "description": "Forecast", "parameters": Weather.model_json_schema()}
TIME = {"name": "get_time"}  # no parameters: takes an empty object


def with_template(tokenizer, template):
    return TextTokenizer(tokenizer.backend, eos_token=tokenizer.eos_token, chat_template=template)


def test_qwen_format_is_read_off_its_template(tokenizer):
    fmt = ToolCallFormat.detect(with_template(tokenizer, QWEN_TOOLS_TEMPLATE))
    assert fmt == ToolCallFormat(begin="<tool_call>\n", head='{"name": "', middle='", "arguments": ', tail="}",
                                 end="\n</tool_call>", separator="\n", name_key="name", arguments_key="arguments")


def test_llama_style_format_is_a_bare_call_with_parameters_one_per_reply(tokenizer):
    fmt = ToolCallFormat.detect(with_template(tokenizer, LLAMA_TOOLS_TEMPLATE))
    assert (fmt.begin, fmt.head, fmt.middle, fmt.tail, fmt.end) == ("", '{"name": "', '", "parameters": ', "}", "")
    assert fmt.separator is None and fmt.arguments_key == "parameters"


@pytest.mark.parametrize("template", [None, "{% for m in messages %}{{ m['content'] }}{% endfor %}",
                                      "{{ raise_exception('no tools here') if messages[-1].tool_calls }}"])
def test_a_template_without_tool_calls_is_refused_naming_tools(tokenizer, template):
    with pytest.raises(InvalidParameter) as err:
        tool_use(with_template(tokenizer, template), [WEATHER], "auto", None)
    assert err.value.param == "tools" and err.value.code == "unsupported_parameter"


def test_tool_choice_must_be_one_the_tools_can_meet(tokenizer):
    qwen = with_template(tokenizer, QWEN_TOOLS_TEMPLATE)
    cases = [([], "required", "tool_choice"), ([], {"type": "function", "function": {"name": "f"}}, "tool_choice"),
             ([WEATHER], {"type": "function", "function": {"name": "get_time"}}, "tool_choice"),
             ([WEATHER, WEATHER], "auto", "tools")]
    for functions, choice, param in cases:
        with pytest.raises(InvalidParameter) as err:
            tool_use(qwen, functions, choice, None)
        assert err.value.param == param
    assert tool_use(qwen, [], None, None) is None and tool_use(qwen, [WEATHER], "none", None) is None
    assert tool_use(qwen, [WEATHER], None, None).choice == "auto"
    assert tool_use(qwen, [WEATHER], {"type": "function", "function": {"name": "get_weather"}}, False).choice == \
        "get_weather"


def test_tool_history_renders_as_transformers_renders_it(tokenizer):
    transformers = pytest.importorskip("transformers")
    qwen = with_template(tokenizer, QWEN_TOOLS_TEMPLATE)
    arguments = {"city": "Paris", "days": 2}
    body = ChatRequest.model_validate({"messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": json.dumps(arguments)}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}],
        "tools": [{"type": "function", "function": WEATHER}]})
    ours = render_chat(qwen, [m.template_message(i) for i, m in enumerate(body.messages)],
                       [t.model_dump(exclude_none=True) for t in body.tools])
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend, eos_token=tokenizer.eos_token)
    hf.chat_template = QWEN_TOOLS_TEMPLATE
    reference = hf.apply_chat_template(
        [{"role": "user", "content": "Weather in Paris?"},
         {"role": "assistant", "content": "", "tool_calls": [
             {"type": "function", "function": {"name": "get_weather", "arguments": arguments}}]},
         {"role": "tool", "content": "sunny"}],
        tools=[{"type": "function", "function": WEATHER}], tokenize=False, add_generation_prompt=True)
    assert ours == reference
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n</tool_call>' in ours


def test_history_arguments_must_be_a_json_object(tokenizer):
    body = ChatRequest.model_validate({"messages": [{"role": "assistant", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "[1, 2"}}]}]})
    with pytest.raises(InvalidParameter) as err:
        body.messages[0].template_message(0)
    assert err.value.param == "messages.0.tool_calls.0.function.arguments"


@pytest.mark.parametrize("template", [QWEN_TOOLS_TEMPLATE, LLAMA_TOOLS_TEMPLATE])
@pytest.mark.parametrize("choice", ["required", "get_weather"])
def test_constrained_replies_are_valid_calls(text_model, tokenizer, template, choice):
    """A random model, sampled: every reply is one or more calls whose arguments validate."""
    chat = with_template(tokenizer, template)
    use = tool_use(chat, [WEATHER, TIME], choice if choice == "required" else
                   {"type": "function", "function": {"name": choice}}, None)
    grammar = GrammarCompiler(chat, text_model.config.vocab_size).lark(use.grammar(), "tools")
    engine = Engine(text_model, chat, num_blocks=128, block_size=8)
    params = [SamplingParams(temperature=1.0, seed=seed, max_tokens=200, grammar=grammar) for seed in range(3)]
    for result in engine.generate([chat.encode("Weather?")] * 3, params):
        assert result.finish_reason == "stop", result.text
        first, last, calls = use.find(result.text)
        assert calls and (first, last) == (0, len(result.text))
        assert len(calls) == 1 or use.format.separator is not None and choice == "required"
        for call in calls:
            assert call["function"]["name"] in ([choice] if choice != "required" else ["get_weather", "get_time"])
            arguments = json.loads(call["function"]["arguments"])
            if call["function"]["name"] == "get_weather":
                Weather.model_validate(arguments)
            else:
                assert arguments == {}


def test_free_replies_are_parsed_into_content_and_calls(tokenizer):
    use = tool_use(with_template(tokenizer, QWEN_TOOLS_TEMPLATE), [WEATHER, TIME], "auto", None)

    def split(text):
        first, last, calls = use.find(text)
        return text[:first] + text[last:], [(c["function"]["name"], json.loads(c["function"]["arguments"]))
                                            for c in calls]

    two = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "days": 1}}\n'
           '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>')
    assert split(two) == ("Let me check.\n", [("get_weather", {"city": "Oslo", "days": 1}), ("get_time", {})])
    assert split("No tools needed.") == ("No tools needed.", [])
    unknown = '<tool_call>\n{"name": "launch", "arguments": {}}\n</tool_call>'
    assert split(unknown) == (unknown, [])
    broken = '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>\n<tool_call>\n{"name": "get_'
    assert split(broken) == ('<tool_call>\n{"name": "get_', [("get_time", {})])


def test_streaming_holds_back_only_what_may_become_a_call(tokenizer):
    use = tool_use(with_template(tokenizer, QWEN_TOOLS_TEMPLATE), [WEATHER], "auto", None)
    assert use.shown("Hello there") == len("Hello there")
    assert use.shown("Hello <tool_") == len("Hello ")
    assert use.shown("Hello <tool_call>\n{") == len("Hello ")
    assert use.shown("a < b") == len("a < b")
    required = ToolUse(use.format, use.functions, "required", True)
    assert required.shown("<tool_call>") == 0

    fmt = ToolChatFormat(tokenizer, False, use)
    pieces = ["It is ", "<tool", '_call>\n{"name": "get_weather", ', '"arguments": {"city": "Rome", "days": 3}}',
              "\n</tool_call>"]
    chunks = [fmt.chunk(0, RequestOutput(0, [1], [0.0], [], piece, i == len(pieces) - 1,
                                         "stop" if i == len(pieces) - 1 else None))
              for i, piece in enumerate(pieces)]
    deltas = [c["delta"] for c in chunks if c is not None]
    assert deltas[0] == {"content": "It is "} and all("content" not in d for d in deltas[1:])
    assert chunks[-1]["finish_reason"] == "tool_calls"
    (call,) = chunks[-1]["delta"]["tool_calls"]
    assert call["index"] == 0 and call["id"].startswith("call_") and call["type"] == "function"
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Rome", "days": 3}'}


def test_auto_calls_follow_their_schema_once_begun(tokenizer, text_model):
    """A reply that starts free and writes the marker: from there on only a valid call can follow, then free
    text again. Sampled from random logits under the mask, token by token, after a forced opening."""
    chat = with_template(tokenizer, QWEN_TOOLS_TEMPLATE)
    use = tool_use(chat, [WEATHER, TIME], "auto", None)
    grammar = GrammarCompiler(chat, text_model.config.vocab_size).lark(use.grammar(), "tools")
    vocab = text_model.config.vocab_size
    for seed in range(3):
        matcher, tokens = grammar.matcher(), chat.encode("Let me look. <tool_call>")
        for token in tokens:
            assert matcher.advance(token) is None
        generator = torch.Generator().manual_seed(seed)
        while not chat.decode(tokens).endswith("</tool_call>"):
            logits = mask_logits(torch.randn(1, vocab, generator=generator), token_mask([matcher], vocab, "cpu"))
            token = int(torch.multinomial(logits.softmax(-1), 1, generator=generator))
            assert matcher.advance(token) is None and len(tokens) < 300
            tokens.append(token)
        first, last, calls = use.find(chat.decode(tokens))
        assert first == len("Let me look. ") and len(calls) == 1
        if calls[0]["function"]["name"] == "get_weather":
            Weather.model_validate_json(calls[0]["function"]["arguments"])
        # After the call the reply is free again: plain text is allowed.
        free = token_mask([matcher], vocab, "cpu")
        assert torch.isfinite(mask_logits(torch.zeros(1, vocab), free)).sum() > vocab // 2


@pytest.fixture(scope="module")
def long_model(tokenizer):
    """The debug shape with room for Qwen's tool prompt (its system turn describes every tool)."""
    return build_model(preset_config("debug", vocab_size=tokenizer.vocab_size, max_seq_len=1024), seed=1).eval()


def test_strict_auto_needs_a_marked_format_and_the_library(long_model, tokenizer, monkeypatch):
    strict = {"type": "function", "function": {**WEATHER, "strict": True}}
    loose = {"type": "function", "function": WEATHER}
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}
    llama = with_template(tokenizer, LLAMA_TOOLS_TEMPLATE)
    with TestClient(create_app(Engine(long_model, llama, num_blocks=256, block_size=8), llama, "t")) as client:
        refused = client.post("/v1/chat/completions", json={**body, "tools": [strict]})
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "tools"
        assert client.post("/v1/chat/completions", json={**body, "tools": [loose]}).status_code == 200
    qwen = with_template(tokenizer, QWEN_TOOLS_TEMPLATE)
    monkeypatch.setitem(sys.modules, "llguidance", None)  # as if the extra were not installed
    with TestClient(create_app(Engine(long_model, qwen, num_blocks=256, block_size=8), qwen, "t")) as client:
        missing = client.post("/v1/chat/completions", json={**body, "tools": [strict]})
        assert missing.status_code == 400 and missing.json()["error"]["code"] == "missing_extra"
        assert client.post("/v1/chat/completions", json={**body, "tools": [loose]}).status_code == 200


def test_without_parallel_calls_only_the_first_counts(tokenizer):
    use = tool_use(with_template(tokenizer, QWEN_TOOLS_TEMPLATE), [TIME], "auto", False)
    call = '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'
    first, last, calls = use.find(call + "\n" + call)
    assert len(calls) == 1 and (first, last) == (0, len(call) + 1)
    assert "call*" not in use.grammar() and "call?" in use.grammar()
