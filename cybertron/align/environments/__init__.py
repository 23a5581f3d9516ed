"""Multi-turn environments for GRPO: what a rollout talks to between the model's turns.

An environment is a class; one instance serves one episode (one sampled conversation), so it may keep
state in attributes. `reset(record)` gets a prompt record of the data file (its `prompt` and every other
field) and returns the opening chat messages; after each assistant turn, `step(messages, turn)` gets the
conversation so far (the reply last) and the turn with its parsed tool calls, and answers with the
messages to append (role "tool" for tool results, "user" for feedback), a reward and whether the episode
is over. An episode's reward is the sum of its steps' rewards. align/multiturn.py drives the episodes.

`align.environment` names the class as MODULE:CLASS (an importable module, e.g.
cybertron.align.environments.calculator:Calculator) or FILE.py:CLASS (a file of the user's).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from cybertron.align.user_code import import_file
from cybertron.errors import UserError

Message = dict[str, Any]


@dataclass(frozen=True)
class AssistantTurn:
    """What the model wrote in one turn: its text (tool-call markup included, end-of-text token excluded),
    the tool calls parsed from it in the chat template's format (OpenAI's shape, arguments decoded into a
    dict), and why generation stopped ("stop": end of turn or a tool call's end; "length": out of tokens)."""

    text: str
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    finish_reason: str = "stop"


@dataclass(frozen=True)
class EnvStep:
    """An environment's answer to a turn: messages to append, this step's reward, whether the episode ends."""

    messages: list[Message]
    reward: float = 0.0
    done: bool = False


class Environment(Protocol):
    # OpenAI function definitions ({"name", "description", "parameters"}) the model may call: the chat
    # template shows them where it describes tools, and only calls to these names are parsed.
    tools: list[dict[str, Any]]

    def reset(self, record: dict[str, Any]) -> list[Message]:
        """The episode's opening messages for a prompt record (its `prompt` and other fields)."""
        ...

    def step(self, messages: list[Message], turn: AssistantTurn) -> EnvStep:
        """Answer the assistant's latest turn (messages[-1] is that turn)."""
        ...


EnvironmentFactory = Callable[[], Environment]


def load_environment(spec: str) -> EnvironmentFactory:
    """MODULE:CLASS or FILE.py:CLASS -> the class (one instance per episode); UserError, one line, for a spec
    that does not resolve to a class with reset and step."""
    where, sep, name = spec.rpartition(":")
    if not sep or not where or not name:
        raise UserError(f"align.environment={spec!r}: expected MODULE:CLASS (e.g. "
                        "cybertron.align.environments.calculator:Calculator) or FILE.py:CLASS")
    if where.endswith(".py"):
        module = import_file(Path(where), "align.environment", "cybertron_environment")
    else:
        try:
            module = importlib.import_module(where)
        except Exception as err:  # noqa: BLE001 - user code: one line, not a traceback
            raise UserError(f"align.environment: importing {where} failed: {type(err).__name__}: {err}") from err
    cls = getattr(module, name, None)
    if cls is None or not callable(cls):
        raise UserError(f"align.environment: {where} defines no class {name!r}")
    missing = [m for m in ("reset", "step") if not callable(getattr(cls, m, None))]
    if missing:
        raise UserError(f"align.environment: {spec} has no {' or '.join(missing)} method; an environment "
                        "defines reset(record) -> messages and step(messages, turn) -> EnvStep")
    return cls


class EnvironmentReward:
    """GRPOSetup's reward source when align.environment is set: the episodes' own rewards (align/multiturn.py
    sums them); it holds the environment class and is never called on completions."""

    def __init__(self, spec: str):
        self.name = f"from environment {spec}"
        self.factory = load_environment(spec)

    def __call__(self, step: int, prompts: list[Any], completions: list[str], fields: list[dict[str, Any]],
                 sequences: list[list[int]]) -> list[float]:
        raise AssertionError("multi-turn rollouts take their rewards from the environment (align/multiturn.py)")
