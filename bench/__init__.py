"""Benchmarks of cn2_jax (`bench/bench.py` is the command; see bench/RESULTS.md).

The modules of the one-command benchmark, in the order a run uses them:

* `synthetic`  sizes and synthetic batches (numpy only; shared by both sides)
* `measure`    result file, timing loops, statistics and error records shared by both sides
* `jax_side`   the cn2_jax train / inference cases (imports JAX only when a case runs)
* `torch_side` torchvision Faster R-CNN cases (imports torch only when its case runs)
* `runner`     one subprocess per case, time budget, persistent compile cache re-runs
* `report`     the markdown table of bench/RESULTS.md and the merge of several result files

Nothing here imports JAX or torch at import time, so `bench.py --merge` runs without either.
"""
