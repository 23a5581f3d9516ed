"""`cybertron train`: pretrain a model (with no arguments: the tiny preset on the Python stdlib's source).

    cybertron train [--config run.toml] [--section.key=value ...] [--nproc N [--max-restarts N]]

Parses the config, validates it against the world size, and runs the pretraining recipe
(cybertron/pretrain.py) on this process or on N local ranks started with torchrun.
"""

from __future__ import annotations

from cybertron.config import TRAINING_SHORTCUTS, TrainConfig, help_text, parse_args
from cybertron.parallel.runtime import LAUNCHER_HELP, DistEnv, command_main
from cybertron.pretrain import run_training, validate
from cybertron.runs import pretrain_meta
from cybertron.train.session import Finished

# `--model` names the preset to train from scratch (`cybertron train --model moe`).
SHORTCUTS = {**TRAINING_SHORTCUTS, "--model": "model.preset"}


def main(argv: list[str]) -> int:
    if "-h" in argv or "--help" in argv:
        print(help_text(TrainConfig(), "train", SHORTCUTS) + LAUNCHER_HELP)
        return 0
    return command_main(argv, "train", lambda args: parse_args(args, TrainConfig(), SHORTCUTS), validate, run)


def run(cfg: TrainConfig, env: DistEnv | None = None) -> Finished:
    """This rank's share of the run; the run directory records it as a pretraining run."""
    return run_training(cfg, pretrain_meta(cfg).write, env)
