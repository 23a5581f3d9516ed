"""A calculator tool on arithmetic word problems made up locally (no network, no data sets).

The model reads a problem ("Ann has 3 apples and gets 4 more. How many apples does Ann have now?"), may
call `calculator` with an expression, reads the result (a `tool` message), and answers. The reward is 1
for a final answer equal to the problem's (the last number of the reply that ends the episode), else 0.5
if it made a well-formed calculator call: partial credit that a small model finds (using the tool) before it
answers well.
"""

from __future__ import annotations

import ast
import json
import operator
import random
import re
from pathlib import Path
from typing import Any

from cybertron.align.environments import AssistantTurn, EnvStep, Message

CALCULATOR = {"name": "calculator", "description": "Evaluate an arithmetic expression (+ - * / and parentheses).",
              "parameters": {"type": "object", "properties": {"expression": {"type": "string"}},
                             "required": ["expression"]}}
CALL_CREDIT = 0.5  # reward for a well-formed call when the final answer is wrong
NAMES = ("Ann", "Bob", "Cy", "Dee", "Eve", "Finn")
THINGS = ("apples", "books", "coins", "cards", "pens", "shells")
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def problem(rng: random.Random, high: int = 9) -> dict[str, Any]:
    """A word problem adding or taking away numbers in [0, high]: {"prompt", "answer", "expression"}."""
    a, b = rng.randint(0, high), rng.randint(0, high)
    who, what = rng.choice(NAMES), rng.choice(THINGS)
    if rng.random() < 0.5 or b > a:
        return {"prompt": f"{who} has {a} {what} and gets {b} more. How many {what} does {who} have now?",
                "answer": str(a + b), "expression": f"{a}+{b}"}
    return {"prompt": f"{who} has {a} {what} and gives away {b}. How many {what} does {who} have now?",
            "answer": str(a - b), "expression": f"{a}-{b}"}


def write_problems(path: str | Path, n: int, seed: int = 0, high: int = 9) -> Path:
    """A prompt file for `cybertron align --method grpo --align.environment ...calculator:Calculator`."""
    rng = random.Random(seed)
    path = Path(path)
    path.write_text("".join(json.dumps(problem(rng, high)) + "\n" for _ in range(n)))
    return path


def evaluate(expression: str) -> float:
    """The value of an arithmetic expression of numbers, + - * / and parentheses (nothing else is run);
    ValueError for anything else."""
    if len(expression) > 200:
        raise ValueError("expression too long")

    def value(node: ast.AST) -> float:
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
            return node.value
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            v = value(node.operand)
            return -v if isinstance(node.op, ast.USub) else v
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](value(node.left), value(node.right))
        raise ValueError(f"not arithmetic: {ast.dump(node)[:40]}")

    try:
        return value(ast.parse(expression, mode="eval").body)
    except (SyntaxError, ZeroDivisionError, OverflowError) as err:
        raise ValueError(str(err)) from err


def number_text(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:.6g}"


class Calculator:
    tools = [CALCULATOR]

    def __init__(self) -> None:
        self.answer = ""
        self.called = False  # a well-formed calculator call was made in this episode

    def reset(self, record: dict[str, Any]) -> list[Message]:
        self.answer = str(record["answer"])
        return [{"role": "user", "content": str(record["prompt"])}]

    def step(self, messages: list[Message], turn: AssistantTurn) -> EnvStep:
        if turn.tool_calls:
            replies = []
            for call in turn.tool_calls:
                arguments = json.loads(call["function"]["arguments"])
                try:
                    result = number_text(evaluate(str(arguments.get("expression", ""))))
                    self.called = True
                except ValueError as err:
                    result = f"error: {err}"
                replies.append({"role": "tool", "tool_call_id": call["id"], "name": "calculator",
                                "content": result})
            return EnvStep(replies)
        numbers = _NUMBER.findall(turn.text)
        if numbers and numbers[-1] == self.answer:
            return EnvStep([], 1.0, True)
        return EnvStep([], CALL_CREDIT if self.called else 0.0, True)
