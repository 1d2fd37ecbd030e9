"""Build the parallel model on the meta device and materialise only this rank's shards.

Building the plain model on the GPU and then slicing it (tensor and expert parallel) holds the
full fp32 model on every GPU for a moment: ~44 GB for the 11B-parameter E=64 configs. Here
the plain model is built on the meta device (no memory) while every ATen op of its
construction and initialisation is recorded; `parallelize` then swaps in the parallel layers,
still on meta; last, the recorded ops are replayed on the real device in the same order, one
parameter at a time: a random fill runs on a transient tensor of the parameter's full shape
(so the generator advances exactly as in the plain build) and only this rank's slice of it is
kept. Every weight is therefore bit for bit the slice of the plain model built on that device
from the same seed, the property the serial/parallel equivalence tests rely on, while the peak
is this rank's shards plus one full parameter.

What the replay supports on a parameter: creation by any op whose inputs are not parameters,
whole-tensor random fills (normal_, uniform_, ...), fill_/zero_, copy_ from a temporary,
element-wise in-place ops with scalar arguments (trunc_normal_'s erfinv_/mul_/add_/clamp_),
and views that take no part in the values. Anything else (an init that reads another weight, an
in-place op on part of a parameter) raises `MetaBuildUnsupported`, and the caller builds the
full model instead (saying so). Tensors a layer creates on the meta device itself (megablocks'
placeholder weights) stay meta and consume no random numbers, as in the plain build.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._device import DeviceContext, _device_constructors
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

RANDOM_FILLS = {
    "normal_", "uniform_", "bernoulli_", "exponential_", "geometric_", "log_normal_", "cauchy_",
    "random_",
}  # fmt: skip
META = torch.device("meta")


class MetaBuildUnsupported(RuntimeError):
    """The model's initialisation does something the replay cannot do shard by shard."""


def _key(t: Tensor) -> int:
    return t.untyped_storage()._cdata


@dataclass
class _Op:
    func: Any
    args: tuple
    kwargs: dict
    out: Any


@dataclass
class Recording:
    """The ATen ops of one build on the meta device, and which storages it created in place
    of real ones (those the plain build would have allocated on its device)."""

    ops: list[_Op] = field(default_factory=list)
    virtual: set[int] = field(default_factory=set)


class _Recorder(TorchDispatchMode):
    def __init__(self, rec: Recording) -> None:
        super().__init__()
        self.rec = rec

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.rec.ops.append(_Op(func, args, kwargs, out))  # keeps the meta tensors alive
        return out


class _VirtualDevice(DeviceContext):
    """torch.device('meta') that remembers which tensors it made meta: those a factory call
    without a device created (real tensors in the plain build), unlike tensors a layer asks
    for on the meta device itself."""

    def __init__(self, rec: Recording) -> None:
        super().__init__(META)
        self.rec = rec

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        implicit = func in _device_constructors() and kwargs.get("device") is None
        out = super().__torch_function__(func, types, args, kwargs)
        if implicit and isinstance(out, Tensor):
            self.rec.virtual.add(_key(out))
            if func in _FROM_DATA:  # builds its tensor without an ATen op the recorder sees
                host = func(*args, **{**kwargs, "device": "cpu"})
                self.rec.ops.append(_Op(_HostData(host), (), {}, out))
        return out


class _HostData:
    """A recorded op standing for torch.tensor(data) and the like: the same values, on the
    device the replay builds on."""

    is_view = False
    tags = ()

    def __init__(self, host: Tensor) -> None:
        self.host = host

    def __call__(self, device: torch.device) -> Tensor:
        return self.host.to(device)


_FROM_DATA = {torch.tensor, torch.as_tensor, torch.asarray}


def record_build(build: Callable[[], nn.Module]) -> tuple[nn.Module, Recording]:
    """`build()` on the meta device, with every op it ran."""
    rec = Recording()
    with _VirtualDevice(rec), _Recorder(rec):
        model = build()
    return model, rec


# Which slice of the plain parameter a shard is ---------------------------------------------------
Narrow = tuple[int, int, int]  # (dim, index, parts): chunk(parts, dim)[index]


def shard_of(model: nn.Module, mesh) -> dict[str, Narrow | None]:
    """For each parameter of the parallel model (by name), the chunk of the plain parameter it
    holds: tensor-parallel shards carry Megatron's `partition_dim` (this tp rank's chunk),
    expert shards DeepSpeed's `allreduce=False` (this ep rank's block of experts' rows)."""
    out: dict[str, Narrow | None] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        tp = getattr(p, "tensor_model_parallel", False)
        expert = getattr(p, "allreduce", True) is False
        if tp and expert:
            raise MetaBuildUnsupported(f"{name}: sharded by both tensor and expert parallel")
        if tp:
            if getattr(p, "partition_stride", 1) != 1:
                raise MetaBuildUnsupported(f"{name}: strided tensor-parallel partition")
            out[name] = (p.partition_dim, mesh.tp_rank, mesh.tp)
        elif expert:
            out[name] = (0, mesh.ep_rank, mesh.ep)
        else:
            out[name] = None
    return out


def _narrow(full: Tensor, spec: Narrow | None) -> Tensor:
    if spec is None:
        return full
    dim, index, parts = spec
    return full.chunk(parts, dim=dim)[index]


# Replay --------------------------------------------------------------------------------------
@dataclass
class _Param:
    name: str
    shape: torch.Size
    spec: Narrow | None
    keep: bool  # False: a plain parameter the parallel model dropped (its draws still happen)
    value: Tensor | None = None  # this rank's shard on the device


def _writes_in_place(func: Any) -> bool:
    schema = getattr(func, "_schema", None)
    if schema is None or not schema.arguments:
        return False
    alias = schema.arguments[0].alias_info
    return alias is not None and alias.is_write


def _whole(t: Tensor, p: _Param) -> bool:
    return t.shape == p.shape and t.storage_offset() == 0 and t.is_contiguous()


def _tensors(tree: Any) -> list[Tensor]:
    return [t for t in tree_flatten(tree)[0] if isinstance(t, Tensor)]


class _Replay:
    def __init__(
        self, rec: Recording, params: dict[int, _Param], keep: set[int], device: torch.device
    ):
        self.rec, self.params, self.device = rec, params, device
        self.real: dict[int, Tensor] = {}  # storage key -> a real tensor on that storage
        self.virtual = set(rec.virtual)
        # A temporary (or a weight the build replaced, e.g. the head before tying) is freed
        # after the last op that uses it, as in the plain build; `keep`: the buffers.
        last: dict[int, int] = {}
        for i, op in enumerate(rec.ops):
            for t in _tensors((op.args, op.kwargs, op.out)):
                last[_key(t)] = i
        self.drop_after: dict[int, list[int]] = {}
        for key, i in last.items():
            if key not in keep:
                self.drop_after.setdefault(i, []).append(key)

    def to_real(self, t: Any) -> Any:
        if not isinstance(t, Tensor):
            return self.device if isinstance(t, torch.device) and t == META else t
        if not t.is_meta:
            return t  # a real tensor in the build (torch.tensor's host data) is real here too
        base = self.real.get(_key(t))
        if base is None:
            raise MetaBuildUnsupported(f"a meta tensor of the build is used on {self.device}")
        return base.as_strided(t.shape, t.stride(), t.storage_offset())

    def run(self) -> None:
        for i, op in enumerate(self.rec.ops):
            ins, outs = _tensors((op.args, op.kwargs)), _tensors(op.out)
            if any(_key(t) in self.virtual for t in ins + outs):
                self.virtual.update(_key(t) for t in outs)
                if any(_key(t) in self.params for t in ins + outs):
                    self.param_op(op, ins, outs)
                else:
                    self.execute(op, outs)
            # (else: meta in the plain build too: no memory, no random numbers)
            for key in self.drop_after.get(i, ()):
                self.real.pop(key, None)

    def execute(self, op: _Op, outs: list[Tensor]) -> None:
        """An op on temporaries or buffers, as the plain build ran it (on the device)."""
        for meta, real in zip(outs, _tensors(self.call(op))):
            self.real.setdefault(_key(meta), real)

    def call(self, op: _Op) -> Any:
        if isinstance(op.func, _HostData):
            return op.func(self.device)
        args, kwargs = tree_map(self.to_real, (op.args, op.kwargs))
        return op.func(*args, **kwargs)

    def param_op(self, op: _Op, ins: list[Tensor], outs: list[Tensor]) -> None:
        if op.func.is_view:
            return  # an alias of a parameter (nn.Parameter's detach): no values of its own
        if _writes_in_place(op.func):
            self.write(op, ins)
            return
        if any(_key(t) in self.params for t in ins):
            raise MetaBuildUnsupported(f"{op.func} reads parameter values during the build")
        # the op that creates a parameter's storage (torch.empty, torch.ones, randn, ...): full
        # size on the device, as in the plain build, then this rank's slice of it
        (created,) = [t for t in outs if _key(t) in self.params]
        self.keep(self.params[_key(created)], self.call(op))

    def write(self, op: _Op, ins: list[Tensor]) -> None:
        """An in-place op on a parameter."""
        name = op.func.overloadpacket.__name__
        target = op.args[0]
        p = self.params.get(_key(target))
        if p is None or not _whole(target, p):
            raise MetaBuildUnsupported(f"{op.func} on part of a parameter")
        others = [t for t in ins if t is not target]
        if name in RANDOM_FILLS and not others:
            p.value = None  # overwritten: free the old slice before drawing the new whole
            full = torch.empty(p.shape, dtype=target.dtype, device=self.device)
            op.func(full, *op.args[1:], **op.kwargs)  # draws exactly what the plain build draws
            self.keep(p, full)
        elif name == "copy_" and len(others) == 1 and _key(others[0]) not in self.params:
            self.keep(p, self.to_real(others[0]).expand(p.shape))
        elif name in ("fill_", "zero_") or (torch.Tag.pointwise in op.func.tags and not others):
            if p.keep:  # element-wise: the same on the slice as on the whole
                op.func(self.value_of(p), *op.args[1:], **op.kwargs)
        else:
            raise MetaBuildUnsupported(f"{op.func} on parameter {p.name}")

    @staticmethod
    def keep(p: _Param, full: Tensor) -> None:
        if p.keep:
            p.value = full.contiguous() if p.spec is None else _narrow(full, p.spec).clone()

    @staticmethod
    def value_of(p: _Param) -> Tensor:
        if p.value is None:
            raise MetaBuildUnsupported(f"{p.name} is written before it is created")
        return p.value


def plain_layout(model: nn.Module) -> dict[str, tuple[int, torch.Size]]:
    """The plain (meta-built) model's parameter names -> (storage, shape); take it before
    `parallelize` replaces layers. (Tied weights: two names, one storage.)"""
    return {n: (_key(t), t.shape) for n, t in model.named_parameters(remove_duplicate=False)}


def materialize(
    model: nn.Module,
    rec: Recording,
    plain: dict[str, tuple[int, torch.Size]],
    mesh,
    device: torch.device,
) -> None:
    """Give the meta-built parallel `model` this rank's real weights and buffers on `device`,
    in place (Parameters are replaced, keeping their attributes: call before registering
    gradient hooks). `plain`: `plain_layout` of the plain model."""
    specs = shard_of(model, mesh)
    finals = dict(model.named_parameters(remove_duplicate=False))
    params = {key: _Param(name, shape, None, keep=False) for name, (key, shape) in plain.items()}
    for name, p in finals.items():
        if name not in plain:
            raise MetaBuildUnsupported(f"{name} is not a parameter of the plain model")
        key, shape = plain[name]
        spec = specs[name]
        known = params[key]
        if known.keep and known.spec != spec:
            raise MetaBuildUnsupported(f"{name}: one plain weight, two different shards")
        params[key] = _Param(name, shape, spec, keep=True)
        expected = _narrow(torch.empty(shape, device=META), spec).shape
        if tuple(p.shape) != tuple(expected):
            raise MetaBuildUnsupported(f"{name}: shard {tuple(p.shape)}, expected {expected}")
    buffers = {_key(b) for b in model.buffers()}
    replay = _Replay(rec, params, buffers, device)
    with torch.no_grad():
        replay.run()
    names = {id(p): n for n, p in finals.items()}
    new: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for pname, p in list(module._parameters.items()):
            if p is None or not p.is_meta:
                continue
            if id(p) not in new:
                value = replay.value_of(params[plain[names[id(p)]][0]])
                new[id(p)] = nn.Parameter(value, requires_grad=p.requires_grad)
                new[id(p)].__dict__.update(p.__dict__)  # tp / expert attributes
            module._parameters[pname] = new[id(p)]
        for bname, b in list(module._buffers.items()):
            if b is not None and b.is_meta and _key(b) in replay.real:
                module._buffers[bname] = replay.to_real(b).clone()
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise MetaBuildUnsupported(f"still on the meta device after the replay: {left[:3]}")


# The entry point ---------------------------------------------------------------------------------
def build_parallel_model(cfg, mesh, device: torch.device) -> nn.Module:
    """`parallelize(build_model(cfg.model), cfg, mesh)` on `device`, holding only this rank's
    shards under tensor or expert parallel (built on meta, then materialised). Call after
    seeding: the weights are those of the plain model built on `device` from the generator's
    current state, sliced. Without tp or ep every rank holds the whole model anyway: built
    directly, as before."""
    from pretrain.model.transformer import build_model
    from pretrain.parallel import parallelize

    def full_build() -> nn.Module:
        with torch.device(device):
            return parallelize(build_model(cfg.model), cfg, mesh)

    if mesh.tp == 1 and mesh.ep == 1:
        return full_build()
    state = _rng_state(device)
    model, rec = record_build(lambda: build_model(cfg.model))
    plain = plain_layout(model)
    try:
        return parallelize(model, cfg, mesh, lambda m: materialize(m, rec, plain, mesh, device))
    except MetaBuildUnsupported as exc:
        if mesh.rank == 0:
            print(f"[train] building the full model on every GPU, then slicing it: {exc}")
        _set_rng_state(device, state)  # the replay drew some numbers: start from the seed again
        return full_build()


def _rng_state(device: torch.device) -> Tensor:
    if device.type == "cuda":
        return torch.cuda.get_rng_state(device)
    return torch.random.get_rng_state()


def _set_rng_state(device: torch.device, state: Tensor) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.random.set_rng_state(state)
