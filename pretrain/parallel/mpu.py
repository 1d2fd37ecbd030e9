"""The `mpu` object DeepSpeed takes in `deepspeed.initialize(mpu=...)` (Megatron's interface).

With it DeepSpeed shards ZeRO state and reduces gradients over the data-parallel group only
(the ranks with the same tp rank), saves one model file per tp rank
(`mp_rank_XX_model_states.pt`), and sums gradient norms over the model-parallel group, counting
parameters marked `tensor_model_parallel` on every tp rank and the others on tp rank 0 only.
"""

from __future__ import annotations

from pretrain.parallel.mesh import Mesh


class MeshMPU:
    """Megatron-style accessors over a `Mesh` whose process groups exist."""

    def __init__(self, mesh: Mesh):
        if mesh.world_size > 1 and mesh.dp_group is None:
            raise RuntimeError("MeshMPU needs init_process_groups(mesh) first")
        self.mesh = mesh

    # tensor (= model) parallel; no pipeline parallel, so the two are the same group
    def get_tensor_model_parallel_rank(self) -> int:
        return self.mesh.tp_rank

    def get_tensor_model_parallel_world_size(self) -> int:
        return self.mesh.tp

    def get_tensor_model_parallel_group(self):
        return self.mesh.tp_group

    def get_tensor_model_parallel_src_rank(self) -> int:
        return self.mesh.dp_rank * self.mesh.tp

    get_model_parallel_rank = get_tensor_model_parallel_rank
    get_model_parallel_world_size = get_tensor_model_parallel_world_size
    get_model_parallel_group = get_tensor_model_parallel_group

    def get_pipeline_model_parallel_world_size(self) -> int:
        return 1

    def get_pipeline_model_parallel_rank(self) -> int:
        return 0

    # data parallel
    def get_data_parallel_rank(self) -> int:
        return self.mesh.dp_rank

    def get_data_parallel_world_size(self) -> int:
        return self.mesh.dp

    def get_data_parallel_group(self):
        return self.mesh.dp_group

    def get_data_parallel_group_ranks(self) -> list[int]:
        return self.mesh.dp_ranks()


def build_mpu(mesh: Mesh) -> MeshMPU | None:
    """None in a world of one (DeepSpeed's defaults are then right)."""
    return None if mesh.world_size == 1 else MeshMPU(mesh)
