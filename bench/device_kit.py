"""One call on a lent GPU machine: install, build the kernels, run tests/gpu and the benchmarks,
and leave exactly two files in $OUT: summary.json and logs.tar.gz (issue 14).

    bash tests/gpu/run_device_checks.sh            # on the GPU machine (carry .whl)
    python bench/device_kit.py --smoke --out DIR   # CPU: tiny shapes, no install, no kernels

Each step runs as its own process group with its own time cap (a hang is killed with all its
children), its output goes to a log, and a failed step is recorded while the next one still
runs. The caps fit one 8-minute device call (the kernel build alone took ~3.5 minutes on the
H200). summary.json holds every step's status, seconds and error, the tests/gpu counts, the
GPU checks of issue 23 (tests/gpu/test_gpu_path.py, a step of their own: one row per item and
the figures they measured), and every benchmark figure with the issue's floors; the table
printed last is the same summary.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SUMMARY_KEYS = ("kit", "smoke", "date", "device", "versions", "budget_s", "seconds", "steps",
                "tests", "gpu_path", "throughput", "floors", "moe_backends")  # fmt: skip
# Issue 23's GPU checks, one test per item: their own step, cap and rows in the summary.
GPU_PATH = "tests/gpu/test_gpu_path.py"


DEADLINE_ENV = "MOP_STEP_DEADLINE"  # epoch seconds at which the kit kills the step
# bench/checkpoint_save.py on a ~1.1B-parameter dense model (issue 19 item 4)
CHECKPOINT_1B = ["--d-model", "2048", "--layers", "16", "--vocab", "32000", "--saves", "1"]


@dataclass(frozen=True)
class Step:
    name: str
    cmd: list[str]
    timeout_s: float
    env: dict[str, str] | None = None


def steps(args: argparse.Namespace, work: Path) -> list[Step]:
    """The call's steps in order; caps sum to under the 8-minute budget on the GPU."""
    py = sys.executable
    whl = REPO / ".whl"
    site = work / "site"
    bench = work / "bench"

    def device_and_tests(pytest_flags: list[str], timeout_s: float, path_s: float) -> list[Step]:
        # The same steps in both modes; the GPU call also shows the tests' own output.
        pytest = [py, "-m", "pytest", "-q", *pytest_flags, "-p", "no:cacheprovider"]
        return [
            Step("device", [py, "-c", DEVICE_INFO], 60),
            Step(
                "tests_gpu",
                [
                    *pytest,
                    "tests/gpu",
                    f"--ignore={GPU_PATH}",
                    f"--junitxml={work / 'tests_gpu.xml'}",
                ],
                timeout_s,
            ),  # fmt: skip
            Step("gpu_path", [*pytest, GPU_PATH, f"--junitxml={work / 'gpu_path.xml'}"], path_s),
        ]

    if args.smoke:
        return [
            *device_and_tests([], 120, 60),
            Step(
                "train_throughput",
                [py, "bench/train_throughput.py", "--smoke", "--out", str(bench)],
                180,
            ),  # fmt: skip
        ]
    pip = [py, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile"]
    wheels = sorted(str(p) for p in whl.glob("*.whl"))
    sdists = [str(whl / f) for f in ("deepspeed-0.19.8.tar.gz", "stanford_stk-0.7.1.tar.gz")]
    install = (
        f"{_q(pip)} --target {site} {' '.join(wheels)} && "
        f"{_q(pip)} --no-build-isolation --target {site} {' '.join(sdists)}"
    )
    return [
        Step("install", ["bash", "-c", install], 90),
        # into the machine's own site-packages, beside its torch (as docker/ does)
        Step("build_kernels", ["bash", "docker/build_gpu_deps.sh", str(whl)], 300, {"PY": py}),
        *device_and_tests(["-s"], args.tests_timeout_s, args.gpu_path_timeout_s),
        Step(
            "train_throughput",
            [
                py,
                "bench/train_throughput.py",
                "--out",
                str(bench),
                "--peak-tflops",
                str(args.peak_tflops),
            ],
            args.bench_timeout_s,
        ),  # fmt: skip
        Step(
            "moe_backends",
            [py, "bench/moe_backends.py", "--experts", "8", "64", "--out", str(bench)],
            60,
        ),  # fmt: skip
        # blocking time per save, sync vs async, ~1.1B params (issue 19: async < 1 s)
        Step(
            "checkpoint_save",
            [py, "bench/checkpoint_save.py", *CHECKPOINT_1B, "--out", str(bench)],
            120,
        ),
    ]


DEVICE_INFO = """
import json, platform, torch
info = {"python": platform.python_version(), "torch": torch.__version__,
        "cuda": torch.version.cuda, "gpu": None}
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    info.update(gpu=p.name, gpu_mem_gib=round(p.total_memory / 2**30, 1),
                capability=f"{p.major}.{p.minor}")
print("DEVICE_JSON " + json.dumps(info))
"""


def _q(cmd: list[str]) -> str:
    return " ".join(cmd)


def run_step(step: Step, logs: Path, env: dict[str, str], remaining_s: float) -> dict[str, Any]:
    """Run one step in its own process group; a step past its cap is killed with its children."""
    cap = max(1.0, min(step.timeout_s, remaining_s))
    log = logs / f"{step.name}.log"
    t0 = time.perf_counter()
    rec: dict[str, Any] = {"name": step.name, "status": "ok", "rc": 0, "cap_s": cap}
    with open(log, "w", encoding="utf-8") as fh:
        fh.write(f"$ {_q(step.cmd)}\n")
        fh.flush()
        proc = subprocess.Popen(
            step.cmd,
            cwd=REPO,
            # the step's own deadline: the benchmark starts no case it cannot finish
            env={**env, **(step.env or {}), DEADLINE_ENV: str(time.time() + cap)},
            stdout=fh,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        try:
            rec["rc"] = proc.wait(timeout=cap)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rec.update(status="timeout", rc=None, error=f"killed after its cap of {cap:.0f} s")
    rec["seconds"] = round(time.perf_counter() - t0, 1)
    if rec["status"] == "ok" and rec["rc"] != 0:
        rec.update(status="failed", error=_last_error(log))
    print(f"[kit] {step.name}: {rec['status']} in {rec['seconds']} s", flush=True)
    return rec


def _last_error(log: Path) -> str:
    lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    hits = [ln for ln in lines if re.search(r"error|Error|FAILED|Traceback", ln)]
    return (hits[-1] if hits else lines[-1] if lines else "no output")[:400]


def junit_counts(xml: Path) -> dict[str, Any]:
    if not xml.is_file():
        return {"passed": None, "failed": None, "skipped": None, "errors": None, "failures": []}
    root = ET.parse(xml).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    n = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    failed = [
        f"{case.get('classname')}::{case.get('name')}"
        for case in suite.iter("testcase")
        if case.find("failure") is not None or case.find("error") is not None
    ]
    return {
        "passed": n["tests"] - n["failures"] - n["errors"] - n["skipped"],
        "failed": n["failures"],
        "skipped": n["skipped"],
        "errors": n["errors"],
        "failures": failed,
    }


def junit_cases(xml: Path) -> dict[str, str]:
    """Each test case's status (passed, failed, error, skipped) by its name."""
    if not xml.is_file():
        return {}
    out = {}
    for case in ET.parse(xml).getroot().iter("testcase"):
        status = "passed"
        for tag in ("failure", "error", "skipped"):
            if case.find(tag) is not None:
                status = "failed" if tag == "failure" else tag
        out[case.get("name")] = status
    return out


def device_info(log: Path) -> dict[str, Any]:
    if log.is_file():
        for line in log.read_text(errors="replace").splitlines():
            if line.startswith("DEVICE_JSON "):
                return json.loads(line[len("DEVICE_JSON ") :])
    return {"python": platform.python_version()}


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def build_summary(
    args: argparse.Namespace, work: Path, records: list[dict], seconds: float
) -> dict[str, Any]:
    tt = _read_json(work / "bench" / "train_throughput.json") or {}
    mb = _read_json(work / "bench" / "moe_backends.json")
    by_name = {r["name"]: r for r in records}
    summary = {
        "kit": "bench/device_kit.py",
        "smoke": args.smoke,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "device": device_info(work / "logs" / "device.log"),
        "versions": tt.get("versions"),
        "budget_s": args.budget_s,
        "seconds": round(seconds, 1),
        "steps": [by_name.get(s.name) or _not_run(s.name) for s in steps(args, work)],
        "tests": junit_counts(work / "tests_gpu.xml"),
        "gpu_path": {  # issue 23: each item's check and what it measured
            "checks": junit_cases(work / "gpu_path.xml"),
            "figures": _read_json(work / "bench" / "gpu_path.json"),
        },
        "throughput": {
            k: tt.get(k)
            for k in ("seq_len", "micro_batch", "warmup", "steps", "peak_tflops", "rows")
        },  # fmt: skip
        "floors": tt.get("floors"),
        "moe_backends": mb["rows"] if isinstance(mb, dict) else None,
    }
    assert tuple(summary) == SUMMARY_KEYS
    return summary


def _not_run(name: str) -> dict[str, Any]:
    return {"name": name, "status": "skipped", "rc": None, "seconds": 0, "error": "budget spent"}


def format_summary(summary: dict[str, Any]) -> str:
    """The summary as plain-text tables (the call's last lines of output)."""
    dev = summary["device"]
    out = [
        f"== device kit {'(SMOKE, CPU: not a GPU measurement)' if summary['smoke'] else ''}",
        f"device: {dev.get('gpu') or 'cpu'}  torch {dev.get('torch')}  cuda {dev.get('cuda')}"
        f"  total {summary['seconds']} s of {summary['budget_s']} s",
        "step              status   seconds  error",
    ]
    for s in summary["steps"]:
        out.append(
            f"{s['name']:<17} {s['status']:<8} {s.get('seconds', 0):>7}  {(s.get('error') or '')[:90]}"  # fmt: skip
        )
    t = summary["tests"]
    out.append(
        f"tests/gpu: {t['passed']} passed, {t['failed']} failed, {t['errors']} errors, "
        f"{t['skipped']} skipped {' '.join(t['failures'])}"
    )
    for name, status in summary["gpu_path"]["checks"].items():
        out.append(f"gpu check {name:<60} {status}")
    rows = (summary["throughput"] or {}).get("rows") or []
    if rows:
        out.append("case                              status   L   ms/step   tok/s      TFLOP/s  MFU    GiB    ours/hf")  # fmt: skip
        for r in rows:
            out.append(
                f"{r['name']:<33} {r['status']:<8} {_f(r['n_layers']):>2} {_f(r['step_ms']):>9} "
                f"{_f(r['tokens_per_s']):>10} {_f(r['tflops']):>8} {_f(r['mfu']):>6} "
                f"{_f(r['peak_mem_gib']):>6} {_f(r['ratio_vs_transformers']):>6}"
            )
    for f in summary["floors"] or []:
        out.append(f"floor {f['floor']:<40} target {f['target']:<5} value {_f(f['value']):<8} met {f['met']}")  # fmt: skip
    return "\n".join(out)


def _f(v: Any) -> str:
    if v is None:
        return "-"
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="CPU: tiny shapes, no install/kernels")
    p.add_argument("--out", default=os.environ.get("OUT"), help="where the two files go")
    p.add_argument("--budget-s", type=float, default=480.0, help="whole call (8 minutes)")
    p.add_argument("--tests-timeout-s", type=float, default=90.0)
    p.add_argument("--gpu-path-timeout-s", type=float, default=90.0)
    p.add_argument("--bench-timeout-s", type=float, default=200.0)
    p.add_argument("--peak-tflops", type=float, default=989.0)
    args = p.parse_args(argv)
    if not args.out:
        p.error("--out (or $OUT) is required")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="mop_kit_"))
    logs = work / "logs"
    logs.mkdir()
    site = work / "site"
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": os.pathsep.join(
            p for p in (str(site), str(REPO), os.environ.get("PYTHONPATH", "")) if p
        ),
        "OUT": str(work / "bench"),  # tests/gpu write their JSON beside the benchmark's
    }
    start = time.perf_counter()
    records = []
    for step in steps(args, work):
        remaining = args.budget_s - (time.perf_counter() - start)
        if remaining < 5:
            records.append(_not_run(step.name))
            continue
        records.append(run_step(step, logs, env, remaining))
    summary = build_summary(args, work, records, time.perf_counter() - start)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    with tarfile.open(out / "logs.tar.gz", "w:gz") as tar:
        tar.add(work, arcname="device_kit", filter=lambda ti: None if "/site" in ti.name else ti)
    print(format_summary(summary), flush=True)
    return 0 if all(s["status"] == "ok" for s in summary["steps"]) else 1


if __name__ == "__main__":
    sys.exit(main())
