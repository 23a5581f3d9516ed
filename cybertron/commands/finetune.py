"""`cybertron finetune`: a base model + chat .jsonl -> a run directory of checkpoints.

    cybertron finetune --model HF_OR_RUN_DIR --data chats.jsonl --method lora [--epochs E | --steps N] [--out RUN_DIR]

Parses the config, validates it against the world size, opens the base through runs.py (on every rank) and
runs the SFT recipe (cybertron/finetune/run.py).
"""

from __future__ import annotations

from cybertron.config import help_text, parse_args
from cybertron.finetune.config import SHORTCUTS, FinetuneConfig, validate
from cybertron.finetune.run import run_finetune
from cybertron.parallel.runtime import LAUNCHER_HELP, DistEnv, command_main
from cybertron.runs import finetune_meta, open_base
from cybertron.train.session import Finished


def main(argv: list[str]) -> int:
    if "-h" in argv or "--help" in argv:
        print(help_text(FinetuneConfig(), "finetune", SHORTCUTS) + LAUNCHER_HELP)
        return 0
    parse = lambda args: parse_args(args, FinetuneConfig(), SHORTCUTS)
    return command_main(argv, "finetune", parse, validate, run)


def run(cfg: FinetuneConfig, env: DistEnv | None = None) -> Finished:
    """This rank's share of the run: the base (an HF or run directory) is opened through runs.py, its weights
    loaded on the rank's device by the recipe."""
    return run_finetune(cfg, open_base, finetune_meta(cfg).write, env)
