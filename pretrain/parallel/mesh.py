"""Process layout: world = tp x dp, expert parallel inside dp, and the torch.distributed groups.

Rank r sits at tp_rank = r % tp, dp_rank = r // tp: tensor-parallel groups are consecutive ranks
(on a GPU node they share NVLink; tp collectives run on every layer). Inside one data-parallel
group (the ranks with the same tp_rank) expert parallel takes consecutive blocks of `ep` ranks:

    ep_group         the ep ranks that hold different experts (all-to-all of tokens)
    expert_dp_group  the dp / ep ranks that hold the same experts (their grads are averaged)

`build_mesh` only checks sizes (it runs before any memory is touched and for `--dry-run`);
`init_process_groups` creates the groups once torch.distributed is up. Every rank creates every
group in the same order, as `new_group` requires, each with the configured
`parallel.timeout_minutes`: a subgroup does not inherit the default group's timeout, and without
it ZeRO's reductions and the expert all-to-alls would wait torch's default 10 minutes. No group
is created that is not needed: under NCCL with the device bound (pretrain/launch.py) each new
group is an `ncclCommSplit` in which every rank of the world takes part, so a group spanning
the world is the default group itself, a group with the ranks of one already made is that one
(the expert-dp group at ep 1, the ep group at ep = dp), and there are no ep groups at ep 1.
One-rank groups stay where DeepSpeed needs a group (its mpu's model-parallel group at tp 1,
ZeRO's dp group at dp 1, the expert-dp group at ep = dp); they are created by every rank like
the others (`use_local_synchronization` would leave the member alone in a world-wide split).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from mop.errors import ConfigError
from pretrain.config import TrainConfig, derived_sizes

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Mesh:
    """Where this process sits: world = tp x dp; expert parallel lives inside dp."""

    world_size: int
    rank: int
    dp: int
    tp: int
    ep: int
    # Process groups; None until `init_process_groups` (and in a world of one).
    tp_group: Any = field(default=None, compare=False, repr=False)
    dp_group: Any = field(default=None, compare=False, repr=False)
    ep_group: Any = field(default=None, compare=False, repr=False)
    expert_dp_group: Any = field(default=None, compare=False, repr=False)

    @property
    def dp_rank(self) -> int:
        return self.rank // self.tp

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def ep_rank(self) -> int:
        return self.dp_rank % self.ep

    @property
    def expert_dp(self) -> int:
        """Size of the expert-data-parallel group (replicas of one expert shard)."""
        return self.dp // self.ep

    @property
    def expert_dp_rank(self) -> int:
        return self.dp_rank // self.ep

    def tp_ranks(self) -> list[int]:
        return rank_groups(self.world_size, self.tp, self.ep)["tp"][self.dp_rank]

    def dp_ranks(self) -> list[int]:
        return rank_groups(self.world_size, self.tp, self.ep)["dp"][self.tp_rank]


def rank_groups(world_size: int, tp: int, ep: int) -> dict[str, list[list[int]]]:
    """Global ranks of every group of each kind (the same lists on every rank)."""
    dp = world_size // tp
    tp_groups = [[d * tp + t for t in range(tp)] for d in range(dp)]
    dp_groups = [[d * tp + t for d in range(dp)] for t in range(tp)]
    ep_groups, edp_groups = [], []
    for ranks in dp_groups:
        ep_groups += [ranks[a : a + ep] for a in range(0, dp, ep)]
        edp_groups += [ranks[e::ep] for e in range(ep)]
    return {"tp": tp_groups, "dp": dp_groups, "ep": ep_groups, "expert_dp": edp_groups}


def _divides(what: str, size: int, tp: int) -> None:
    if size % tp:
        raise ConfigError(f"parallel.tensor_parallel={tp} must divide {what}={size}")


def check_tensor_parallel_widths(cfg: TrainConfig, tp: int) -> None:
    """Every tp-sharded width must split evenly (Megatron shards heads, FFN width, vocab and,
    with sequence parallel, the sequence)."""
    if tp == 1:
        return
    m = cfg.model
    _divides("model.n_heads", m.num_heads, tp)
    _divides("model.n_kv_heads", m.kv_heads, tp)
    _divides("model.vocab_size", m.vocab_size, tp)
    _divides("data.seq_len (sequence parallel)", cfg.data.seq_len, tp)
    if m.ffn == "dense":
        _divides("model.ffn_hidden", m.ffn_dim, tp)
    if m.ffn == "soft_moe":
        # Its slots average over the whole sequence: a sequence-parallel slice cannot route alone.
        raise ConfigError("parallel.tensor_parallel>1 does not support ffn=soft_moe")


def build_mesh(cfg: TrainConfig, world_size: int, rank: int) -> Mesh:
    """Sizes only, checked with one-line ConfigErrors; no process group, no memory."""
    tp, ep = cfg.parallel.tensor_parallel, cfg.parallel.expert_parallel
    if world_size % tp:
        raise ConfigError(
            f"tensor_parallel={tp} must divide the world size {world_size} (tp x dp = world)"
        )
    dp = world_size // tp
    if dp % ep:
        raise ConfigError(f"expert_parallel={ep} must divide the data-parallel size {dp}")
    if ep > 1 and cfg.model.ffn != "moe":
        raise ConfigError(f"expert_parallel={ep} needs model.ffn=moe (got {cfg.model.ffn})")
    if cfg.model.ffn == "moe" and cfg.model.moe.num_experts % ep:
        raise ConfigError(
            f"expert_parallel={ep} must divide moe.num_experts={cfg.model.moe.num_experts}"
        )
    check_tensor_parallel_widths(cfg, tp)
    derived_sizes(cfg, world_size)  # global batch = micro x accum x dp
    return Mesh(world_size=world_size, rank=rank, dp=dp, tp=tp, ep=ep)


def init_process_groups(mesh: Mesh, timeout_minutes: float = 10.0) -> Mesh:
    """The mesh with its groups; call on every rank after torch.distributed is initialised.
    `timeout_minutes` is the config's parallel.timeout_minutes (that of the default group)."""
    if mesh.world_size == 1:
        return mesh
    from datetime import timedelta

    import torch.distributed as dist

    timeout = timedelta(minutes=timeout_minutes)
    made: dict[tuple[int, ...], Any] = {}

    def group_of(ranks: list[int]) -> Any:
        key = tuple(ranks)
        if key not in made:
            if len(ranks) == mesh.world_size:
                made[key] = dist.group.WORLD  # the default group: its timeout, no new split
            else:  # collective over the world: every rank creates every one, in one order
                made[key] = dist.new_group(ranks, timeout=timeout)
        return made[key]

    mine: dict[str, Any] = {}
    for kind, groups in rank_groups(mesh.world_size, mesh.tp, mesh.ep).items():
        if kind == "ep" and mesh.ep == 1:
            continue  # no expert parallel: nothing exchanges tokens
        for ranks in groups:
            g = group_of(ranks)
            if mesh.rank in ranks:
                mine[kind] = g
    return replace(
        mesh,
        tp_group=mine["tp"],
        dp_group=mine["dp"],
        ep_group=mine.get("ep"),
        expert_dp_group=mine["expert_dp"],
    )


def collective_device(group: Any = None) -> torch.device:
    """The device a tensor must sit on for a collective over `group` (None: the world).

    NCCL (what DeepSpeed initialises on GPUs) reduces only CUDA tensors on this process's
    current device; gloo (CPU runs, tests) only CPU ones. Host values (loss means, stop flags,
    validation sums) go there for the collective and come back with one copy after it."""
    import torch
    import torch.distributed as dist

    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
