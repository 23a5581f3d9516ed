"""`cybertron generate`: stream a completion of --prompt from a run directory or a Hugging Face model.

    cybertron generate --out RUN_DIR --prompt "def fib(n):" [--max-new-tokens N] [--temperature T]
    cybertron generate --model HF_DIR --prompt "..." [--greedy]
"""

from __future__ import annotations

import sys

from cybertron.config import ArgumentParser
from cybertron.data.escapes import decode_escapes
from cybertron.errors import UserError
from cybertron.runs import load_for_inference
from cybertron.serve.generate import generate_stream, prompt_ids, single_request_engine
from cybertron.serve.options import add_model_flags, resolve_device
from cybertron.serve.sampling import SamplingParams


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="cybertron generate", description=__doc__.split("\n")[0])
    add_model_flags(parser)
    parser.add_argument("--prompt", required=True, help="text to continue ('' = unconditional)")
    parser.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate at most")
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1.0 = off)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (same seed, same text)")
    parser.add_argument("--stop", action="append", default=[], help="stop before this text (repeatable; "
                        "backslash escapes such as \\n are decoded)")
    parser.add_argument("--greedy", action="store_true", help="always take the most likely token")
    return parser


def sampling_params(args) -> SamplingParams:
    return SamplingParams(temperature=0.0 if args.greedy else args.temperature, top_k=args.top_k,
                          top_p=args.top_p, max_tokens=args.max_new_tokens,
                          stop=tuple(decode_escapes(s, "--stop") for s in args.stop),
                          seed=args.seed)


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    params = sampling_params(args)
    params.validate()  # bad flag values fail before a model is loaded
    device = resolve_device(args.device)
    model, tokenizer, _ = load_for_inference(args.out, args.model, device, args.dtype)
    engine = single_request_engine(model, tokenizer)
    n = len(prompt_ids(tokenizer, args.prompt))
    if n + params.max_tokens > model.config.max_seq_len:
        raise UserError(f"--max-new-tokens {params.max_tokens} with a {n}-token prompt exceeds the model's "
                        f"context of {model.config.max_seq_len}; use at most {model.config.max_seq_len - n}")
    for piece in generate_stream(engine, tokenizer, args.prompt, params):
        sys.stdout.write(piece)
        sys.stdout.flush()  # stream as it is generated, even through a pipe
    sys.stdout.write("\n")
    return 0
