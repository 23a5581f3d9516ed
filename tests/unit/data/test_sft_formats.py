"""SFT records in ShareGPT, Alpaca and OpenAI tool-call form become the chat messages a template renders."""

import json

import pytest
import transformers

from cybertron.data.chat_template import DEFAULT_CHAT_TEMPLATE, ChatTemplateError, render_with_assistant_spans
from cybertron.data.sft import IGNORE_INDEX, build_sft_data, read_conversations, tokenize_conversation
from cybertron.data.sft_formats import to_conversation
from cybertron.data.tokenizer import TextTokenizer
from cybertron.errors import DataError
from tests.chat_templates import QWEN_TOOLS_TEMPLATE
from tests.unit.finetune.tiny_hf import CHATML, write_tokenizer

CHAT = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."},
                     {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Another?"},
                     {"role": "assistant", "content": "Red."}]}
SHAREGPT = {"system": "Be brief.", "conversations": [
    {"from": "human", "value": "Name a colour."}, {"from": "gpt", "value": "Blue."},
    {"from": "human", "value": "Another?"}, {"from": "gpt", "value": "Red."}]}
CITY = {"type": "object", "properties": {"city": {"type": "string"}}}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Forecast", "parameters": CITY}}
TOOL_CHAT = {"tools": [WEATHER], "messages": [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    {"role": "assistant", "content": "It is sunny."}]}


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    out = tmp_path_factory.mktemp("qwen")
    write_tokenizer(out, CHATML)
    base = TextTokenizer.load(out)
    return TextTokenizer(base.backend, eos_token=base.eos_token, chat_template=QWEN_TOOLS_TEMPLATE)


def test_sharegpt_and_alpaca_read_as_the_chat_they_spell(tmp_path):
    chat = read_conversations(write_jsonl(tmp_path / "chat.jsonl", [CHAT]))
    assert read_conversations(write_jsonl(tmp_path / "share.jsonl", [SHAREGPT])) == chat
    alpaca = {"instruction": "Name a colour.", "input": "Primary colours only.", "output": "Blue.",
              "system": "Be brief."}
    assert read_conversations(write_jsonl(tmp_path / "alpaca.jsonl", [alpaca]), fmt="alpaca") == [[
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Name a colour.\n\nPrimary colours only."},
        {"role": "assistant", "content": "Blue."}]]
    no_input = to_conversation({"instruction": "Say hi.", "input": "", "output": "Hi."}, "x:1")
    assert [m["content"] for m in no_input.messages] == ["Say hi.", "Hi."]


def test_tool_calls_render_as_transformers_renders_them_and_only_the_assistant_learns(qwen):
    conversation = to_conversation(TOOL_CHAT, "tools.jsonl:1")
    text, spans = render_with_assistant_spans(qwen.chat_template, conversation.messages, "", qwen.eos_token,
                                              conversation.tools)
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=qwen.backend, eos_token=qwen.eos_token)
    hf.chat_template = QWEN_TOOLS_TEMPLATE
    reference = hf.apply_chat_template(
        [{"role": "user", "content": "Weather in Paris?"},
         {"role": "assistant", "content": "", "tool_calls": [
             {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
         {"role": "tool", "content": "sunny"}, {"role": "assistant", "content": "It is sunny."}],
        tools=[WEATHER], tokenize=False)
    assert text == reference
    learned = "".join(text[lo:hi] for lo, hi in spans)
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in learned
    assert "It is sunny." in learned and "<tool_response>" not in learned and "Weather in Paris" not in learned
    example = tokenize_conversation(qwen, conversation.messages, conversation.tools)
    targets = qwen.decode([t for t in example.labels if t != IGNORE_INDEX])
    assert "get_weather" in targets and "Paris" in targets and "Weather in Paris" not in targets


def test_sharegpt_function_call_and_observation_turns_are_tool_use():
    record = {"tools": json.dumps([WEATHER["function"]]), "conversations": [
        {"from": "human", "value": "Weather in Paris?"},
        {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}})},
        {"from": "observation", "value": "sunny"}, {"from": "gpt", "value": "It is sunny."}]}
    expected = to_conversation(TOOL_CHAT, "a:1")
    got = to_conversation(record, "b:1")
    strip_ids = lambda ms: [{k: v for k, v in m.items() if k != "tool_call_id"} for m in ms]
    assert [{**m, "tool_calls": [{k: v for k, v in c.items() if k != "id"} for c in m["tool_calls"]]}
            if "tool_calls" in m else m for m in strip_ids(expected.messages)] == got.messages
    assert got.tools == [WEATHER]


def test_a_template_that_drops_tool_calls_is_refused(tmp_path):
    write_tokenizer(tmp_path, DEFAULT_CHAT_TEMPLATE)
    conversation = to_conversation(TOOL_CHAT, "tools.jsonl:1")
    with pytest.raises(ChatTemplateError, match="does not render tool calls"):
        tokenize_conversation(TextTokenizer.load(tmp_path), conversation.messages, conversation.tools)


@pytest.mark.parametrize("record, fragment", [
    ({"conversations": [{"from": "alien", "value": "hi"}]}, "each ShareGPT turn needs 'from'"),
    ({"instruction": "x", "output": 3}, "Alpaca records need string"),
    ({"messages": [{"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": "{oops"}}]}]}, "arguments of tool call 'f'"),
    ({"messages": [{"role": "assistant", "content": None, "tool_calls": []}]}, "'tool_calls' must be"),
    ({"conversations": [{"from": "human", "value": "hi"}]}, "no assistant message"),
    ({"question": "hi"}, "no known fine-tuning format"),
])
def test_a_malformed_record_is_one_line_naming_file_and_line(tmp_path, record, fragment):
    path = write_jsonl(tmp_path / "data.jsonl", [SHAREGPT, record])
    with pytest.raises(DataError, match=fragment) as err:
        read_conversations(path)
    assert str(err.value).startswith(f"{path}:2: ") and "\n" not in str(err.value)


def test_an_explicit_format_is_enforced(tmp_path):
    with pytest.raises(DataError, match=r"data.jsonl:1: Alpaca records need"):
        read_conversations(write_jsonl(tmp_path / "data.jsonl", [CHAT]), fmt="alpaca")


def test_tool_conversations_build_packed_rows(tmp_path, qwen):
    path = write_jsonl(tmp_path / "tools.jsonl", [TOOL_CHAT, CHAT] * 3)
    data = build_sft_data(path, qwen, 2048, val_fraction=0.0, seed=0)
    assert data.n_examples == 6 and data.n_truncated == 0
