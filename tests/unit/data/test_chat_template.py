"""The default chat format (models without a template), choosing a template, and agreement with
`transformers` on what a directory's template is and how it renders."""

import json

import pytest

from cybertron.data.chat_template import (
    DEFAULT_CHAT_TEMPLATE,
    REMEDY,
    ChatTemplateError,
    remedy_on_failure,
    render,
    render_with_assistant_spans,
    resolve_chat_format,
)
from cybertron.data.sft import IGNORE_INDEX, tokenize_conversation
from cybertron.data.tokenizer import CHAT_TEMPLATE_FILE, TextTokenizer
from tests.unit.finetune.tiny_hf import write_tokenizer

CONVERSATION = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the sky"},
                {"role": "assistant", "content": "blue"}, {"role": "user", "content": "and grass"},
                {"role": "assistant", "content": "green\nmostly"}]


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """A tokenizer without a chat template, as `cybertron train` leaves one (eos <|eot_id|>, no bos)."""
    out = tmp_path_factory.mktemp("plain")
    write_tokenizer(out, template=None)
    return TextTokenizer.load(out)


def test_default_format_is_role_headers_with_replies_ending_in_eos():
    text = render(DEFAULT_CHAT_TEMPLATE, CONVERSATION, add_generation_prompt=False, eos_token="<E>")
    assert text == ("<|system|>\nbe brief\n<|user|>\nthe sky\n<|assistant|>\nblue<E>"
                    "<|user|>\nand grass\n<|assistant|>\ngreen\nmostly<E>")
    prompt = render(DEFAULT_CHAT_TEMPLATE, CONVERSATION[:2], add_generation_prompt=True, bos_token="<B>",
                    eos_token="<E>")
    assert prompt == "<B><|system|>\nbe brief\n<|user|>\nthe sky\n<|assistant|>\n"


def test_default_format_renders_prefixes_so_each_reply_and_its_eos_are_the_targets(plain):
    text, spans = render_with_assistant_spans(DEFAULT_CHAT_TEMPLATE, CONVERSATION, "", plain.eos_token)
    assert [text[lo:hi] for lo, hi in spans] == [f"blue{plain.eos_token}", f"green\nmostly{plain.eos_token}"]
    plain.chat_template = DEFAULT_CHAT_TEMPLATE
    try:
        ex = tokenize_conversation(plain, CONVERSATION)
    finally:
        plain.chat_template = None
    targets = [t for t in ex.labels if t != IGNORE_INDEX]
    # the model learns to end a reply with eos, the token generation stops at
    assert targets[-1] == plain.eos_id and targets.count(plain.eos_id) == 2
    assert plain.decode(targets) == f"blue{plain.eos_token}green\nmostly{plain.eos_token}"


def test_chat_format_choice(tmp_path):
    assert resolve_chat_format(None).origin == "default"
    assert resolve_chat_format(None).template == DEFAULT_CHAT_TEMPLATE
    assert resolve_chat_format("{{ 'M' }}").template == "{{ 'M' }}"
    assert resolve_chat_format("{{ 'M' }}", "default").template == DEFAULT_CHAT_TEMPLATE
    (tmp_path / "mine.jinja").write_text("{{ 'F' }}")
    chosen = resolve_chat_format("{{ 'M' }}", str(tmp_path / "mine.jinja"))
    assert (chosen.template, chosen.origin) == ("{{ 'F' }}", str(tmp_path / "mine.jinja"))
    assert "default" in resolve_chat_format(None).describe()


@pytest.mark.parametrize("case, fragment", [("missing", "does not exist"), ("broken", "is not valid Jinja"),
                                            ("model", "the model's chat template is not valid Jinja")])
def test_a_bad_template_is_one_line_naming_both_remedies(tmp_path, case, fragment):
    (tmp_path / "broken.jinja").write_text("{% for m in messages %}")
    model, choice = {"missing": (None, str(tmp_path / "nope.jinja")),
                     "broken": (None, str(tmp_path / "broken.jinja")),
                     "model": ("{% if %}", "")}[case]
    with pytest.raises(ChatTemplateError) as err:
        resolve_chat_format(model, choice)
    message = str(err.value)
    assert fragment in message and message.endswith(REMEDY) and "\n" not in message
    assert "--data.chat_template FILE" in REMEDY and "--data.chat_template=default" in REMEDY


def test_rendering_failures_on_data_gain_the_remedy_once():
    with pytest.raises(ChatTemplateError) as err, remedy_on_failure():
        render("{{ raise_exception('no system role') }}", CONVERSATION, False)
    assert "no system role" in str(err.value) and str(err.value).count(REMEDY) == 1


def test_template_file_wins_over_tokenizer_config_as_in_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    write_tokenizer(tmp_path)  # ChatML in tokenizer_config.json
    (tmp_path / CHAT_TEMPLATE_FILE).write_text(DEFAULT_CHAT_TEMPLATE)
    ours = TextTokenizer.load(tmp_path)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert ours.chat_template == theirs.chat_template == DEFAULT_CHAT_TEMPLATE


@pytest.mark.parametrize("bos", [None, "<|begin_of_text|>"])
def test_transformers_renders_the_default_format_identically(tmp_path, bos):
    transformers = pytest.importorskip("transformers")
    write_tokenizer(tmp_path, template=None)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "bos_token": bos}))
    (tmp_path / CHAT_TEMPLATE_FILE).write_text(DEFAULT_CHAT_TEMPLATE)
    ours = TextTokenizer.load(tmp_path)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for messages, prompt in [(CONVERSATION, False), (CONVERSATION[:4], True)]:
        expected = theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)
        assert render(ours.chat_template, messages, prompt, ours.bos_token or "", ours.eos_token) == expected
