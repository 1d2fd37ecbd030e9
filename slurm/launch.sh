# Sourced by every slurm/*.sbatch job: the command that starts Python, natively or inside the
# container that `python -m slurm.submit --container IMAGE` asked for (slurm/container.py sets
# MOP_CONTAINER_IMAGE, MOP_CONTAINER_RUNTIME=pyxis|apptainer, MOP_CONTAINER_MOUNTS).
#   mop_python [SRUN_OPTION ...]   fills the array MOP_PY; then: "${MOP_PY[@]}" -m MODULE ...
#     native     [srun OPTIONS] $PY              (srun only when options are given; PY unset:
#                     this checkout's .venv/bin/python, else `python` on PATH, e.g. an
#                     activated environment; the project is installed there, so any
#                     working directory will do)
#     pyxis      srun OPTIONS --container-image=IMAGE --container-mounts=$PWD:$PWD[,MOUNTS]
#                     --container-workdir=$PWD python      (pyxis lives in srun, so always srun;
#                                                           no OPTIONS: --ntasks=1)
#     apptainer  [srun OPTIONS] apptainer exec --nv --bind $PWD[,MOUNTS] --pwd $PWD IMAGE python
# The submit directory is mounted at its own path: relative configs, data and run directories
# mean the same inside. The job's environment (SLURM_*, NCCL_*, WANDB_*) reaches the container:
# both pyxis and apptainer (without --cleanenv) pass it on.
MOP_REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
mop_python() {
  local image=${MOP_CONTAINER_IMAGE:-} runtime=${MOP_CONTAINER_RUNTIME:-pyxis}
  local mounts=${MOP_CONTAINER_MOUNTS:-}
  MOP_PY=()
  if [ -z "$image" ]; then
    if [ $# -gt 0 ]; then MOP_PY=(srun "$@"); fi
    local py=${PY:-$MOP_REPO/.venv/bin/python}
    if [ -z "${PY:-}" ] && [ ! -x "$py" ]; then py=python; fi
    MOP_PY+=("$py")
    return 0
  fi
  case $runtime in
    pyxis)
      if [ $# -eq 0 ]; then set -- --ntasks=1; fi  # one process, as natively
      MOP_PY=(srun "$@" --container-image="$image" --container-mounts="$PWD:$PWD${mounts:+,$mounts}"
              --container-workdir="$PWD" python) ;;
    apptainer)
      if [ $# -gt 0 ]; then MOP_PY=(srun "$@"); fi
      MOP_PY+=(apptainer exec --nv --bind "$PWD${mounts:+,$mounts}" --pwd "$PWD" "$image" python) ;;
    *)
      echo "error: MOP_CONTAINER_RUNTIME=$runtime: use pyxis or apptainer" >&2
      exit 2 ;;
  esac
  echo "[launch] in container ($runtime): $image"
}
