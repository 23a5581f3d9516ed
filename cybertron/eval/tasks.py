"""lm-evaluation-harness tasks on cybertron's model: resolve the task names (lm_eval's built-in tasks and any
under an include path), run them through harness.CybertronLM and keep what the results file records.

lm_eval is the optional `[eval]` extra: it is imported here, inside the functions, so the rest of `cybertron
eval` (perplexity) works without it."""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cybertron.data.tokenizer import TextTokenizer
from cybertron.errors import UserError
from cybertron.models.llama import Transformer

MISSING_EXTRA = "--tasks needs lm-evaluation-harness; install it with `pip install 'cybertron[eval]'`"


@dataclass(frozen=True)
class TaskRequest:
    names: list[str]
    num_fewshot: int | None = None
    include_path: str = ""  # a folder of task YAMLs added to lm_eval's own
    builtin_tasks: bool = True  # False: only the tasks under include_path (indexing lm_eval's own takes seconds)
    seed: int = 1234  # the few-shot sampler's seed (lm_eval's default)


def task_manager(request: TaskRequest):
    """lm_eval's TaskManager for the request, every named task checked (UserError naming an unknown one)."""
    try:
        from lm_eval.tasks import TaskManager
    except ImportError as err:
        raise UserError(MISSING_EXTRA) from err
    if request.include_path and not Path(request.include_path).is_dir():
        raise UserError(f"--include-path {request.include_path} is not a directory of task YAML files")
    if not request.builtin_tasks and not request.include_path:
        raise UserError("eval.builtin_tasks=false leaves no task: give --include-path DIR with your task YAMLs")
    manager = TaskManager(include_path=request.include_path or None, include_defaults=request.builtin_tasks)
    known = set(manager.all_tasks)
    for name in request.names:
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=1)
            hint = f"; did you mean {close[0]}?" if close else "; `lm-eval ls tasks` lists every name"
            raise UserError(f"unknown lm_eval task {name!r}{hint}")
    return manager


def load_tasks(request: TaskRequest) -> dict[str, Any]:
    """lm_eval's loaded tasks (their datasets read), set up as its simple_evaluate sets them up: the few-shot
    count (a task fixed at 0 shots stays so) and the sampler's seed. UserError for a missing extra, an unknown
    task or data that cannot be loaded; call it before loading the model, so these fail first."""
    manager = task_manager(request)
    try:
        loaded = manager.load(list(request.names))
    except (OSError, ValueError) as err:  # datasets' ConnectionError and DatasetNotFoundError are OSErrors
        detail = (str(err).strip().splitlines() or [""])[0]
        raise UserError(f"lm_eval could not load the data of {', '.join(request.names)} ({type(err).__name__}: "
                        f"{detail}); a built-in task downloads its dataset from the Hugging Face Hub on first "
                        "use") from err
    for task in loaded["tasks"].values():
        if request.num_fewshot is not None and task.get_config("num_fewshot") != 0:
            task.set_config(key="num_fewshot", value=request.num_fewshot)
        elif task.get_config("num_fewshot") is None:
            task.set_config(key="num_fewshot", value=0)
        task.set_fewshot_seed(seed=request.seed)
    return loaded


def run_tasks(model: Transformer, tokenizer: TextTokenizer, loaded: dict[str, Any], limit: int | None,
              batch_size: int) -> dict[str, Any]:
    """{"results": {task: {metric: value}}, "n-shot", "n-samples", "versions", "lm_eval_version"} of the tasks
    from load_tasks, run by lm_eval's `evaluate`. Its simple_evaluate is not used: it seeds the global RNGs (the
    library changes no process-wide state) and collects the environment with `pip list` subprocesses."""
    import lm_eval
    from lm_eval.evaluator import evaluate

    from cybertron.eval.harness import CybertronLM

    out = evaluate(lm=CybertronLM(model, tokenizer, batch_size), task_dict=loaded, limit=limit, log_samples=False)
    if out is None:  # lm_eval returns None on ranks other than 0; there is one rank here
        raise UserError("lm_eval returned no results")
    keep = ("results", "groups", "n-shot", "n-samples", "versions", "higher_is_better")
    return {**{key: out[key] for key in keep if key in out}, "lm_eval_version": lm_eval.__version__}
