"""Constrained decoding through the engine: a random model's output still parses and validates, the mask is
exactly what the grammar allows, unconstrained rows of the same batch are untouched, and a server without
the grammar library names the extra it needs."""

import json
import sys
from typing import Literal

import pytest
import torch
from fastapi.testclient import TestClient
from pydantic import BaseModel, ConfigDict, Field

from cybertron.serve.engine import Engine
from cybertron.serve.sampling import InvalidParameter, SamplingParams, mask_logits
from cybertron.serve.server import create_app
from cybertron.serve.structured import GrammarCompiler, token_mask

llguidance = pytest.importorskip("llguidance")


class Person(BaseModel):
    model_config = ConfigDict(extra="forbid")  # additionalProperties: false, else any key may follow

    name: str = Field(max_length=6)
    age: int = Field(ge=0, le=120)
    mood: Literal["happy", "sad"]
    tags: list[Literal["a", "b"]] = Field(max_length=2)


@pytest.fixture(scope="module")
def compiler(tokenizer, text_model):
    return GrammarCompiler(tokenizer, text_model.config.vocab_size)


def test_schema_output_validates_for_greedy_and_sampled_rows(text_model, tokenizer, compiler):
    grammar = compiler.json_schema(Person.model_json_schema(), "response_format")
    engine = Engine(text_model, tokenizer, num_blocks=64, block_size=8)
    params = [SamplingParams(temperature=0.0, max_tokens=120, grammar=grammar)]
    params += [SamplingParams(temperature=1.0, seed=seed, max_tokens=120, grammar=grammar) for seed in range(3)]
    results = engine.generate([tokenizer.encode("Hello world")] * 4, params)
    for result in results:
        assert result.finish_reason == "stop", result.text
        Person.model_validate_json(result.text)  # raises if the text is not a valid Person
        assert json.loads(result.text) == json.loads(json.dumps(json.loads(result.text)))
        assert "\n" not in result.text  # no free whitespace: the random model cannot wander off


def test_mask_is_exactly_the_tokens_the_grammar_accepts(tokenizer, compiler, text_model):
    """Reference: for every token, whether a copy of the matcher consumes it (the library's own check)."""
    grammar = compiler.json_schema({"type": "object", "properties": {"n": {"type": "integer"}}}, "x")
    matcher = grammar.matcher()
    for token in tokenizer.encode('{"n": 1'):
        assert matcher.advance(token) is None
    vocab = text_model.config.vocab_size
    mask = token_mask([None, matcher, None], vocab, "cpu")
    assert mask.rows.tolist() == [1]
    logits = mask_logits(torch.zeros(3, vocab), mask)
    allowed = set(torch.isfinite(logits[1]).nonzero().flatten().tolist())
    accepted = {t for t in range(vocab) if matcher._matcher.deep_copy().try_consume_tokens([t]) == 1}
    assert allowed == accepted and tokenizer.encode("}")[0] in allowed and tokenizer.encode("a")[0] not in allowed
    assert torch.isfinite(logits[[0, 2]]).all()  # rows without a grammar keep every token


def test_free_rows_of_a_constrained_batch_are_unchanged(text_model, tokenizer, compiler):
    grammar = compiler.json_object("response_format")
    prompts = [tokenizer.encode("The quick brown"), tokenizer.encode("def add(a, b):")]
    free = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    alone = Engine(text_model, tokenizer, num_blocks=64, block_size=8).generate(prompts, free)
    mixed = Engine(text_model, tokenizer, num_blocks=64, block_size=8).generate(
        prompts + prompts, [free, free] + [SamplingParams(temperature=0.0, max_tokens=12, grammar=grammar)] * 2)
    assert [r.token_ids for r in mixed[:2]] == [r.token_ids for r in alone]
    assert all(r.text.startswith("{") for r in mixed[2:])


def test_a_complete_grammar_finishes_with_stop_and_logprobs_stay_the_models(text_model, tokenizer, compiler):
    grammar = compiler.json_schema({"enum": ["yes", "no"]}, "response_format")
    engine = Engine(text_model, tokenizer, num_blocks=64, block_size=8)
    result = engine.generate([tokenizer.encode("Hello")], SamplingParams(temperature=0.0, max_tokens=50,
                                                                         grammar=grammar))[0]
    assert result.text in ('"yes"', '"no"') and result.finish_reason == "stop"
    with torch.no_grad():
        logits = text_model(torch.tensor([tokenizer.encode("Hello")]))[0, -1].float()
    expected = torch.log_softmax(logits, -1)[result.token_ids[0]].item()
    assert result.logprobs[0] == pytest.approx(expected, abs=1e-4)  # the model's, not the masked distribution


def test_a_preempted_request_keeps_its_place_in_the_grammar(text_model, tokenizer, compiler):
    """A pool too small for all rows preempts and recomputes; the outputs still validate."""
    grammar = compiler.json_schema(Person.model_json_schema(), "response_format")
    engine = Engine(text_model, tokenizer, num_blocks=24, block_size=8, max_batch_size=4)
    params = [SamplingParams(temperature=1.0, seed=seed, max_tokens=120, grammar=grammar) for seed in range(4)]
    results = engine.generate([tokenizer.encode("Hello world")] * 4, params)
    assert engine.stats.preemptions > 0
    for result in results:
        assert result.finish_reason == "stop"
        Person.model_validate_json(result.text)


def test_compiled_grammars_are_cached_and_bad_schemas_name_the_field(tokenizer, text_model):
    compiler = GrammarCompiler(tokenizer, text_model.config.vocab_size, cache_size=2)
    first = compiler.json_schema({"type": "integer"}, "response_format")
    assert compiler.json_schema({"type": "integer"}, "response_format") is first
    compiler.json_schema({"type": "string"}, "response_format")
    compiler.json_schema({"type": "boolean"}, "response_format")
    assert compiler.json_schema({"type": "integer"}, "response_format") is not first  # evicted, recompiled
    with pytest.raises(InvalidParameter, match="strin") as err:
        compiler.json_schema({"type": "strin"}, "response_format.json_schema.schema")
    assert err.value.param == "response_format.json_schema.schema"


def test_without_the_library_a_request_that_needs_it_is_a_400_naming_the_extra(text_model, tokenizer,
                                                                                monkeypatch):
    monkeypatch.setitem(sys.modules, "llguidance", None)  # `import llguidance` now fails as if not installed
    engine = Engine(text_model, tokenizer, num_blocks=32, block_size=8)
    with TestClient(create_app(engine, tokenizer, "tiny")) as client:
        body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2,
                "response_format": {"type": "json_object"}}
        response = client.post("/v1/chat/completions", json=body)
        assert response.status_code == 400
        error = response.json()["error"]
        assert error["param"] == "response_format" and error["code"] == "missing_extra"
        assert "cybertron[structured]" in error["message"]
        plain = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
        assert plain.status_code == 200


def llama2_style_tokenizer():
    """The layout of Llama 2's and Mistral's tokenizer.json: "▁" for spaces, the 256 bytes as <0xNN> pieces
    of the BPE vocabulary (byte fallback for what no piece covers), then the learned pieces."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers

    from cybertron.data.tokenizer import TextTokenizer
    from tests.unit.serve.conftest import CORPUS

    normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    learner = Tokenizer(models.BPE(unk_token="<unk>"))
    learner.normalizer = normalizer
    learner.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=150, show_progress=False))
    learned = json.loads(learner.to_str())["model"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{i:02X}>": 3 + i for i in range(256)}}
    for piece in sorted(learned["vocab"], key=learned["vocab"].get):
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned["merges"]]
    backend = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True))
    backend.normalizer = normalizer
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    backend.add_special_tokens(["<unk>", "<s>", "</s>"])
    return TextTokenizer(backend, eos_token="</s>", bos_token="<s>")


def test_a_llama2_style_tokenizer_is_bridged_too():
    """Byte-fallback vocabularies reach the library through the same tokenizer.json: "{" and every
    multi-byte character are <0xNN> pieces here, and the output still validates."""
    from cybertron.models.llama import build_model
    from cybertron.models.presets import preset_config

    tokenizer = llama2_style_tokenizer()
    assert tokenizer.backend.token_to_id("{") is None and tokenizer.decode(tokenizer.encode('{"é": 1}')) == '{"é": 1}'
    model = build_model(preset_config("debug", vocab_size=tokenizer.vocab_size), seed=1).eval()
    grammar = GrammarCompiler(tokenizer, tokenizer.vocab_size).json_schema(Person.model_json_schema(), "x")
    engine = Engine(model, tokenizer, num_blocks=64, block_size=8)
    params = [SamplingParams(temperature=1.0, seed=seed, max_tokens=150, grammar=grammar) for seed in range(3)]
    for result in engine.generate([tokenizer.encode("Hello")] * 3, params):
        assert result.finish_reason == "stop", result.text
        Person.model_validate_json(result.text)


def test_constrained_rows_decode_plainly_beside_speculated_ones(text_model, tokenizer, compiler):
    """An engine that speculates (prompt lookup) still gives a constrained request valid output, token for token
    what a plain engine gives, while a free greedy request beside it is speculated."""
    from cybertron.serve.speculative import SpeculativeConfig

    grammar = compiler.json_schema(Person.model_json_schema(), "response_format")
    prompts = [tokenizer.encode("Hello world"), tokenizer.encode("Hello world Hello world Hello")]
    params = [SamplingParams(temperature=0.0, max_tokens=120, grammar=grammar),
              SamplingParams(temperature=0.0, max_tokens=24)]
    plain = Engine(text_model, tokenizer, num_blocks=64, block_size=8).generate(prompts, params)
    engine = Engine(text_model, tokenizer, num_blocks=64, block_size=8, speculative=SpeculativeConfig("ngram", k=4))
    speculated = engine.generate(prompts, params)
    assert [r.token_ids for r in speculated] == [r.token_ids for r in plain]
    Person.model_validate_json(speculated[0].text)
    assert engine.speculator.stats.proposed > 0
