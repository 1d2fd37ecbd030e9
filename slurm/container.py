"""Run every submitted job inside a container image (pyxis/enroot or Apptainer).

`slurm.submit --container IMAGE [--container-runtime pyxis|apptainer]
[--container-mounts SRC[:DST[:FLAGS]],...]` puts three variables into each job's environment;
slurm/launch.sh, which every sbatch script sources, turns them into the command that starts
Python:
    pyxis:     srun --container-image=IMAGE --container-mounts=$PWD:$PWD,MOUNTS
                    --container-workdir=$PWD python ...
    apptainer: [srun] apptainer exec --nv --bind $PWD,MOUNTS --pwd $PWD IMAGE python ...
The submit directory is always mounted at its own path, so configs, data and run
directories given relative to it mean the same inside the container.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mop.errors import UserError

RUNTIMES = ("pyxis", "apptainer")
ENV_IMAGE = "MOP_CONTAINER_IMAGE"
ENV_RUNTIME = "MOP_CONTAINER_RUNTIME"
ENV_MOUNTS = "MOP_CONTAINER_MOUNTS"


@dataclass(frozen=True)
class Container:
    image: str
    runtime: str = "pyxis"
    mounts: tuple[str, ...] = ()

    def job_env(self) -> dict[str, str]:
        """The variables slurm/launch.sh reads in the job."""
        env = {ENV_IMAGE: self.image, ENV_RUNTIME: self.runtime}
        if self.mounts:
            env[ENV_MOUNTS] = ",".join(self.mounts)
        return env


def parse_container(image: str | None, runtime: str, mounts: str | None) -> Container | None:
    """Validate the --container* flags; None when no image was asked for."""
    if image is None:
        if mounts:
            raise UserError("--container-mounts needs --container IMAGE")
        return None
    if not image.strip():
        raise UserError("--container: the image is empty")
    if runtime not in RUNTIMES:
        raise UserError(f"--container-runtime {runtime!r}: use one of {', '.join(RUNTIMES)}")
    if runtime == "apptainer" and "://" not in image and not Path(image).is_file():
        # a local .sif must exist now, not fail in every job an hour later
        raise UserError(f"--container {image}: no such Apptainer image file")
    return Container(image, runtime, tuple(_check_mount(m) for m in (mounts or "").split(",") if m))


def _check_mount(spec: str) -> str:
    """SRC[:DST[:FLAGS]] with an absolute, existing SRC (both runtimes need absolute paths)."""
    parts = spec.split(":")
    src = parts[0]
    if len(parts) > 3 or not src:
        raise UserError(f"--container-mounts {spec!r}: expected SRC[:DST[:FLAGS]]")
    if not src.startswith("/"):
        raise UserError(f"--container-mounts {spec!r}: SRC must be an absolute path")
    if not Path(src).exists():
        raise UserError(f"--container-mounts {spec!r}: {src} does not exist")
    if len(parts) > 1 and not parts[1].startswith("/"):
        raise UserError(f"--container-mounts {spec!r}: DST must be an absolute path")
    return spec
