"""Fine-tuning records in the formats people already have, turned into chat messages.

  chat             {"messages": [{"role", "content"}, ...], "tools": [...]?}   (OpenAI; tool calls included)
  sharegpt         {"conversations": [{"from": "human"|"gpt"|"system"|"tool"|"function_call", "value"}],
                    "system"?, "tools"?}
  alpaca           {"instruction", "input"?, "output", "system"?}
  prompt_response  {"prompt", "response", "system"?}
data.format=auto picks by the keys of each record. Tool calls follow OpenAI: an assistant message holds
`tool_calls` [{"type": "function", "function": {"name", "arguments"}}] (content may be null), and a
`tool` message the result. They reach the chat template as transformers hands them over: arguments as an
object (decoded from OpenAI's JSON string) and the record's `tools` as the template's `tools`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from cybertron.data.chat_template import Message
from cybertron.errors import DataError

FORMATS = ("auto", "chat", "sharegpt", "alpaca", "prompt_response")
ROLES = ("system", "user", "assistant", "tool")
# ShareGPT speaker names (FastChat, LLaMA-Factory, OpenHermes) -> roles.
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bing": "assistant", "bard": "assistant", "system": "system",
                  "tool": "tool", "observation": "tool", "function_response": "tool", "function_call": "assistant"}


@dataclass
class Conversation:
    messages: list[Message]
    tools: list[dict[str, Any]] | None = None  # function definitions the template shows the model


def detect_format(record: dict[str, Any]) -> str | None:
    if "messages" in record:
        return "chat"
    if "conversations" in record:
        return "sharegpt"
    if "instruction" in record and "output" in record:
        return "alpaca"
    if "prompt" in record and "response" in record:
        return "prompt_response"
    return None


def to_conversation(record: Any, where: str, fmt: str = "auto") -> Conversation:
    """One record as a Conversation; DataError starting with `where` (file and line or record) if malformed."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    chosen = detect_format(record) if fmt == "auto" else fmt
    if chosen is None:
        raise DataError(f"{where}: no known fine-tuning format in keys {sorted(record)[:12]}; expected 'messages' "
                        "(chat), 'conversations' (ShareGPT), 'instruction'/'output' (Alpaca) or 'prompt'/'response'")
    conversation = _CONVERTERS[chosen](record, where)
    if not any(m["role"] == "assistant" for m in conversation.messages):
        raise DataError(f"{where}: the conversation has no assistant message to learn from")
    return conversation


def _chat(record: dict[str, Any], where: str) -> Conversation:
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list")
    return Conversation([_message(m, where) for m in messages], _tools(record, where))


def _message(m: Any, where: str) -> Message:
    if not (isinstance(m, dict) and m.get("role") in ROLES):
        raise DataError(f"{where}: each message needs a role in {ROLES}, got {m!r}"[:300])
    calls = m.get("tool_calls")
    content = m.get("content")
    if calls is not None and m["role"] == "assistant":
        if content is not None and not isinstance(content, str):
            raise DataError(f"{where}: an assistant message's content must be a string or null, got {content!r}"[:300])
        return {"role": "assistant", "content": content or "", "tool_calls": _tool_calls(calls, where)}
    if not isinstance(content, str):
        raise DataError(f"{where}: a {m['role']} message needs a string content, got {m!r}"[:300])
    message: Message = {"role": m["role"], "content": content}
    for key in ("name", "tool_call_id"):  # a tool result names its call (templates may show either)
        if m["role"] == "tool" and isinstance(m.get(key), str):
            message[key] = m[key]
    return message


def _tool_calls(calls: Any, where: str) -> list[dict[str, Any]]:
    if not isinstance(calls, list) or not calls:
        raise DataError(f"{where}: 'tool_calls' must be a non-empty list of "
                        '{"type": "function", "function": {"name", "arguments"}}')
    out = []
    for call in calls:
        function = call.get("function", call) if isinstance(call, dict) else None
        name = function.get("name") if isinstance(function, dict) else None
        if not isinstance(name, str) or not name:
            raise DataError(f"{where}: a tool call needs a function name, got {call!r}"[:300])
        arguments = function.get("arguments", {})
        if isinstance(arguments, str):  # OpenAI sends a JSON string; templates expect the object
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except json.JSONDecodeError as err:
                raise DataError(f"{where}: the arguments of tool call {name!r} are not valid JSON ({err.msg})") from err
        if not isinstance(arguments, dict):
            raise DataError(f"{where}: the arguments of tool call {name!r} must be a JSON object, "
                            f"got {arguments!r}"[:300])
        entry = {"type": "function", "function": {"name": name, "arguments": arguments}}
        if isinstance(call, dict) and isinstance(call.get("id"), str):
            entry["id"] = call["id"]
        out.append(entry)
    return out


def _tools(record: dict[str, Any], where: str) -> list[dict[str, Any]] | None:
    tools = record.get("tools")
    if tools is None or tools == "":
        return None
    if isinstance(tools, str):  # ShareGPT exports keep them as a JSON string
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as err:
            raise DataError(f"{where}: 'tools' is not valid JSON ({err.msg})") from err
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise DataError(f"{where}: 'tools' must be a list of function definitions")
    return [t if "type" in t else {"type": "function", "function": t} for t in tools]


def _system(record: dict[str, Any], where: str) -> list[Message]:
    system = record.get("system")
    if system is None or system == "":
        return []
    if not isinstance(system, str):
        raise DataError(f"{where}: 'system' must be a string")
    return [{"role": "system", "content": system}]


def _sharegpt(record: dict[str, Any], where: str) -> Conversation:
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: 'conversations' must be a non-empty list of {{'from', 'value'}} turns")
    messages = _system(record, where)
    for turn in turns:
        speaker = turn.get("from") if isinstance(turn, dict) else None
        if speaker not in SHAREGPT_ROLES or not isinstance(turn.get("value"), str):
            raise DataError(f"{where}: each ShareGPT turn needs 'from' in {sorted(SHAREGPT_ROLES)} and a string "
                            f"'value', got {turn!r}"[:300])
        if speaker == "function_call":  # LLaMA-Factory: the value is the call as JSON
            try:
                call = json.loads(turn["value"])
            except json.JSONDecodeError as err:
                raise DataError(f"{where}: a function_call turn's value is not valid JSON ({err.msg})") from err
            calls = call if isinstance(call, list) else [call]
            messages.append({"role": "assistant", "content": "", "tool_calls": _tool_calls(calls, where)})
        else:
            messages.append({"role": SHAREGPT_ROLES[speaker], "content": turn["value"]})
    return Conversation(messages, _tools(record, where))


def _alpaca(record: dict[str, Any], where: str) -> Conversation:
    instruction, extra, output = record.get("instruction"), record.get("input") or "", record.get("output")
    if not (isinstance(instruction, str) and isinstance(extra, str) and isinstance(output, str)):
        raise DataError(f"{where}: Alpaca records need string 'instruction' and 'output' (and 'input' if given)")
    # The Alpaca prompt puts the input after the instruction; a blank line keeps them apart.
    user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    return Conversation([*_system(record, where), {"role": "user", "content": user},
                         {"role": "assistant", "content": output}])


def _prompt_response(record: dict[str, Any], where: str) -> Conversation:
    prompt, response = record.get("prompt"), record.get("response")
    if not (isinstance(prompt, str) and isinstance(response, str)):
        raise DataError(f"{where}: expected 'messages' (chat format) or string 'prompt' and 'response' fields, "
                        f"got keys {sorted(record)}")
    return Conversation([*_system(record, where), {"role": "user", "content": prompt},
                         {"role": "assistant", "content": response}])


_CONVERTERS = {"chat": _chat, "sharegpt": _sharegpt, "alpaca": _alpaca, "prompt_response": _prompt_response}
