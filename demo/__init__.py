"""The end-to-end demo and the generated sample data it (and the tests) use.

Sits on top of every layer (mop -> data_prep -> pretrain -> eval -> slurm): nothing in the
production packages imports it. `samples` writes tiny files in the hub datasets' own schemas;
`fixtures` writes tiny benchmark files in the layout `eval --benchmark-dir` reads.
"""
