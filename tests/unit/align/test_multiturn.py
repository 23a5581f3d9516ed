"""Multi-turn rollouts: an episode is one token sequence of the engine's own tokens and the template's render
of what the environment inserted, checked against the chat template's render of the whole conversation; the
loss mask is exactly the generated positions; the generator's log-probabilities equal the trainer's; later
turns reuse earlier turns' KV; environments load from a spec or fail in one line; the calculator's tools."""

import contextlib
import json
import random

import pytest
import torch

from cybertron.align.environments import AssistantTurn, EnvStep, load_environment
from cybertron.align.environments.calculator import CALCULATOR, CALL_CREDIT, Calculator, evaluate, problem
from cybertron.align.grpo import GRPOStep, group_advantages, rollout_rows, token_logprobs
from cybertron.align.multiturn import EnvironmentFailure, EpisodeRunner
from cybertron.align.preference_data import PromptRecord
from cybertron.data.chat_template import DEFAULT_CHAT_TEMPLATE, render
from cybertron.data.tokenizer import train_bpe_tokenizer
from cybertron.errors import UserError
from cybertron.models.llama import build_model
from cybertron.models.presets import preset_config
from cybertron.serve.engine import Engine

pytest.importorskip("pydantic")  # serve/tools.py (tool-call parsing) comes with the serve extra


def make_tokenizer():
    rng = random.Random(0)
    texts = []
    for _ in range(200):
        p = problem(rng)
        call = json.dumps({"name": "calculator", "arguments": {"expression": p["expression"]}})
        texts.append(f"<|user|>\n{p['prompt']}\n<|assistant|>\n<tool_call>\n{call}\n</tool_call><|tool|>\n"
                     f"{p['answer']}\n<|assistant|>\n{p['answer']}")
    tokenizer = train_bpe_tokenizer(texts, 320)
    tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    return tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture
def model(tokenizer):
    return build_model(preset_config("debug", vocab_size=tokenizer.vocab_size), seed=0).eval()


class Scripted:
    """Answers every turn with a tool result, then ends the third turn with a reward per turn."""

    tools = [CALCULATOR]

    def __init__(self):
        self.turns = []

    def reset(self, record):
        return [{"role": "user", "content": record["prompt"]}]

    def step(self, messages, turn):
        self.turns.append(turn)
        assert messages[-1] == {"role": "assistant", "content": turn.text}
        if len(self.turns) == 3:
            return EnvStep([], 1.0, True)
        return EnvStep([{"role": "tool", "content": f"result {len(self.turns)}"}], 0.25)


class Recording(Engine):
    """The real engine, keeping each request's prompt and result (what the episode must be made of)."""

    def generate(self, prompts, params=None, adapters=None):
        results = super().generate(prompts, params, adapters)
        self.calls.append([(list(p), r) for p, r in zip(prompts, results)])
        return results


def _runner(model, tokenizer, env=Scripted, max_new_tokens=5, seq_len=256, max_turns=4):
    engine = Recording(model, tokenizer, max_batch_size=16, num_blocks=128, block_size=4, decode_graphs=False)
    engine.calls = []
    return EpisodeRunner(engine, tokenizer, env, "test:Scripted", max_turns, max_new_tokens, seq_len)


RECORDS = [PromptRecord([], "Ann has 3 apples and gets 4 more.", {"answer": "7"}, "x:1"),
           PromptRecord([], "Bob has 9 pens.", {"answer": "9"}, "x:2")]


def test_episode_is_the_engines_tokens_and_the_templates_render(model, tokenizer):
    runner = _runner(model, tokenizer)
    results = runner.run(RECORDS, 2, 1.0, 1.0, seed=0, step=0)
    calls = runner.engine.calls
    assert len(calls) == 3 and all(len(c) == 4 for c in calls)  # three turns of four episodes
    for e, result in enumerate(results):
        ids = result.prompt_ids + result.token_ids
        assert result.turns == 3 and result.reward == pytest.approx(1.5) and result.finish_reason == "stop"
        generated_positions = []
        for turn in calls:
            prompt, out = turn[e]
            # every turn continues the same sequence, and its tokens stand in it where they were sampled
            assert ids[:len(prompt)] == prompt and ids[len(prompt):len(prompt) + len(out.token_ids)] == out.token_ids
            generated_positions += range(len(prompt), len(prompt) + len(out.token_ids))
        mask = [False] * len(result.prompt_ids) + result.generated
        assert [i for i, m in enumerate(mask) if m] == generated_positions
        # The whole sequence is the template's render of the conversation (the last reply ends it, with
        # the end-of-text token only where the model wrote it).
        conversation = result.messages
        assert [m["role"] for m in conversation] == ["user", "assistant", "tool", "assistant", "tool", "assistant"]
        full = render(DEFAULT_CHAT_TEMPLATE, conversation, False, "", tokenizer.eos_token)
        if calls[-1][e][1].token_ids[-1] != tokenizer.eos_id:
            full = full.removesuffix(tokenizer.eos_token)
        assert tokenizer.decode(ids) == full
    # Later turns found earlier turns' full blocks in the prefix cache.
    # Each turn's request finds the KV of every full block of 4 its previous turn computed (that turn's prompt and
    # all its tokens but the last sampled one, which was never fed back).
    reused = sum((len(p) + len(r.token_ids) - 1) // 4 * 4 for c in calls[:-1] for p, r in c)
    assert runner.engine.stats.prefix_hit_tokens >= reused > 0


def test_loss_mask_and_logprobs_of_multi_turn_rows(model, tokenizer):
    runner = _runner(model, tokenizer)
    results = runner.run(RECORDS, 2, 1.0, 1.0, seed=1, step=3)
    rewards = torch.tensor([r.reward for r in results])
    rows = rollout_rows(RECORDS, results, group_advantages(rewards, 2), 2, pad_id=0)
    for i, r in enumerate(results):
        expected = torch.zeros(rows["seq_mask"].shape[1], dtype=torch.bool)
        expected[len(r.prompt_ids):len(r.prompt_ids) + len(r.generated)] = torch.tensor(r.generated)
        assert torch.equal(rows["seq_mask"][i], expected)
        assert rows["seq_ids"][i, :int(rows["seq_len"][i])].tolist() == r.prompt_ids + r.token_ids
    assert not rows["seq_mask"].all(dim=1).any() and rows["seq_mask"].sum() == sum(sum(r.generated) for r in results)
    mask = rows["seq_mask"]
    trainer = token_logprobs(model, rows, 4, torch.device("cpu"), contextlib.nullcontext)
    assert ((trainer - rows["gen_logprobs"]).abs() * mask).max().item() < 1e-5
    assert (rows["gen_logprobs"][~mask] == 0).all() and (rows["gen_logprobs"][mask] < 0).all()
    GRPOStep(kl_coef=0.0, check=True, tolerance=1e-5)(model, rows)  # the step's own assertion passes


def test_episodes_end_on_turns_and_tokens(model, tokenizer):
    short = _runner(model, tokenizer, max_turns=2).run(RECORDS[:1], 2, 1.0, 1.0, seed=0, step=0)
    assert all(r.turns == 2 and r.finish_reason == "length" and r.reward == 0.5 for r in short)
    tight = _runner(model, tokenizer, seq_len=40).run(RECORDS[:1], 2, 1.0, 1.0, seed=0, step=0)
    assert all(len(r.prompt_ids) + len(r.token_ids) <= 40 and r.finish_reason == "length" for r in tight)


def test_tool_calls_are_parsed_and_answered(tokenizer, model):
    runner = _runner(model, tokenizer, env=Calculator)
    text = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "3+4"}}\n</tool_call>'
    calls = runner.format.parse(text, runner.tool_names)[2]
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("calculator", {"expression": "3+4"})]
    assert "</tool_call>" in runner.turn_stop  # a call hands the turn to the tool
    for garbled in ('<tool_call>\n{"name": {"expression": "6+1"}}\n</tool_call>',
                    '<tool_call>\n{"name": ["calculator"], "arguments": {}}', '<tool_call>\n{"name": "calc'):
        assert runner.format.parse(garbled, runner.tool_names)[2] == []  # a sampled reply may be anything
    env = Calculator()
    env.reset({"prompt": "q", "answer": "7"})
    answer = env.step([], AssistantTurn(text, calls))
    assert answer.messages[0]["role"] == "tool" and answer.messages[0]["content"] == "7" and not answer.done
    assert env.step([], AssistantTurn("It is 7")) == EnvStep([], 1.0, True)
    assert env.step([], AssistantTurn("It is 8")).reward == CALL_CREDIT  # partial credit for the call
    fresh = Calculator()
    fresh.reset({"prompt": "q", "answer": "7"})
    assert fresh.step([], AssistantTurn("no idea")).reward == 0.0
    assert evaluate("(2+3)*4-6/3") == 18
    for bad in ("__import__('os')", "2**100000", "x+1", "1/0"):
        with pytest.raises(ValueError):
            evaluate(bad)


def test_environment_specs(tmp_path):
    assert load_environment("cybertron.align.environments.calculator:Calculator") is Calculator
    user = tmp_path / "envs.py"
    user.write_text("class Mine:\n    tools = []\n    def reset(self, record): return []\n"
                    "    def step(self, messages, turn): return None\nclass Half:\n    def reset(self, r): pass\n"
                    "boom = 1\n")
    assert load_environment(f"{user}:Mine").__name__ == "Mine"
    broken = tmp_path / "broken.py"
    broken.write_text("raise RuntimeError('no')\n")
    cases = {"calculator": "expected MODULE:CLASS", "no.such.module:X": "importing no.such.module failed",
             "cybertron.align.environments.calculator:Nope": "defines no class 'Nope'",
             f"{tmp_path / 'missing.py'}:X": "does not exist", f"{broken}:X": "RuntimeError: no",
             f"{user}:Half": "has no step method"}
    for spec, message in cases.items():
        with pytest.raises(UserError, match=message) as err:
            load_environment(spec)
        assert "\n" not in str(err.value)


def test_environment_mistakes_name_the_step(model, tokenizer):
    class BadReward(Scripted):
        def step(self, messages, turn):
            return EnvStep([], float("nan"), True)

    class Raises(Scripted):
        def step(self, messages, turn):
            raise KeyError("answer")

    with pytest.raises(EnvironmentFailure, match="step 5: environment test:Scripted step returned the reward nan"):
        _runner(model, tokenizer, env=BadReward).run(RECORDS[:1], 2, 1.0, 1.0, seed=0, step=5)
    with pytest.raises(EnvironmentFailure, match="step raised KeyError"):
        _runner(model, tokenizer, env=Raises).run(RECORDS[:1], 2, 1.0, 1.0, seed=0, step=5)


# ---- the effect: GRPO on the calculator raises the reward --------------------------------------------------

def _transcript(runner, p, call, rng):
    """Token ids of one conversation as an episode holds them: the problem, then a calculator call, its
    result and the answer; or a guessed answer."""
    r, eos = runner.renderer, runner.tokenizer.eos_id
    user = [{"role": "user", "content": p["prompt"]}]
    ids = r.encode(r.render(user, True))
    if not call:
        return ids + r.encode(str(rng.randint(0, 18))) + [eos]
    text = runner.format.call_text("calculator", json.dumps({"expression": p["expression"]}))
    inserted = r.inserted_text(user, text, False, [{"role": "tool", "content": p["answer"]}])
    return ids + r.encode(text) + r.encode(inserted) + r.encode(p["answer"]) + [eos]


@pytest.mark.slow  # a warm start and 24 GRPO steps of 64 episodes (about a minute on 2 cores)
def test_grpo_on_the_calculator_raises_the_reward(tokenizer):
    from cybertron.train.losses import next_token_logprobs

    torch.manual_seed(0)
    model = build_model(preset_config("debug", vocab_size=tokenizer.vocab_size), seed=0)
    engine = Engine(model, tokenizer, max_batch_size=64, num_blocks=64 * 8, block_size=16, decode_graphs=False)
    runner = EpisodeRunner(engine, tokenizer, Calculator, "calculator", 3, 40, 128)
    # Warm start (as SFT would): conversations that call the calculator a quarter of the time and otherwise
    # guess, so the model knows the call's format but rarely uses it.
    rng = random.Random(1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(150):
        seqs = [_transcript(runner, problem(rng), rng.random() < 0.25, rng) for _ in range(32)]
        width = max(map(len, seqs))
        ids = torch.tensor([s + [0] * (width - len(s)) for s in seqs])
        mask = torch.tensor([[1.0] * (len(s) - 1) + [0.0] * (width - len(s)) for s in seqs])
        loss = -(next_token_logprobs(model(ids), ids) * mask).sum() / mask.sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.0)
    step_fn = GRPOStep(kl_coef=0.0, check=True, tolerance=1e-4)
    rewards, turns = [], []
    for step in range(24):
        records = [PromptRecord([], p["prompt"], {"answer": p["answer"]}, "x")
                   for p in (problem(rng) for _ in range(8))]
        model.eval()
        results = runner.run(records, 8, 1.0, 1.0, seed=0, step=step)
        model.train()
        reward = torch.tensor([r.reward for r in results])
        rows = rollout_rows(records, results, group_advantages(reward, 8), 8, pad_id=0)
        loss, _ = step_fn(model, rows)  # asserts the generator's log-probabilities are the trainer's
        optimizer.zero_grad()
        (loss / step_fn.weight(rows)).backward()
        optimizer.step()
        rewards.append(reward.mean().item())
        turns.append(sum(r.turns for r in results) / len(results))
    early, late = sum(rewards[:3]) / 3, sum(rewards[-8:]) / 8
    assert late > early + 0.08, rewards
    assert sum(turns[-8:]) / 8 > sum(turns[:3]) / 3 + 0.1, turns  # by calling the calculator more often


def test_inserted_text_closes_the_turn_the_model_left_open(tmp_path):
    """ChatML (eos <|im_end|>): after a reply the model ended with eos, only the newline after it is the
    template's; after a reply cut short (a tool call's end, or out of tokens), the whole end-of-turn marker is."""
    from cybertron.align.multiturn import ChatRenderer
    from cybertron.data.tokenizer import TextTokenizer
    from tests.unit.finetune.tiny_hf import write_tokenizer

    write_tokenizer(tmp_path)
    renderer = ChatRenderer(TextTokenizer.load(tmp_path), [])
    before = [{"role": "user", "content": "q"}]
    tool = [{"role": "tool", "content": "7"}]
    rest = "<|im_start|>tool\n7<|im_end|>\n<|im_start|>assistant\n"
    assert renderer.inserted_text(before, "hi", True, tool) == "\n" + rest
    assert renderer.inserted_text(before, "hi", False, tool) == "<|im_end|>\n" + rest
    assert renderer.inserted_text(before, "hi", False, []) == "<|im_end|>\n<|im_start|>assistant\n"


def test_environment_config_keys():
    from cybertron.align.config import AlignConfig, validate
    from cybertron.errors import ConfigError

    def check(world_size=1, data_parallel="ddp", **align):
        cfg = AlignConfig()
        cfg.model.path, cfg.data.path, cfg.parallel.data_parallel = "m", "d.jsonl", data_parallel
        for key, value in {"method": "grpo", "environment": "e.py:E", **align}.items():
            setattr(cfg.align, key, value)
        validate(cfg, world_size)

    check()  # the environment gives the reward: no align.reward needed
    check(world_size=2)
    for kwargs, message in [({"reward": "r.py:f"}, "leave align.reward empty"),
                            ({"method": "dpo"}, "runs with grpo or rloo"),
                            ({"method": "ppo"}, "runs with grpo or rloo"),
                            ({"max_turns": 0}, "align.max_turns must be >= 1"),
                            ({"world_size": 2, "data_parallel": "zero3"}, "data_parallel=ddp only")]:
        with pytest.raises(ConfigError, match=message):
            check(**kwargs)
