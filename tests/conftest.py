"""Test-session environment shared by every test and the processes they start."""

import os

from pretrain.launch import extensions_dir

# DeepSpeed's CPU comm op is built into this environment's extension cache by `make install`
# (pretrain.launch.build_cpu_comm_op), and `python -m pretrain` loads it from there. Worker
# processes a test spawns itself would otherwise use torch's default cache and compile the op
# with g++ inside their first deepspeed.init_distributed (a minute or more on 2 cores, against
# the test's own deadline).
os.environ.setdefault("TORCH_EXTENSIONS_DIR", extensions_dir())
