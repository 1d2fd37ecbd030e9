"""End-to-end demo on generated data, small enough for a laptop CPU.

    python -m demo --out demo_out        (what `make demo` runs)

1. writes tiny local files in the real hub schemas (parquet, jsonl.zst, JSON array, ...),
2. trains a BPE tokenizer on the mixture, tokenizes it into shards, merges the manifest,
   mixture plan and validation sequences (configs/data/tiny.yaml),
3. generates the synthetic phone-book, shortest-path and memorization tasks,
4. trains a tiny dense and a tiny MoE decoder with DeepSpeed on the CPU
   (configs/train/tiny_cpu.yaml), stops the MoE run with SIGTERM half-way and resumes it,
   and a tiny phone-book LM on the generated book (scored by the synthetic suite),
5. evaluates both: validation perplexity and the commonsense + knowledge suites through
   lm-evaluation-harness on local benchmark files,
6. both halves of the paper's finding on its theory tasks, one verdict line each
   (demo/verdict.py), every model trained on the same data with the same steps:
   memorization: a dense classifier and an MoE with the same ACTIVE parameters
   (configs/model/demo_mem_dense.yaml, demo_mem_moe16.yaml) on random labels;
   reasoning: on the length-2-path task (|V| = 16, held-out graphs), a dense classifier of
   width 8, an MoE of width 8 with 16 experts and a dense one of width 32
   (configs/model/demo_l2p_*.yaml),
7. writes the report (markdown, CSV, plots) across the runs.
Every step is the real CLI, so the printed commands are what a user runs on a cluster.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from mop.cli import ArgumentParser, examples
from mop.errors import UserError, check_dir_target, cli_entry

REPO = Path(__file__).resolve().parents[1]
# The memorization pair (measured on 2 CPU cores, seeds 0-2, see the README): at these sizes
# the dense model reaches 76-80% while the MoE with the same active parameters reaches 94-96%.
MEM_SIZE, MEM_SEQ_LEN, MEM_STEPS, MEM_LR = 8192, 2, 100, 1e-2
MEM_MODELS = ("dense", "moe16")  # configs/model/demo_mem_<name>.yaml
# The reasoning trio (measured on 2 CPU cores, seeds 0-2, see docs/RESULTS.md): on |V| = 16
# graphs the width-8 dense model and the width-8 MoE with 16 experts reach 69-73% on held-out
# graphs, the width-32 dense model 100%.
L2P_VERTICES, L2P_SIZE, L2P_STEPS, L2P_LR, L2P_BATCH, L2P_WARMUP = 16, 20_000, 1000, 3e-3, 256, 200
L2P_MODELS = ("dense_d8", "moe16_d8", "dense_d32")  # configs/model/demo_l2p_<name>.yaml


def _run(cmd: list[str]) -> None:
    print(f"\n$ {shlex.join(cmd)}", flush=True)
    code = subprocess.run([sys.executable, *cmd], cwd=REPO).returncode
    if code:  # the step printed its own error above; say which step stopped the demo
        raise UserError(f"demo step failed with exit code {code}: python {shlex.join(cmd)}")


@cli_entry
def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(
        prog="python -m demo",
        description=__doc__,
        epilog=examples("python -m demo", "python -m demo --out /tmp/demo --docs 30"),
    )
    parser.add_argument("--out", default="demo_out", help="output directory (recreated)")
    parser.add_argument("--docs", type=int, default=60, help="documents per generated file")
    args = parser.parse_args(argv)
    if args.docs < 1:
        raise UserError(f"--docs must be >= 1, got {args.docs}")
    out = (REPO / args.out).resolve() if not Path(args.out).is_absolute() else Path(args.out)
    check_dir_target(str(out), "--out")
    if out.exists():
        shutil.rmtree(out)
    t0 = time.perf_counter()

    from demo.samples import write_tiny_mixture
    from demo.verdict import memorization_verdict, reasoning_verdict, run_summary

    raw = write_tiny_mixture(out / "raw", n_docs=args.docs)
    print(f"[demo] wrote sample sources in the hub schemas: {', '.join(sorted(raw))}")

    cfg = "configs/data/tiny.yaml"
    over = [f"output_dir={out / 'data'}"]
    over += [f"sources.{i}.data_files={out / 'raw' / k}" for i, k in enumerate(_tiny_keys())]
    _run(["-m", "data_prep", "tokenizer", "--config", cfg, *over])
    _run(["-m", "data_prep", "tokenize", "--config", cfg, *over])
    _run(["-m", "data_prep", "verify", "--data-dir", str(out / "data")])
    syn = out / "synthetic"
    _run(
        [
            "-m",
            "data_prep",
            "synthetic",
            "phonebook",
            "--out",
            str(syn / "phonebook"),
            "--size",
            "2000",
            "--seed",
            "0",
        ]
    )
    _run(
        [
            "-m",
            "data_prep",
            "synthetic",
            "shortest-path",
            "--out",
            str(syn / "shortest_path"),
            "--size",
            "500",
            "--seed",
            "0",
            "--num-test",
            "50",
        ]
    )
    _run(
        [
            "-m",
            "data_prep",
            "synthetic",
            "memorization",
            "--out",
            str(syn / "memorization"),
            "--size",
            str(MEM_SIZE),
            "--seq-len",
            str(MEM_SEQ_LEN),
            "--seed",
            "0",
        ]
    )
    _run(
        [
            "-m",
            "data_prep",
            "synthetic",
            "length2-path",
            "--out",
            str(syn / "length2_path"),
            "--size",
            str(L2P_SIZE),
            "--vertices",
            str(L2P_VERTICES),
            "--seed",
            "0",
        ]
    )
    runs = out / "runs"
    train_cfg = "configs/train/tiny_cpu.yaml"
    data_over = [f"data.data_dir={out / 'data'}", "logging.wandb_mode=disabled", "max_steps=60"]
    for model in ("tiny_dense", "tiny_moe"):
        run_over = [f"model=configs/model/{model}.yaml", f"run_dir={runs / model}", *data_over]
        if model == "tiny_moe":
            _run_until_stopped(["-m", "pretrain", "--config", train_cfg, *run_over], runs / model)
        _run(["-m", "pretrain", "--config", train_cfg, *run_over])
    # A phone-book LM: the generator's directory is its training data (no merge step).
    book_run = runs / "phonebook_tiny_dense"
    book_over = [
        "model=configs/model/tiny_dense.yaml",
        "model.vocab_size=64",  # the character tokenizer's 40 tokens
        f"data.data_dir={syn / 'phonebook'}",
        "data.seq_len=64",
        f"run_dir={book_run}",
        "logging.wandb_mode=disabled",
        "max_steps=60",
    ]
    _run(["-m", "pretrain", "--config", train_cfg, *book_over])
    _run(["-m", "eval", "--checkpoint", str(book_run), "--suite", "synthetic", "--limit", "100"])
    bench = out / "benchmarks"
    from demo.fixtures import write_fixtures

    write_fixtures(bench)
    for model in ("tiny_dense", "tiny_moe"):
        _run(
            [
                "-m",
                "eval",
                "--checkpoint",
                str(runs / model),
                "--suite",
                "ppl,commonsense,knowledge",
                "--benchmark-dir",
                str(bench),
                "--limit",
                "4",
            ]
        )
    mem_runs = {name: runs / f"memorization_{name}" for name in MEM_MODELS}
    _run_together(
        [
            [
                [
                    "-m",
                    "pretrain.memorization",
                    "--data",
                    str(syn / "memorization"),
                    "--model",
                    f"configs/model/demo_mem_{name}.yaml",
                    "--steps",
                    str(MEM_STEPS),
                    "--lr",
                    str(MEM_LR),
                    "--log-every",
                    "50",
                    "--seed",
                    "0",
                    "--out",
                    str(run_dir),
                    "--name",
                    f"memorization_{name}",  # not an LM run's name: the report lists all
                ]
            ]
            for name, run_dir in mem_runs.items()
        ],
        [[run_dir / "train.log"] for run_dir in mem_runs.values()],
    )
    verdict = memorization_verdict(
        run_summary(mem_runs["dense"], "memorization"),
        run_summary(mem_runs["moe16"], "memorization"),
    )
    l2p_runs = {name: runs / f"length2_path_{name}" for name in L2P_MODELS}
    l2p_cmds = {
        name: [
            "-m",
            "pretrain.memorization",
            "--data",
            str(syn / "length2_path"),
            "--model",
            f"configs/model/demo_l2p_{name}.yaml",
            "--steps",
            str(L2P_STEPS),
            "--lr",
            str(L2P_LR),
            "--batch-size",
            str(L2P_BATCH),
            "--warmup",
            str(L2P_WARMUP),
            "--schedule",
            "cosine",
            "--log-every",
            "500",
            "--seed",
            "0",
            "--out",
            str(run_dir),
            "--name",
            f"length2_path_{name}",
        ]
        for name, run_dir in l2p_runs.items()
    }
    # two at a time: the wide model in one lane, the two narrow ones after each other
    _run_together(
        [[l2p_cmds["dense_d32"]], [l2p_cmds["dense_d8"], l2p_cmds["moe16_d8"]]],
        [
            [l2p_runs["dense_d32"] / "train.log"],
            [l2p_runs[n] / "train.log" for n in L2P_MODELS[:2]],
        ],
    )
    reasoning = reasoning_verdict(
        *(run_summary(l2p_runs[name], "length2_path") for name in L2P_MODELS)
    )
    _run(["-m", "eval.report", str(runs), "--out", str(out / "report")])
    print(f"\n[demo] verdict: {verdict}", flush=True)
    print(f"[demo] verdict: {reasoning}", flush=True)
    print(f"[demo] done in {time.perf_counter() - t0:.0f}s; outputs under {out}")
    print(f"[demo] report: {out / 'report' / 'report.md'}")
    return 0


def _run_together(lanes: list[list[list[str]]], logs: list[list[Path]]) -> None:
    """Run lanes of commands at once (one core each on a 2-core laptop): each lane runs its
    commands one after the other, each logging to its file; fail like _run if any fails."""
    import os
    from concurrent.futures import ThreadPoolExecutor

    env = dict(os.environ)
    # one share of the cores each: torch's default (all cores per process) oversubscribes
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // len(lanes))))

    def lane(cmds: list[list[str]], lane_logs: list[Path]) -> list[int]:
        codes = []
        for cmd, log in zip(cmds, lane_logs):
            log.parent.mkdir(parents=True, exist_ok=True)
            with open(log, "w", encoding="utf-8") as fh:
                codes.append(
                    subprocess.run(
                        [sys.executable, *cmd], cwd=REPO, env=env, stdout=fh, stderr=fh
                    ).returncode
                )
            if codes[-1]:
                break
        return codes

    for cmds, lane_logs in zip(lanes, logs):
        for cmd, log in zip(cmds, lane_logs):
            print(f"\n$ {shlex.join(cmd)}   # log: {log}", flush=True)
    with ThreadPoolExecutor(len(lanes)) as pool:
        results = list(pool.map(lane, lanes, logs))
    for cmds, lane_logs, codes in zip(lanes, logs, results):
        for cmd, log, code in zip(cmds, lane_logs, codes):
            last = (log.read_text().strip().splitlines() or ["(no output)"])[-1]
            print(f"[demo] {log.parent.name}: {last}", flush=True)
            if code:
                raise subprocess.CalledProcessError(code, cmd)


def _run_until_stopped(cmd: list[str], run_dir: Path) -> None:
    """Start training, send SIGTERM once it has logged 25 steps, expect the requeue code."""
    import signal

    from pretrain.trainer import REQUEUE_EXIT_CODE

    print(f"\n$ {shlex.join(cmd)}   # will be stopped with SIGTERM", flush=True)
    proc = subprocess.Popen([sys.executable, *cmd], cwd=REPO)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 600
    while proc.poll() is None and time.time() < deadline:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 25:
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.2)
    rc = proc.wait()
    if rc != REQUEUE_EXIT_CODE:
        raise SystemExit(f"[demo] expected exit {REQUEUE_EXIT_CODE} after SIGTERM, got {rc}")
    print(f"[demo] stopped with exit {rc} (checkpoint saved); resuming", flush=True)


def _tiny_keys() -> list[str]:
    import yaml

    data = yaml.safe_load((REPO / "configs/data/tiny.yaml").read_text())
    return [s["source"] for s in data["sources"]]


if __name__ == "__main__":
    sys.exit(main())
