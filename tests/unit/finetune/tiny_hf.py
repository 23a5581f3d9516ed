"""Tiny Hugging Face model directories made by `transformers` itself, with a BPE tokenizer trained by
`tokenizers` and a Jinja chat template, plus small chat datasets: the inputs a fine-tuning user brings."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

# ChatML, as Qwen2 ships it (without the default system prompt).
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
          "{% endif %}")
# Llama 3's template shape: bos, header ids, eot.
LLAMA3 = ("{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
          "'<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>",
           "<|end_header_id|>", "<|eot_id|>"]
VOCAB = 384
WORDS = ("the cat dog sat on mat red blue green one two three what is color of sky sea grass "
         "hello hi thanks yes no please tell me a story about small big").split()

COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256)


def _sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def write_tokenizer(out: Path, template: str | None = CHATML) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    rng = random.Random(0)
    trainer = trainers.BpeTrainer(vocab_size=VOCAB - 16, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([_sentence(rng, 12) for _ in range(300)], trainer)
    tok.save(str(out / "tokenizer.json"))
    eos = "<|im_end|>" if template is CHATML else "<|eot_id|>"
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos, "pad_token": "<|endoftext|>",
              "bos_token": "<|begin_of_text|>" if template is LLAMA3 else None}
    if template is not None:
        config["chat_template"] = template
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def make_hf_dir(out: Path, family: str = "llama", template: str | None = CHATML, seed: int = 0,
                max_shard_size: str | None = None, **overrides) -> Path:
    """A random tiny `family` (llama, qwen2, mistral, mixtral, phi3, gemma2, gemma3) model saved by transformers,
    with tokenizer files (weights sharded with an index when max_shard_size is given, e.g. "150KB")."""
    import transformers

    config_cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
                  "mistral": transformers.MistralConfig, "mixtral": transformers.MixtralConfig,
                  "phi3": transformers.Phi3Config, "gemma2": transformers.Gemma2Config,
                  "gemma3": transformers.Gemma3TextConfig}[family]
    extra = {"sliding_window": None} if family in ("mistral", "mixtral", "phi3") else {}
    if family == "phi3":  # token ids inside the tiny vocabulary; half of each head rotates
        extra.update(pad_token_id=0, bos_token_id=1, eos_token_id=2, partial_rotary_factor=0.5)
    if family.startswith("gemma"):  # small heads and a window the chats outgrow
        extra.update(pad_token_id=0, bos_token_id=1, eos_token_id=2, head_dim=16, sliding_window=16)
    if family == "mixtral":  # a mixture of experts: 4 experts, 2 per token
        extra.update(num_local_experts=4, num_experts_per_tok=2)
    torch.manual_seed(seed)
    cfg = config_cls(**{**COMMON, **extra, **overrides})
    model = transformers.AutoModelForCausalLM.from_config(cfg).float()
    with torch.no_grad():  # random biases and norms, so a mistake in either would show in the logits
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
            elif name.endswith("mlp.gate.weight"):  # routers far from uniform: each token's choice matters
                p.normal_(0, 0.5)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    write_tokenizer(out, template)
    return out


def write_chats(path: Path, n: int = 24, seed: int = 0, fmt: str = "messages") -> Path:
    """n short conversations (some multi-turn, with a system message) or prompt/response pairs."""
    rng = random.Random(seed)
    with path.open("w") as f:
        for i in range(n):
            if fmt == "prompt_response":
                record = {"prompt": _sentence(rng, 5), "response": _sentence(rng, 4)}
            else:
                messages = [{"role": "system", "content": "be brief"}] if i % 3 == 0 else []
                for _ in range(1 + i % 2):
                    messages += [{"role": "user", "content": _sentence(rng, 5)},
                                 {"role": "assistant", "content": _sentence(rng, 4)}]
                record = {"messages": messages}
            f.write(json.dumps(record) + "\n")
    return path
