"""Multi-turn GRPO rollouts: the engine writes an assistant turn, the environment answers (tool results,
feedback), generation continues from there, until the environment ends the episode or it runs out of
turns (align.max_turns) or tokens (data.seq_len).

A rollout is one token sequence: the rendered opening messages, then each turn's generated tokens exactly
as sampled (never re-tokenised, so the trainer scores what the generator sampled and their log-probabilities
agree), then what the chat template adds after that turn and for the environment's messages, up to the
next generation prompt. Only generated tokens are in the loss mask (`generated`): the prompt, tool results
and template markup the environment inserted are context, not the policy's actions.

The text between turns comes from the chat template: rendering the conversation with the reply (its text,
tool-call markup included) and rendering it with the environment's messages and a generation prompt; what
the second adds to the first, plus the reply's end-of-turn marker where the model did not write it, is
tokenised and appended. Tool calls are parsed from the reply in the template's own format (serve/tools.py);
a template that renders no tool calls (cybertron's default) gets the Hermes format,
`<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`.

Each turn of a rollout is a new engine request whose prompt is the whole sequence so far: the prefix cache
gives it the KV of the earlier turns' full blocks (reset once per rollout, when the weights changed).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from cybertron.align.environments import AssistantTurn, EnvironmentFactory, EnvStep, Message
from cybertron.align.grpo import RolloutStats, rollout_checksum, rollout_stats, rollout_sums
from cybertron.align.grpo_task import GRPOTask
from cybertron.align.preference_data import PromptRecord
from cybertron.data.chat_template import ChatTemplateError, render
from cybertron.data.escapes import decode_escapes
from cybertron.data.tokenizer import TextTokenizer
from cybertron.errors import UserError
from cybertron.serve.engine import Engine, Result
from cybertron.serve.sampling import SamplingParams


class EnvironmentFailure(UserError):
    """An environment's reset or step failed or answered something unusable; the message names the step."""


def hermes_format() -> Any:
    """The tool-call format of templates that render none (Qwen2.5/Hermes markup)."""
    from cybertron.serve.tools import ToolCallFormat

    return ToolCallFormat(begin="<tool_call>\n", head='{"name": "', middle='", "arguments": ', tail="}",
                          end="\n</tool_call>", separator="\n", name_key="name", arguments_key="arguments")


def tool_format(tokenizer: TextTokenizer) -> Any:
    """The chat template's tool-call format (serve/tools.py), else the Hermes format."""
    try:
        from cybertron.serve.sampling import InvalidParameter
        from cybertron.serve.tools import ToolCallFormat
    except ImportError as err:  # serve/tools.py's protocol needs pydantic, which the serve extra brings
        raise UserError(f"align.environment parses tool calls with cybertron's serving code, which needs "
                        f"{err.name}: pip install 'cybertron[serve]'") from err
    try:
        return ToolCallFormat.detect(tokenizer)
    except InvalidParameter:
        return hermes_format()


class ChatRenderer:
    """Renders conversations with the tokenizer's chat template (and the environment's tools) and tokenises
    the pieces the environment inserts."""

    def __init__(self, tokenizer: TextTokenizer, tools: list[dict[str, Any]]):
        if tokenizer.chat_template is None:
            raise UserError("align.environment needs a chat template; set data.chat_template (e.g. default)")
        self.tokenizer, self.template = tokenizer, tokenizer.chat_template
        self.tools = [{"type": "function", "function": t} for t in tools] or None

    def render(self, messages: list[Message], generation_prompt: bool) -> str:
        return render(self.template, messages, generation_prompt, self.tokenizer.bos_token or "",
                      self.tokenizer.eos_token, tools=self.tools)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.backend.encode(text, add_special_tokens=False).ids

    def inserted_text(self, before: list[Message], reply: str, eos_written: bool, added: list[Message]) -> str:
        """What follows the reply up to the next generation prompt: the template's end of the assistant turn
        (less the end-of-text token when the model wrote it) and its render of `added`."""
        head = self.render(before, True) + reply
        upto = self.render([*before, {"role": "assistant", "content": reply}], False)
        after = self.render([*before, {"role": "assistant", "content": reply}, *added], True)
        if not (upto.startswith(head) and after.startswith(upto)):
            raise ChatTemplateError("the chat template does not render a reply verbatim, or a conversation as a "
                                    "prefix of its continuation, so a multi-turn rollout cannot be one sequence")
        closing = upto[len(head):]
        eos = self.tokenizer.eos_token
        if eos_written and closing.startswith(eos):
            closing = closing[len(eos):]
        return closing + after[len(upto):]


@dataclass
class MultiTurnResult(Result):
    """One episode. token_ids/logprobs run from the end of the prompt (`prompt_ids`) over every turn and every
    inserted piece; `generated` marks the model's own tokens (logprobs are 0 elsewhere)."""

    prompt_ids: list[int] = field(default_factory=list)
    generated: list[bool] = field(default_factory=list)
    reward: float = 0.0
    turns: int = 0
    messages: list[Message] = field(default_factory=list)


@dataclass
class _Episode:
    env: Any
    messages: list[Message]
    ids: list[int]
    prompt_len: int
    generated: list[bool] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    reward: float = 0.0
    turns: int = 0
    done: bool = False
    finish_reason: str = "length"

    def append(self, ids: list[int], logprobs: list[float] | None) -> None:
        self.ids += ids
        self.generated += [logprobs is not None] * len(ids)
        self.logprobs += logprobs if logprobs is not None else [0.0] * len(ids)

    def result(self) -> MultiTurnResult:
        n = self.prompt_len
        return MultiTurnResult(self.ids[n:], self.logprobs, self.finish_reason, "\n".join(self.texts), n,
                               prompt_ids=self.ids[:n], generated=self.generated, reward=self.reward,
                               turns=self.turns, messages=self.messages)


def turn_seed(seed: int, step: int, index: int, turn: int) -> int:
    """A sampling seed per (run seed, rollout step, episode, turn): rollouts repeat exactly on resume."""
    return int(np.random.SeedSequence([seed, step, index, turn]).generate_state(1)[0])


@dataclass
class EpisodeRunner:
    """Runs episodes of an environment with an engine; one instance per training run."""

    engine: Engine
    tokenizer: TextTokenizer
    environment: EnvironmentFactory
    name: str  # the spec, for messages
    max_turns: int
    max_new_tokens: int
    seq_len: int  # most tokens of a whole episode
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        tools = list(getattr(self.environment, "tools", None) or [])
        self.tool_names = {t["name"] for t in tools}
        self.format = tool_format(self.tokenizer) if tools else None
        self.renderer = ChatRenderer(self.tokenizer, tools)
        end = self.format.end.strip() if self.format is not None else ""
        self.turn_stop = (*self.stop, end) if end else self.stop  # a tool call's end hands over to the tool

    def run(self, records: list[PromptRecord], group_size: int, temperature: float, top_p: float, seed: int,
            step: int, first_prompt: int = 0) -> list[MultiTurnResult]:
        """group_size episodes per record (prompt-major order, as generate_rollouts); `first_prompt` as there."""
        self.engine.reset_prefix_cache()  # the weights changed since the last rollout; not between turns
        episodes: list[_Episode] = []
        for record in records:
            episodes += [self._open(step, {"prompt": record.prompt, **record.fields}) for _ in range(group_size)]
        for turn in range(self.max_turns):
            active = [(i, e) for i, e in enumerate(episodes, start=first_prompt * group_size)
                      if not e.done and len(e.ids) < self.seq_len]
            if not active:
                break
            params = [SamplingParams(temperature=temperature, top_p=top_p, logprobs=True, stop=self.turn_stop,
                                     max_tokens=min(self.max_new_tokens, self.seq_len - len(e.ids)),
                                     seed=turn_seed(seed, step, i, turn)) for i, e in active]
            results = self.engine.generate([e.ids for _, e in active], params)
            for (_, episode), result in zip(active, results):
                self._advance(step, episode, result, last=turn == self.max_turns - 1)
        return [e.result() for e in episodes]

    def _open(self, step: int, record: dict[str, Any]) -> _Episode:
        env = self.environment()
        try:
            messages = list(env.reset(record))
        except Exception as err:  # noqa: BLE001 - user code: reported with the record
            raise EnvironmentFailure(f"step {step}: environment {self.name} reset raised {type(err).__name__}: "
                                    f"{err} on prompt {str(record.get('prompt'))[:80]!r}") from err
        ids = self.renderer.encode(self.renderer.render(messages, True))
        return _Episode(env, messages, ids, len(ids))

    def _advance(self, step: int, episode: _Episode, result: Result, last: bool) -> None:
        tokens = result.token_ids
        eos_written = result.finish_reason == "stop" and bool(tokens) and tokens[-1] == self.tokenizer.eos_id
        text = self.tokenizer.decode(tokens[:-1] if eos_written else tokens)
        episode.append(tokens, result.logprobs)
        episode.texts.append(text)
        episode.turns += 1
        calls = self.format.parse(text, self.tool_names)[2] if self.format is not None else []
        before = episode.messages
        episode.messages = [*before, {"role": "assistant", "content": text}]
        answer = self._step(step, episode, AssistantTurn(text, calls, result.finish_reason))
        episode.reward += answer.reward
        if answer.done:
            episode.done, episode.finish_reason = True, "stop"
            return
        if last or len(episode.ids) >= self.seq_len:
            episode.done = True  # out of turns or tokens: finish_reason stays "length"
            return
        inserted = self.renderer.encode(self.renderer.inserted_text(before, text, eos_written, answer.messages))
        if len(episode.ids) + len(inserted) >= self.seq_len:  # no room left to answer after them
            episode.done = True
            return
        episode.append(inserted, None)
        episode.messages += answer.messages

    def _step(self, step: int, episode: _Episode, turn: AssistantTurn) -> EnvStep:
        where = f"step {step}: environment {self.name}"
        try:
            answer = episode.env.step(list(episode.messages), turn)
        except Exception as err:  # noqa: BLE001
            raise EnvironmentFailure(f"{where} step raised {type(err).__name__}: {err} on reply "
                                    f"{turn.text[:80]!r}") from err
        if not isinstance(answer, EnvStep):
            raise EnvironmentFailure(f"{where} step returned {type(answer).__name__}, not an EnvStep")
        reward = answer.reward
        if not (isinstance(reward, (int, float)) and not isinstance(reward, bool) and math.isfinite(reward)):
            raise EnvironmentFailure(f"{where} step returned the reward {reward!r}; a reward must be a finite "
                                    "number")
        bad = [m for m in answer.messages if not (isinstance(m, dict) and "role" in m and "content" in m)]
        if bad:
            raise EnvironmentFailure(f"{where} step returned the message {str(bad[0])[:80]}; messages are dicts "
                                    "with role and content")
        return answer


# ---- the GRPO task with an environment (run.py picks it when align.environment is set) ------------------

@dataclass
class MultiTurnGRPOTask(GRPOTask):
    """GRPO (or RLOO) whose rollouts are episodes of align.environment; advantages, loss and logging are theirs."""

    runner: EpisodeRunner | None = None
    turn_sums: torch.Tensor | None = None  # turns, episodes, prefix-cache hit tokens, prompt tokens (all ranks)

    def __post_init__(self) -> None:
        from cybertron.finetune.run import resolve_seq_len

        a = self.cfg.align
        if self.engine.lockstep is not None:
            raise UserError("align.environment runs with parallel.data_parallel=ddp (whole weights on every "
                            "rank); zero3 is not supported for multi-turn rollouts")
        self.runner = EpisodeRunner(self.engine, self.tokenizer, self.setup.reward.factory, a.environment,
                                    a.max_turns, a.max_new_tokens,
                                    resolve_seq_len(self.cfg.data.seq_len, self.model.config),
                                    (decode_escapes(a.stop, "align.stop"),) if a.stop else ())

    def sample_and_score(self, step: int, records: list[PromptRecord], group_size: int, temperature: float,
                         first_prompt: int = 0) -> tuple[list, torch.Tensor, RolloutStats]:
        assert self.runner is not None
        c, a = self.cfg, self.cfg.align
        start = time.perf_counter()
        stats_before = (self.engine.stats.prefix_hit_tokens, self.engine.stats.prompt_tokens)
        self.model.eval()
        try:
            with self.trainer.autocast():
                results = self.runner.run(records, group_size, temperature, a.top_p, c.train.seed, step,
                                          first_prompt)
        finally:
            self.model.train()
        seconds = time.perf_counter() - start
        if not self.world.same_over_tp(rollout_checksum(results)):
            raise RuntimeError(f"step {step}: the tensor-parallel ranks of a replica sampled different rollouts")
        rewards = torch.tensor([r.reward for r in results], dtype=torch.float32)
        sums = self.world.sum_over_dp(rollout_sums(rewards, results, group_size).to(self.device)).cpu()
        hits = self.engine.stats.prefix_hit_tokens - stats_before[0]
        prompts = self.engine.stats.prompt_tokens - stats_before[1]
        turns = torch.tensor([sum(r.turns for r in results), len(results), hits, prompts], dtype=torch.float64)
        self.turn_sums = self.world.sum_over_dp(turns.to(self.device)).cpu()
        return results, rewards, rollout_stats(sums, seconds)

    def evaluate(self, step: int) -> dict[str, float] | None:
        kept = self.turn_sums  # the training rollout's, which the log lines report (not the greedy episodes')
        try:
            return super().evaluate(step)
        finally:
            self.turn_sums = kept

    def extra_log_fields(self, seconds: float) -> dict[str, float]:
        fields = super().extra_log_fields(seconds)
        if self.turn_sums is not None:
            turns, episodes, hits, prompts = self.turn_sums.tolist()
            fields["turns"] = turns / max(episodes, 1)
            fields["prefix_hit_share"] = hits / max(prompts, 1)  # prompt tokens the prefix cache served
        return fields
