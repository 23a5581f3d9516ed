"""`cybertron plan`: which parallel layouts of a model fit a GPU's memory, and which runs fastest, before any
GPU is rented. layouts.py enumerates the layouts cybertron can run (through its own validators), memory.py
predicts each rank's peak memory, timing.py a relative step time, report.py prints them."""
