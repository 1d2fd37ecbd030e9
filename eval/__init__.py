"""Evaluation stage: perplexity, lm-evaluation-harness benchmarks, synthetic tasks, report.

`python -m eval --checkpoint RUN_DIR[/step] --suite ppl|knowledge|commonsense|math|synthetic|all`
writes `results.json` beside the checkpoint (schema: mop/results.py);
`python -m eval.report RUN_DIRS... --out DIR` turns many of them into tables and plots.
"""
