"""Test-session environment shared by every test and the processes they start."""

import os

import pytest

from pretrain.launch import extensions_dir

# DeepSpeed's CPU comm op is built into this environment's extension cache by `make install`
# (pretrain.launch.build_cpu_comm_op), and `python -m pretrain` loads it from there. Worker
# processes a test spawns itself would otherwise use torch's default cache and compile the op
# with g++ inside their first deepspeed.init_distributed (a minute or more on 2 cores, against
# the test's own deadline).
os.environ.setdefault("TORCH_EXTENSIONS_DIR", extensions_dir())


@pytest.fixture(autouse=True)
def _restore_environment():
    """Each test starts from the session's environment. A trainer run in the test process sets
    RANK, WORLD_SIZE, LOCAL_RANK and MASTER_PORT on os.environ (pretrain.launch.prepare_env);
    left there, they reach the jobs a later test submits with `--export=ALL`, where every task
    then reads itself as rank 0 of a world of one on one shared port."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)
