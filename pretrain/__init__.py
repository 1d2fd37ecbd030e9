"""Pretraining: single-device model (`pretrain.model`), parallel wrappers, data, trainer."""
