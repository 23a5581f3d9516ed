"""One entry point: `cybertron <command> ...`. Each command's module (cybertron/commands/<command>.py) parses its
flags; this file only dispatches and turns user errors into one clear line and exit code 2 (no traceback)."""

from __future__ import annotations

import importlib
import os
import sys

from cybertron.errors import UserError

# command -> one-line help; `cybertron.commands.<command>.main(argv: list[str]) -> int` runs it.
COMMANDS: dict[str, str] = {
    "train": "pretrain a model (default: the tiny preset on the stdlib corpus)",
    "generate": "sample text from a run directory or HF model",
    "finetune": "fine-tune an HF model on chat data (full, lora, dora, qlora)",
    "align": "align a model: dpo, ipo, simpo, orpo, reward model, grpo",
    "export": "write a run as an HF directory (--merge adapters)",
    "convert": "HF directory <-> run directory (--from-hf HF --out RUN, --run RUN --out HF)",
    "serve": "OpenAI-compatible HTTP server",
    "dashboard": "web page: runs, live metric curves, chat playground (RUNS_DIR [--port N] [--serve-url URL])",
    "plot": "training curves of runs as a PNG (loss, val loss, lr, tokens/s, grad norm)",
    "eval": "perplexity on text files and lm-evaluation-harness tasks (run or HF model)",
    "plan": "parallel layouts that fit N GPUs, with predicted memory and relative step time",
}


def _usage() -> str:
    lines = ["usage: cybertron <command> [options]", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, help_ in COMMANDS.items()]
    lines += ["", "`cybertron <command> --help` lists the options of a command."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        if not argv:
            argv = ["train"]  # the embedded default: `cybertron` alone trains the tiny preset
        else:
            print(_usage())
            return 0
    name, rest = argv[0], argv[1:]
    if name.startswith("-"):
        name, rest = "train", argv  # `cybertron --steps 10` means train
    if name not in COMMANDS:
        print(f"error: unknown command {name!r}; choose one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    try:
        command = importlib.import_module(f"cybertron.commands.{name}")
        code = int(command.main(rest) or 0)
        sys.stdout.flush()  # a broken pipe in the last buffered write shows here, not at interpreter exit
        return code
    except BrokenPipeError:
        return _reader_went_away()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _reader_went_away() -> int:
    """`cybertron train | head`: the reader of stdout closed it. Stop quietly as the CPython docs advise
    (signal module, "Note on SIGPIPE"): point stdout at devnull so the interpreter's final flush does not
    raise again, and exit 1, as Python does on EPIPE."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return 1


if __name__ == "__main__":
    sys.exit(main())
