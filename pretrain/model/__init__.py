"""Single-device decoder modules: attention, dense MLP, MoE layers and routers.

Import from the submodules (`pretrain.model.transformer.build_model`, `pretrain.model.config`);
this package init stays empty of imports so that `peer.py`/`soft_moe.py` can import sibling
modules without a cycle through `config.py`.
"""
