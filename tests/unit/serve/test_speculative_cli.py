"""`cybertron generate` / `serve` with --speculative: greedy text unchanged, bad values one line, exit 2."""

import pytest

from cybertron.cli import main as cli_main
from cybertron.models.hf import save_hf_model
from cybertron.models.llama import build_model
from cybertron.models.presets import preset_config


@pytest.fixture(scope="module")
def other_vocab_dir(tokenizer, tmp_path_factory):
    """A model over 256 tokens, not the tokenizer's 320."""
    out = tmp_path_factory.mktemp("hf256")
    model = build_model(preset_config("debug"), seed=0)
    save_hf_model(model.state_dict(), model.config, out)
    tokenizer.save(out)
    return out


GREEDY = ["--prompt", "The quick brown fox", "--greedy", "--max-new-tokens", "16", "--device", "cpu"]


@pytest.mark.parametrize("spec", [["--speculative", "ngram", "--spec-k", "3", "--spec-ngram-min", "1"],
                                  ["--speculative", "draft", "--draft-model", "{hf}", "--spec-k", "2"]])
def test_generate_with_speculation_prints_the_same_greedy_text(hf_dir, capsys, spec):
    assert cli_main(["generate", "--model", str(hf_dir), *GREEDY]) == 0
    plain = capsys.readouterr().out
    spec = [a.replace("{hf}", str(hf_dir)) for a in spec]
    assert cli_main(["generate", "--model", str(hf_dir), *GREEDY, *spec]) == 0
    assert capsys.readouterr().out == plain and len(plain) > 5


BAD = [
    (["--speculative", "eagle"], "speculative.method must be one of off, ngram, draft, got 'eagle'"),
    (["--speculative", "ngram", "--spec-k", "0"], "speculative.k must be >= 1, got 0"),
    (["--speculative", "ngram", "--spec-ngram-min", "3", "--spec-ngram-max", "2"], "ngram_min <= ngram_max"),
    (["--speculative", "draft"], "--speculative draft needs --draft-model PATH"),
    (["--draft-model", "{hf}"], "--draft-model is only used with --speculative draft"),
    (["--speculative", "draft", "--draft-model", "/nonexistent"], "--draft-model /nonexistent is not a directory"),
]
VOCAB = (["--speculative", "draft", "--draft-model", "{other}"],
         "the draft model's vocabulary has 256 tokens but the target's has 320")


# serve checks its flags before loading; past loading it would listen, so the vocabulary case is generate's
@pytest.mark.parametrize("command, argv, message", [("generate", *bad) for bad in [*BAD, VOCAB]] +
                         [("serve", *bad) for bad in BAD])
def test_bad_speculative_flags_exit_2_with_one_line(hf_dir, other_vocab_dir, capsys, command, argv, message):
    argv = [a.replace("{hf}", str(hf_dir)).replace("{other}", str(other_vocab_dir)) for a in argv]
    extra = ["--prompt", "x"] if command == "generate" else ["--port", "0"]
    assert cli_main([command, "--model", str(hf_dir), "--device", "cpu", *extra, *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
