"""`cybertron align`: preference optimisation, reward models and GRPO.

    cybertron align --method dpo    --model HF_OR_RUN_DIR --data prefs.jsonl   [--weights lora|full|...]
    cybertron align --method reward --model HF_OR_RUN_DIR --data prefs.jsonl
    cybertron align --method grpo   --model HF_OR_RUN_DIR --data prompts.jsonl --reward FILE.py:FUNCTION

Parses the config, validates it against the world size, opens the base (and a reward-model run given as
--reward) through runs.py on every rank, and runs the alignment recipe (cybertron/align/run.py).
"""

from __future__ import annotations

from cybertron.align.config import SHORTCUTS, AlignConfig, validate
from cybertron.align.run import run_align
from cybertron.config import help_text, parse_args
from cybertron.parallel.runtime import LAUNCHER_HELP, DistEnv, command_main
from cybertron.runs import finetune_meta, load_reward_model, open_base
from cybertron.train.session import Finished


def main(argv: list[str]) -> int:
    if "-h" in argv or "--help" in argv:
        print(help_text(AlignConfig(), "align", SHORTCUTS) + LAUNCHER_HELP)
        return 0
    parse = lambda args: parse_args(args, AlignConfig(), SHORTCUTS)
    return command_main(argv, "align", parse, validate, run)


def run(cfg: AlignConfig, env: DistEnv | None = None) -> Finished:
    """This rank's share of the run: the base is opened through runs.py, its weights loaded on the rank's
    device by the recipe; a reward-model run (align.reward=RUN_DIR) is loaded through runs.py too."""
    return run_align(cfg, open_base, finetune_meta(cfg).write, env, reward_model=load_reward_model)
