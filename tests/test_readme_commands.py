"""Every command in README.md's code blocks runs, as a user would run it after
`source .venv/bin/activate`: the venv's bin first on PATH, no PYTHONPATH, from a fresh
directory outside the checkout (the project is installed in the venv by `make install`).

Each command has an entry in SAFE, keyed by the command exactly as the README writes it
(continuation lines joined, comments dropped, whitespace normalised). The entry says how it
runs here: as written, or a safe form (`--dry-run`, `--help`, a smaller size, a missing input
with its documented exit code), and what exit code and output prove it worked. A README
command without an entry fails `test_every_readme_command_has_a_safe_form`, so a new command
cannot go untested; an entry whose command left the README fails it too.

To add a command: copy the line the failing test prints into SAFE with `Safe()` (as written,
exit 0) or a safe form; `{repo}` in `run`/`setup` is the checkout.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
VENV_BIN = Path(sys.executable).parent
# sbatch stand-in: records the call, answers a job id as `sbatch --parsable` does
FAKE_SBATCH = """#!/usr/bin/env bash
n=$(( $(cat "$PWD/.sbatch-count" 2>/dev/null || echo 100) + 1 ))
echo $n > "$PWD/.sbatch-count"
echo "sbatch $*" >> "$PWD/sbatch-calls"
echo "$n"
"""


@dataclass(frozen=True)
class Safe:
    """How a README command runs in the test (None / empty: as the README writes it)."""

    run: str | None = None  # the shell command run instead of the README's
    code: int = 0  # expected exit code (README "When something goes wrong")
    expect: str = ""  # a substring of stdout + stderr that shows it did its job
    setup: str = ""  # shell commands run first, in the same directory
    checkout: bool = False  # the README runs it in the checkout (make, bash tests/...)
    why: str = ""  # why the safe form, where it is not the command as written


def dry(cmd: str, expect: str = "", why: str = "") -> Safe:
    return Safe(run=f"{cmd} --dry-run", expect=expect, why=why or "--dry-run: nothing is run")


NL = "configs/data/natural_language.yaml"
PAPER = "configs/train/paper_moe_d512_e8.yaml"
MISSING_RUN = "a run or checkpoint the test does not have: the documented exit 3, after the flags and suites were parsed"

SAFE: dict[str, Safe] = {
    # ---- set-up: make prints what it would do (-n); `make test`/`make demo` run in CI
    "make demo": Safe(run="make -n demo", checkout=True, expect="-m demo --out demo_out"),
    "make test": Safe(run="make -n test", checkout=True, expect="-m pytest"),
    # ---- the intro's measured memorization pair (the demo's): cheap, run as written
    "python -m data_prep synthetic memorization --out data/mem_2_s0 --size 8192 --seq-len 2 --seed 0": Safe(
        expect="memorization written to data/mem_2_s0"
    ),
    "python -m pretrain.memorization --data data/mem_2_s0 --model configs/model/demo_mem_dense.yaml --lr 1e-2 --seed 0 --steps 100 --out runs/mem_dense_2_s0": Safe(
        setup="python -m data_prep synthetic memorization --out data/mem_2_s0 --size 8192 --seq-len 2 --seed 0",
        expect="memorization accuracy",
    ),
    "python -m pretrain.memorization --data data/mem_2_s0 --model configs/model/demo_mem_moe16.yaml --lr 1e-2 --seed 0 --steps 100 --out runs/mem_moe16_2_s0": Safe(
        setup="python -m data_prep synthetic memorization --out data/mem_2_s0 --size 8192 --seq-len 2 --seed 0",
        expect="memorization accuracy",
    ),
    # ---- data preparation: the real mixtures stream from the hub; their configs dry-run
    f"python -m data_prep tokenizer --config {NL}": dry(
        f"python -m data_prep tokenizer --config {NL}", "output_dir"
    ),
    f"python -m data_prep tokenize --config {NL} workers=16": dry(
        f"python -m data_prep tokenize --config {NL} workers=16", "workers: 16"
    ),
    "python -m data_prep tokenize --config ... --task-index 3 --num-tasks 64 --no-merge": dry(
        f"python -m data_prep tokenize --config {NL} --task-index 3 --num-tasks 64 --no-merge",
        "output_dir",
        why="`...` stands for the config: the one above, dry-run",
    ),
    f"python -m data_prep merge --config {NL}": dry(
        f"python -m data_prep merge --config {NL}", "output_dir"
    ),
    "python -m data_prep verify --data-dir data/natural_language": Safe(
        setup="python -m data_prep synthetic phonebook --out data/natural_language --size 200 --seed 0",
        why="verifies a small synthetic directory made under that name",
    ),
    "python -m data_prep synthetic phonebook --out data/phonebook_1e5 --size 100000 --seed 0": Safe(
        run="python -m data_prep synthetic phonebook --out data/phonebook_1e5 --size 2000 --seed 0",
        why="a smaller book, same command",
    ),
    "python -m data_prep synthetic shortest-path --out data/sp --size 1000000 --seed 0": Safe(
        run="python -m data_prep synthetic shortest-path --out data/sp --size 500 --seed 0 --num-test 50",
        why="fewer graphs, same command",
    ),
    "python -m data_prep synthetic memorization --out data/mem --size 4096 --seed 0": Safe(),
    "python -m data_prep synthetic length2-path --out data/l2p --size 50000 --vertices 16 --seed 0": Safe(
        run="python -m data_prep synthetic length2-path --out data/l2p --size 2000 --vertices 16 --seed 0 --num-test 100",
        why="fewer graphs, same command",
    ),
    "python -m data_prep import-megatron --prefix /data/web_text_document /data/code_text_document --source web code --tokenizer tokenizer.json --out data/imported --validation-sequences 500": Safe(
        code=3, expect="tokenizer file not found: tokenizer.json", why="no Megatron files here"
    ),
    f"python -m pretrain --config {PAPER} data.data_dir=data/imported": dry(
        f"python -m pretrain --config {PAPER} data.data_dir=data/imported",
        "data_dir: data/imported",
    ),
    # ---- model
    "python -m pretrain.model_info configs/model/*.yaml": Safe(expect="moe_d512_e8"),
    "python -m pretrain.model.hf_export --config configs/model/moe_d512_e8.yaml --weights sd.pt --out hf/": Safe(
        code=3, expect="--weights file not found: sd.pt", why="no trained weights here"
    ),
    # ---- training: the resolved config (a CPU run is the demo's and CI's)
    "python -m pretrain --config configs/train/tiny_cpu.yaml data.data_dir=demo_out/data --dry-run": Safe(
        expect="data_dir: demo_out/data"
    ),
    "python -m pretrain --config configs/train/tiny_cpu.yaml data.data_dir=demo_out/data": dry(
        "python -m pretrain --config configs/train/tiny_cpu.yaml data.data_dir=demo_out/data",
        why="trained by the demo and tests/pretrain",
    ),
    f"torchrun --nproc_per_node=8 -m pretrain --config {PAPER} data.data_dir=/data/natural_language run_dir=runs/moe_d512_e8": dry(
        f"python -m pretrain --config {PAPER} data.data_dir=/data/natural_language run_dir=runs/moe_d512_e8",
        "run_dir: runs/moe_d512_e8",
        why="8 GPUs: the config dry-runs; torchrun itself is checked below",
    ),
    "python -m pretrain --config configs/train/synthetic.yaml model=configs/model/synth12_dense_d256.yaml model.vocab_size=64 data.data_dir=data/phonebook_1e5 run_dir=runs/pb_1e5/synth12_dense_d256": dry(
        "python -m pretrain --config configs/train/synthetic.yaml model=configs/model/synth12_dense_d256.yaml model.vocab_size=64 data.data_dir=data/phonebook_1e5 run_dir=runs/pb_1e5/synth12_dense_d256",
        "vocab_size: 64",
    ),
    "python -m slurm.submit sweep configs/train/synthetic.yaml --models configs/model/synth12_dense_*.yaml configs/model/synth12_moe_*.yaml --runs-dir runs/pb_1e5 --eval synthetic data.data_dir=data/phonebook_1e5 model.vocab_size=64": Safe(
        expect="eval.sbatch runs/pb_1e5/synth12_moe_d256_e8 --suite synthetic",
        why="sbatch is a stand-in that records the jobs",
    ),
    # ---- evaluation: no trained run here; every flag and suite is parsed first
    "python -m eval --checkpoint runs/moe_d512_e8 --suite ppl": Safe(
        code=3, expect="checkpoint path does not exist: runs/moe_d512_e8", why=MISSING_RUN
    ),
    "python -m eval --checkpoint runs/moe_d512_e8 --suite knowledge,commonsense,math [--limit 100]": Safe(
        run="python -m eval --checkpoint runs/moe_d512_e8 --suite knowledge,commonsense,math --limit 100",
        code=3,
        expect="checkpoint path does not exist",
        why="[...] is optional; " + MISSING_RUN,
    ),
    "python -m eval --checkpoint runs/moe_d512_e8/checkpoints/step_00010000 --suite all": Safe(
        code=3, expect="checkpoint path does not exist", why=MISSING_RUN
    ),
    "python -m eval --checkpoint runs/pb_1e5/synth12_dense_d256 --suite synthetic": Safe(
        code=3, expect="checkpoint path does not exist", why=MISSING_RUN
    ),
    "torchrun --nproc_per_node=8 -m eval --checkpoint ... --suite all": Safe(
        run="torchrun --nproc_per_node=1 -m eval --checkpoint runs/x --suite all",
        code=1,  # torchrun reports a failed worker as 1; the worker's own line is below
        expect="checkpoint path does not exist: runs/x",
        why="`...` stands for a run; one worker",
    ),
    "python -m eval.report runs/ --out report/": Safe(
        code=3, expect="no such file or directory: runs", why="no runs here"
    ),
    "python -m eval.export --checkpoint runs/moe_d512_e8 --out hf/moe_d512_e8": Safe(
        code=3, expect="checkpoint path does not exist", why=MISSING_RUN
    ),
    # ---- grids: the local grids print their commands (they run for minutes; CI's
    # tests/slurm/test_grid.py runs a small one); the SLURM grid is submitted to the stand-in
    "python -m slurm.submit sweep --grid configs/reproduce/memorization_cpu.yaml --local": dry(
        "python -m slurm.submit sweep --grid configs/reproduce/memorization_cpu.yaml --local",
        "python -m pretrain.memorization",
    ),
    "python -m slurm.submit sweep --grid configs/reproduce/length2_path_cpu.yaml --local --jobs 2": dry(
        "python -m slurm.submit sweep --grid configs/reproduce/length2_path_cpu.yaml --local --jobs 2",
        "python -m data_prep synthetic length2-path",
    ),
    "python -m slurm.submit sweep --grid configs/reproduce/phonebook_cpu.yaml --local --jobs 2": dry(
        "python -m slurm.submit sweep --grid configs/reproduce/phonebook_cpu.yaml --local --jobs 2",
        "python -m eval.report",
    ),
    "python -m slurm.submit --dry-run sweep --grid configs/reproduce/phonebook_gpu.yaml": Safe(
        expect="grid.sbatch configs/reproduce/phonebook_gpu.yaml report"
    ),
    "python -m slurm.submit sweep --grid configs/reproduce/phonebook_gpu.yaml": Safe(
        expect="grid.sbatch configs/reproduce/phonebook_gpu.yaml report",
        why="sbatch is a stand-in that records the jobs",
    ),
    # ---- GPU checks: scripts of the checkout; fetching needs the package index and running
    # needs the GPU machine: parsed here, and `--smoke` is run by tests/bench/test_device_kit.py
    "bash tests/gpu/fetch_device_deps.sh": Safe(
        run="bash -n tests/gpu/fetch_device_deps.sh", checkout=True
    ),
    "bash tests/gpu/run_device_checks.sh": Safe(
        run="bash -n tests/gpu/run_device_checks.sh", checkout=True
    ),
    "bash tests/gpu/run_device_checks.sh --smoke": Safe(
        run='grep -q \'tests/gpu/run_device_checks.sh", "--smoke"\' tests/bench/test_device_kit.py',
        checkout=True,
        why="CI runs it in tests/bench/test_device_kit.py",
    ),
}


def readme_commands(text: str) -> list[str]:
    """The commands of the README's fenced code blocks, one string each: continuation lines
    joined, `#` comments dropped, whitespace normalised (shell words re-joined by spaces)."""
    commands = []
    for block in re.findall(r"^```[a-z]*\n(.*?)^```", text, re.M | re.S):
        for line in re.sub(r"\\\n", " ", block).splitlines():
            words = shlex.split(line, comments=True)
            if words:
                commands.append(" ".join(words))
    return commands


def test_every_readme_command_has_a_safe_form():
    commands = readme_commands(README.read_text(encoding="utf-8"))
    assert len(commands) >= 30, "the README's code blocks were not found"
    missing = [c for c in commands if c not in SAFE]
    assert not missing, (
        "README commands without an entry in tests/test_readme_commands.py SAFE (add one: "
        "Safe() runs it as written):\n" + "\n".join(missing)
    )
    stale = [c for c in SAFE if c not in commands]
    assert not stale, "SAFE entries whose command is no longer in the README:\n" + "\n".join(stale)


def test_the_extraction_joins_continuations_and_drops_comments():
    text = "```bash\n# a comment\npython -m x --a 1 \\\n    --b 2   # why\n  #  more\n```\nprose\n"
    assert readme_commands(text) == ["python -m x --a 1 --b 2"]


@pytest.fixture(scope="module")
def shell_env(tmp_path_factory) -> dict[str, str]:
    """The environment of an activated venv: its bin first on PATH (torchrun too), an sbatch
    stand-in after it, no PYTHONPATH (the installed project is what imports)."""
    bin_dir = tmp_path_factory.mktemp("bin")
    sbatch = bin_dir / "sbatch"
    sbatch.write_text(FAKE_SBATCH)
    sbatch.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(
        PATH=f"{VENV_BIN}:{bin_dir}:{env['PATH']}",
        VIRTUAL_ENV=str(VENV_BIN.parent),
        OMP_NUM_THREADS="1",
        WANDB_MODE="disabled",
    )
    return env


@pytest.mark.parametrize("command", list(SAFE), ids=[c[:60] for c in SAFE])
def test_readme_command_runs(command, tmp_path, shell_env):
    safe = SAFE[command]
    work = tmp_path / "elsewhere"  # not the checkout, not under it
    work.mkdir()
    assert REPO not in work.parents
    cwd = REPO if safe.checkout else work
    script = safe.run if safe.run is not None else command
    if safe.setup:
        script = f"{safe.setup} >/dev/null && {script}"
    proc = subprocess.run(
        ["bash", "-c", script.replace("{repo}", str(REPO))],
        cwd=cwd,
        env=shell_env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == safe.code, f"$ {script}\nexit {proc.returncode}:\n{out[-3000:]}"
    assert safe.expect in out, f"$ {script}\n{safe.expect!r} not in:\n{out[-3000:]}"
    if safe.code == 0 and not safe.checkout:
        assert "Traceback" not in out, out[-3000:]
