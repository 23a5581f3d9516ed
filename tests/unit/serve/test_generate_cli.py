"""`generate_stream` and `cybertron generate` (flags, loading an HF directory, streamed stdout)."""

import pytest

from cybertron.cli import main as cli_main
from cybertron.serve.engine import Engine
from cybertron.serve.generate import generate_stream
from cybertron.serve.sampling import SamplingParams


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


def test_generate_cli_penalties_reach_the_engine(hf_dir, text_model, tokenizer, capsys):
    code = cli_main(["generate", "--model", str(hf_dir), "--prompt", "The quick", "--greedy", "--max-new-tokens",
                     "12", "--device", "cpu", "--frequency-penalty", "2", "--presence-penalty", "0.5"])
    assert code == 0
    engine = Engine(text_model, tokenizer, num_blocks=16, block_size=8)
    prompt = [tokenizer.encode("The quick")]
    penalized, plain = engine.generate(prompt * 2, [
        SamplingParams(temperature=0.0, max_tokens=12, frequency_penalty=2.0, presence_penalty=0.5),
        SamplingParams(temperature=0.0, max_tokens=12)])
    assert capsys.readouterr().out == penalized.text + "\n" and penalized.text != plain.text


def test_generate_cli_sampling_is_seeded(hf_dir, capsys):
    argv = ["generate", "--model", str(hf_dir), "--prompt", "", "--max-new-tokens", "8", "--seed", "3",
            "--top-k", "20", "--top-p", "0.9", "--temperature", "1.0"]
    assert cli_main(argv) == 0
    first = capsys.readouterr().out
    assert cli_main(argv) == 0
    assert capsys.readouterr().out == first


@pytest.mark.parametrize("argv, message", [
    (["--prompt", "x"], "give one model source: --model PATH"),
    (["--model", "{hf}", "--run", "{hf}", "--prompt", "x"], "not both"),
    (["--model", "{hf}"], "generate.prompt (--prompt TEXT) is required"),
    (["--model", "{hf}", "--prompt", "x", "--dtype", "int8"], "model.dtype must be one of auto, fp32, bf16, fp16"),
    (["--model", "/nonexistent/dir", "--prompt", "x"], "is not a directory"),
    (["--model", "{hf}", "--prompt", "x", "--temperature", "-1"], "temperature"),
    (["--model", "{hf}", "--prompt", "x", "--top-p", "0"], "top_p"),
    (["--model", "{hf}", "--prompt", "x", "--frequency-penalty", "3"], "sampling.frequency_penalty must be in"),
    (["--model", "{hf}", "--prompt", "x", "--max-new-tokens", "100000"], "context"),
    (["--model", "{hf}", "--prompt", "x", "--device", "tpu"], "--device"),
    (["--model", "{hf}", "--prompt", "x", "--max-new-tokens", "ten"], "sampling.max_new_tokens expects int"),
    (["--model", "{hf}", "--prompt", "x", "--temprature", "0.5"], "did you mean --temperature?"),
    (["--model", "{hf}", "--prompt", "x", "--sampling.top_q", "0.5"], "did you mean sampling.top_p?"),
])
def test_bad_flags_exit_2_with_one_line(hf_dir, capsys, argv, message):
    argv = [a.replace("{hf}", str(hf_dir)) for a in argv]
    assert cli_main(["generate", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_generate_reads_a_toml_config_with_a_list_of_stops(hf_dir, text_model, tokenizer, tmp_path, capsys):
    """A TOML file sets the model, prompt and sampling; flags override it, and a repeated --stop appends."""
    config = tmp_path / "gen.toml"
    config.write_text(f'[model]\npath = "{hf_dir}"\ndevice = "cpu"\ndtype = "float32"\n'
                      '[generate]\nprompt = "The quick"\n[sampling]\ngreedy = true\nmax_new_tokens = 3\n'
                      'stop = ["never appears"]\n')
    assert cli_main(["generate", "--config", str(config), "--max-new-tokens", "12"]) == 0
    engine = Engine(text_model, tokenizer, num_blocks=16, block_size=8)
    full = engine.generate([tokenizer.encode("The quick")], SamplingParams(temperature=0.0, max_tokens=12))[0].text
    assert capsys.readouterr().out == full + "\n"
    assert len(full) > 2
    # two stop strings from the command line: the text ends before the earliest one
    first, second = full[1:3], full[-2:]
    assert cli_main(["generate", "--config", str(config), "--max-new-tokens", "12", "--stop", second,
                     "--stop", first]) == 0
    assert capsys.readouterr().out == full[:full.index(first)] + "\n"


def test_sampling_stop_repeats_as_a_list():
    from cybertron.commands.generate import SHORTCUTS, GenerateConfig
    from cybertron.config import parse_args

    cfg = parse_args(["--stop", "a", "--greedy", "--stop=b", "--sampling.stop", "c", "--prompt", "none"],
                     GenerateConfig(), SHORTCUTS)
    assert cfg.sampling.stop == ["a", "b", "c"] and cfg.sampling.greedy is True
    assert cfg.generate.prompt == "none"  # a text key keeps the word; only other optional keys read it as null


@pytest.mark.parametrize("command", ["generate", "serve"])
def test_out_as_an_input_names_the_new_flag(hf_dir, command, capsys):
    assert cli_main([command, "--out", str(hf_dir), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: --out is an output directory") and "--model" in err


def test_run_flag_loads_a_run_and_rejects_an_hf_directory(hf_dir, capsys):
    """--run is the explicit form for a run: an HF directory given there is reported, not loaded as HF."""
    assert cli_main(["generate", "--run", str(hf_dir), "--prompt", "x", "--device", "cpu"]) == 2
    assert "holds no complete checkpoint" in capsys.readouterr().err


def test_serve_reads_its_toml_and_checks_it_before_loading(hf_dir, tmp_path, capsys):
    """serve takes the same typed sections: a TOML typo is named with the closest key, and a bad port in the
    file fails before the model is loaded (the model path does not even exist)."""
    config = tmp_path / "serve.toml"
    config.write_text('[server]\nprot = 8001\n')
    assert cli_main(["serve", "--config", str(config), "--model", str(hf_dir)]) == 2
    assert capsys.readouterr().err == "error: unknown config key 'server.prot'; did you mean server.port?\n"
    config.write_text('[model]\npath = "/nonexistent/model"\n[server]\nport = 70000\n')
    assert cli_main(["serve", "--config", str(config)]) == 2
    assert capsys.readouterr().err == "error: --port must be in 0..65535, got 70000\n"
