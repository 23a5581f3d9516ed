"""Stop strings are matched on decoded text; the text ends right before the first match, and a stream
never shows text that a later match removes."""

from cybertron.serve.detokenize import OutputText
from cybertron.serve.engine import Engine
from cybertron.serve.sampling import SamplingParams


def _stream(tokenizer, text, stop):
    out = OutputText(tokenizer, stop)
    pieces = []
    for token in tokenizer.encode(text):
        if out.stopped:
            break
        pieces.append(out.push(token))
    pieces.append(out.finish())
    return out, pieces


def test_text_is_cut_before_the_first_stop_string(tokenizer):
    out, pieces = _stream(tokenizer, "Hello world! The quick brown fox jumps.", ["quick", "fox"])
    assert out.stopped
    assert out.text == "Hello world! The "
    assert "".join(pieces) == out.text


def test_a_possible_stop_prefix_is_held_back_until_resolved(tokenizer):
    text = "It has two paragraphs.\nIt has\n\ntwo"
    out, pieces = _stream(tokenizer, text, ["\n\n"])
    assert out.text == "It has two paragraphs.\nIt has"
    emitted = ""
    for piece in pieces:
        emitted += piece
        assert out.text.startswith(emitted)  # nothing shown was later taken back
    assert emitted == out.text


def test_without_a_match_everything_is_emitted(tokenizer):
    text = "def add(a, b):\n    return a + b\n"
    out, pieces = _stream(tokenizer, text, ["return b"])
    assert not out.stopped
    assert "".join(pieces) == out.text == text


def test_engine_stops_on_a_string_spanning_tokens(text_model, tokenizer):
    """The model's own free-running text supplies a stop string it is certain to produce."""
    prompt = tokenizer.encode("The quick brown")
    engine = Engine(text_model, tokenizer, num_blocks=16, block_size=8)
    free = engine.generate([prompt], SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True))[0]
    stop = free.text[9:13]
    cut = free.text.find(stop)
    streamed = list(engine.stream(prompt, SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True,
                                                         stop=("never-produced", stop))))
    assert streamed[-1].finish_reason == "stop"
    assert "".join(o.text for o in streamed) == free.text[:cut]
    n = sum(len(o.token_ids) for o in streamed)
    assert n < 30 and [t for o in streamed for t in o.token_ids] == free.token_ids[:n]
    assert engine.cache.num_free_blocks == engine.cache.num_total_blocks
