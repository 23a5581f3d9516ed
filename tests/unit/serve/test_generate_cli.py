"""`generate_stream` and `cybertron generate` (flags, loading an HF directory, streamed stdout)."""

import pytest

from cybertron.cli import main as cli_main
from cybertron.models.hf import save_hf_model
from cybertron.serve.engine import Engine
from cybertron.serve.generate import generate_stream
from cybertron.serve.sampling import SamplingParams


@pytest.fixture(scope="module")
def hf_dir(text_model, tokenizer, tmp_path_factory):
    out = tmp_path_factory.mktemp("hf")
    save_hf_model(text_model.state_dict(), text_model.config, out)
    tokenizer.save(out)
    return out


def test_generate_stream_yields_the_engines_text_piece_by_piece(text_model, tokenizer):
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    pieces = list(generate_stream(text_model, tokenizer, "Hello world", params))
    engine = Engine(text_model, tokenizer, num_blocks=16, block_size=8)
    expected = engine.generate([tokenizer.encode("Hello world")], params)[0].text
    assert len(pieces) > 1 and "".join(pieces) == expected


def test_generate_cli_streams_greedy_text_from_an_hf_directory(hf_dir, text_model, tokenizer, capsys):
    code = cli_main(["generate", "--model", str(hf_dir), "--prompt", "The quick", "--greedy",
                     "--max-new-tokens", "12", "--device", "cpu"])
    assert code == 0
    engine = Engine(text_model, tokenizer, num_blocks=16, block_size=8)
    expected = engine.generate([tokenizer.encode("The quick")], SamplingParams(temperature=0.0, max_tokens=12))
    assert capsys.readouterr().out == expected[0].text + "\n"


def test_generate_cli_sampling_is_seeded(hf_dir, capsys):
    argv = ["generate", "--model", str(hf_dir), "--prompt", "", "--max-new-tokens", "8", "--seed", "3",
            "--top-k", "20", "--top-p", "0.9", "--temperature", "1.0"]
    assert cli_main(argv) == 0
    first = capsys.readouterr().out
    assert cli_main(argv) == 0
    assert capsys.readouterr().out == first


@pytest.mark.parametrize("argv, message", [
    (["--prompt", "x"], "one of the arguments --out --model is required"),
    (["--model", "{hf}", "--out", "{hf}", "--prompt", "x"], "not allowed with argument"),
    (["--model", "{hf}"], "--prompt"),
    (["--model", "/nonexistent/dir", "--prompt", "x"], "is not a directory"),
    (["--model", "{hf}", "--prompt", "x", "--temperature", "-1"], "temperature"),
    (["--model", "{hf}", "--prompt", "x", "--top-p", "0"], "top_p"),
    (["--model", "{hf}", "--prompt", "x", "--max-new-tokens", "100000"], "context"),
    (["--model", "{hf}", "--prompt", "x", "--device", "tpu"], "--device"),
    (["--model", "{hf}", "--prompt", "x", "--max-new-tokens", "ten"], "invalid int value"),
])
def test_bad_flags_exit_2_with_one_line(hf_dir, capsys, argv, message):
    argv = [a.replace("{hf}", str(hf_dir)) for a in argv]
    assert cli_main(["generate", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
