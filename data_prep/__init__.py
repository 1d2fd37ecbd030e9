"""Data preparation: sources -> rendered text -> tokenizer -> packed token shards.

Stages (each a CLI subcommand of `python -m data_prep`):
  tokenizer   train or load the tokenizer and write it, with its hash, to the output
  tokenize    render and tokenize the configured sources into shards (SLURM-array aware)
  merge       check per-task manifests, write the global manifest, mixture plan, validation set
  synthetic   phone-book, shortest-path and memorization task generators
"""
