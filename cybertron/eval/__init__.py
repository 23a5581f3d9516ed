"""Evaluating a loaded model: perplexity over text files (perplexity.py) and lm-evaluation-harness tasks through
cybertron's own model and serving engine (harness.py, tasks.py). The command (commands/eval.py) loads the model
through runs.py and hands it over; this package never reads a run directory itself."""
