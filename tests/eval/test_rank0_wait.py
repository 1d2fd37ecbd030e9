"""`--suite synthetic,ppl` under several ranks (issue 23 item 4): the synthetic tasks run on
rank 0 alone, and the other ranks used to go straight on to ppl, whose first collective then
waited for rank 0 under the process-group timeout (NCCL: 10 minutes) and aborted the job
whenever the synthetic part took longer. Here: gloo with a 3 s timeout, a synthetic suite
that takes 6 s; both ranks must finish and the ppl collective must see both."""

from __future__ import annotations

import json
import os
import time
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pretrain.launch import free_port

TIMEOUT = timedelta(seconds=3)
SLOW_S = 6.0  # twice the timeout


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
        LOCAL_RANK=str(rank),
    )  # fmt: skip
    import eval.__main__ as eval_main
    import eval.tasks  # noqa: F401  (what main imports, imported first: the ranks start level)
    from eval import checkpoint as eval_checkpoint
    from eval import lm_adapter
    from mop import results

    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=TIMEOUT)
    dist.barrier()

    loaded = SimpleNamespace(
        model=None, tokenizer=None, data_dir=out_dir, ref=SimpleNamespace(path=Path(out_dir)),
        header=lambda name: {"checkpoint": out_dir, "step": 1},
    )  # fmt: skip
    ppl_sum = {}

    def run_suite_section(unit, lm, args, loaded):
        if unit == "synthetic":
            time.sleep(SLOW_S)  # longer than the group's timeout
            return "synthetic", {"phonebook": {"exact_match": 1.0}}
        t = torch.ones(1)
        dist.all_reduce(t)  # the next suite's first collective
        ppl_sum["value"] = float(t)
        return "ppl", {"loss": 1.0, "perplexity": 2.7}

    eval_checkpoint.load_for_eval = lambda *a, **k: loaded
    lm_adapter.MopLM = lambda **k: SimpleNamespace(**k, max_length=64)
    eval_main.run_suite_section = run_suite_section
    results.update_results = lambda *a, **k: {}
    results.results_path = lambda path: Path(path) / "results.json"
    eval_main.format_table = lambda doc, sections: ""
    t0 = time.perf_counter()
    code = eval_main.main(["--checkpoint", out_dir, "--suite", "synthetic,ppl", "--device", "cpu"])
    out = {"code": code, "ppl_sum": ppl_sum.get("value"), "seconds": time.perf_counter() - t0}
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(out))
    dist.destroy_process_group()


def test_other_ranks_wait_for_rank0s_synthetic_suite_past_the_timeout(tmp_path):
    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [g["code"] for g in got] == [0, 0], got
    assert [g["ppl_sum"] for g in got] == [2.0, 2.0]  # both ranks met in ppl's all-reduce
    assert all(g["seconds"] >= SLOW_S for g in got)  # rank 1 did wait for rank 0
