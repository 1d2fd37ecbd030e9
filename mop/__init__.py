"""Shared infrastructure for the pipeline: typed configs, atomic file IO, CLI errors.

The name stands for "Mixture of Parrots", the paper this project reproduces.
"""
