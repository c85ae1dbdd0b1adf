"""Device mesh, logical axis names and the rules that map them to mesh axes.

One `Mesh` with axes ("data", "fsdp", "tensor") serves one CPU, a GPU or a pod. Every param
has logical axis names derived from its path (`embed`, `vocab`, `heads`, `kv_heads`, `mlp`,
`layers`, `lora_rank`); `RULES` maps them to mesh axes. A LoRA `A` shares its kernel's
input-axis sharding and `B` its output-axis sharding. Batches shard over ("data", "fsdp"),
and so does the sampler's KV cache, whose kv-heads dimension is split over "tensor".
A dimension that a mesh axis does not divide is replicated rather than refused, so tiny test
models run on any mesh.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxrlhf.models import quant

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

RULES: dict[str, Any] = {
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "layers": None,
    "lora_rank": None,
    "labels": None,
    # Expert parallelism: the experts of a MoE block are split over "fsdp" (an expert kernel's
    # own embed axis then stays whole, as a mesh axis shards one dimension only).
    "expert": "fsdp",
    "batch": BATCH_AXES,
    "cache_batch": BATCH_AXES,
    "cache_heads": "tensor",
}

# (input axis, output axis) of each projection kernel.
_PROJ_AXES = {
    "q_proj": ("embed", "heads"),
    "k_proj": ("embed", "kv_heads"),
    "v_proj": ("embed", "kv_heads"),
    "o_proj": ("heads", "embed"),
    "gate_proj": ("embed", "mlp"),
    "up_proj": ("embed", "mlp"),
    "down_proj": ("mlp", "embed"),
    "qkv_proj": ("embed", "heads"),
    "gate_up_proj": ("embed", "mlp"),
    "router": ("embed", None),
}

# Logical axes of the sampler's KV cache (`models.transformer.KVCache`): k and v are
# [layers, batch, kv_heads, slots, head_dim], `valid` is [batch, slots], `index` a scalar.
_CACHE_AXES = {
    "k": ("layers", "cache_batch", "cache_heads", None, None),
    "v": ("layers", "cache_batch", "cache_heads", None, None),
    "valid": ("cache_batch", None),
    "index": (),
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class MeshConfig:
    """Sizes of the mesh axes; -1 takes the remaining devices (at most one axis)."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1

    def __post_init__(self) -> None:
        sizes = (self.data, self.fsdp, self.tensor)
        if sum(s == -1 for s in sizes) > 1:
            raise ValueError(
                f"mesh: at most one axis may be -1, got data={self.data}, "
                f"fsdp={self.fsdp}, tensor={self.tensor}"
            )
        for name, s in zip(MESH_AXES, sizes, strict=True):
            if s == 0 or s < -1:
                raise ValueError(f"mesh.{name} must be >= 1 or -1, got {s}")

    def resolve(self, n_devices: int) -> tuple[int, int, int]:
        sizes = [self.data, self.fsdp, self.tensor]
        known = math.prod(s for s in sizes if s != -1)
        if -1 in sizes:
            if n_devices % known:
                raise ValueError(
                    f"mesh: {n_devices} devices are not divisible by the fixed "
                    f"axes (product {known})"
                )
            sizes[sizes.index(-1)] = n_devices // known
        if math.prod(sizes) > n_devices:
            raise ValueError(
                f"mesh data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} = "
                f"{math.prod(sizes)} devices, but only {n_devices} are available"
            )
        return tuple(sizes)  # type: ignore[return-value]


def make_mesh(cfg: MeshConfig | None = None, devices: list | None = None) -> Mesh:
    """A ("data", "fsdp", "tensor") mesh with Auto axis types (named shardings + GSPMD)."""
    cfg = cfg or MeshConfig()
    devices = devices if devices is not None else jax.devices()
    shape = cfg.resolve(len(devices))
    # A mesh smaller than the machine uses its first devices (e.g. data=1 on 8 devices).
    dev_array = np.asarray(devices[: math.prod(shape)]).reshape(shape)
    return Mesh(dev_array, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)


def single_device_mesh() -> Mesh:
    return make_mesh(MeshConfig(data=1), devices=jax.devices()[:1])


def _path_names(path) -> list[str]:
    names = []
    for entry in path:
        key = getattr(entry, "key", getattr(entry, "name", getattr(entry, "idx", None)))
        names.append(str(key))
    return names


def logical_axes_for(names: list[str], ndim: int) -> tuple[str | None, ...]:
    """Logical axis names of a param (or optimizer moment) from its path, e.g.
    [..., 'layers', 'q_proj', 'lora_A'] -> ('layers', 'embed', 'lora_rank')."""
    leaf = names[-1] if names else ""
    parent = names[-2] if len(names) > 1 else ""
    axes: tuple[str | None, ...]
    if leaf in quant.QUANT_FIELDS and parent in ("kernel", "embed"):
        # A stored array of a quantized weight (`models.quant`): its kernel's axes, in torch
        # layout (kernels are stored transposed, the embedding table is not).
        kernel_axes = logical_axes_for(names[:-1], ndim + quant.KERNEL_NDIM_OFFSET[leaf])
        axes = quant.leaf_axes(kernel_axes, leaf, transposed=parent == "kernel")
    elif leaf == "embed":
        axes = ("vocab", "embed")
    elif parent in _PROJ_AXES:
        i, o = _PROJ_AXES[parent]
        axes = {
            "kernel": ("layers", i, o),
            "kernel_t": ("layers", o, i),  # rollout weights (`transformer.kernels_out_in`)
            "bias": ("layers", o),
            "lora_A": ("layers", i, "lora_rank"),
            "lora_B": ("layers", "lora_rank", o),
        }.get(leaf, (None,) * ndim)
        if "experts" in names:  # [L, E, in, out] stacks: the expert axis after the layers
            axes = (axes[0], "expert", *axes[1:])
    elif parent in ("q_norm", "k_norm") and leaf == "scale":
        axes = ("layers", None) if ndim == 2 else (None,)
    elif leaf == "scale":
        axes = ("layers", "embed") if ndim == 2 else ("embed",)
    elif parent == "lm_head" and leaf == "kernel":
        axes = ("embed", "vocab")
    elif parent in ("score", "value") and leaf == "kernel":
        axes = ("embed", "labels")
    else:
        axes = (None,) * ndim
    if len(axes) == ndim + 1 and axes[0] == "layers":  # one block of `unstack_layers`
        axes = axes[1:]
    return axes if len(axes) == ndim else (None,) * ndim


def logical_to_spec(
    axes: tuple[str | None, ...], shape: tuple[int, ...], mesh: Mesh, rules: dict[str, Any] = RULES
) -> P:
    """PartitionSpec for a shape; a dim its mesh axes don't divide, or a mesh axis already
    used by an earlier dim, is replicated."""
    spec: list[Any] = []
    used: set[str] = set()
    for name, dim in zip(axes, shape, strict=True):
        mesh_axes = rules.get(name) if name else None
        if mesh_axes is None:
            spec.append(None)
            continue
        group = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
        group = tuple(a for a in group if mesh.shape[a] > 1 and a not in used)
        size = math.prod(mesh.shape[a] for a in group)
        if not group or dim % size:
            spec.append(None)
            continue
        used.update(group)
        spec.append(group[0] if len(group) == 1 else group)
    return P(*spec)


def tree_shardings(tree: Any, mesh: Mesh, rules: dict[str, Any] = RULES) -> Any:
    """A NamedSharding for every array leaf of a params / LoRA / optimizer-state tree."""

    def one(path, leaf):
        shape = tuple(getattr(leaf, "shape", ()))
        axes = logical_axes_for(_path_names(path), len(shape))
        return NamedSharding(mesh, logical_to_spec(axes, shape, mesh, rules))

    return jax.tree_util.tree_map_with_path(one, tree)


def batch_sharding(mesh: Mesh, ndim: int = 2, batch_axis: int = 0) -> NamedSharding:
    """Dim `batch_axis` over ("data", "fsdp"), the rest replicated."""
    spec = [None] * ndim
    spec[batch_axis] = BATCH_AXES
    return NamedSharding(mesh, P(*spec))


def kv_cache_sharding(cache: Any, mesh: Mesh, rules: dict[str, Any] = RULES) -> Any:
    """Shardings of a KV cache (a `KVCache` of arrays or `jax.ShapeDtypeStruct`s, same type
    back): rows over ("data", "fsdp") (`cache_batch`), kv heads over "tensor"
    (`cache_heads`); slots, head_dim and layers whole. As everywhere, a dimension its mesh
    axes do not divide (e.g. 4 kv heads on tensor=8) stays whole. Per-layer caches (`k`, `v`
    tuples of [B, KVH, S, hd], `transformer.split_cache_layers`) get the same per array."""

    def one(axes, x):
        if isinstance(x, tuple):
            return tuple(one(axes[1:], layer) for layer in x)
        return NamedSharding(mesh, logical_to_spec(axes, tuple(x.shape), mesh, rules))

    return cache._replace(
        **{name: one(axes, getattr(cache, name)) for name, axes in _CACHE_AXES.items()}
    )


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_shardings(batch: Any, mesh: Mesh, batch_axis: int = 0) -> Any:
    """Shardings for a dict of batch arrays: split on `batch_axis` (1 for [micro, B, ...]
    gradient-accumulation batches) when the batch axes divide it, else replicated."""
    n = mesh.shape["data"] * mesh.shape["fsdp"]

    def one(x):
        shape = np.shape(x)
        if len(shape) <= batch_axis or shape[batch_axis] % n:
            return replicated(mesh)
        return batch_sharding(mesh, len(shape), batch_axis)

    return jax.tree.map(one, batch)


def shard_batch(batch: Any, mesh: Mesh, batch_axis: int = 0) -> Any:
    """Put a host batch (numpy) on the mesh, split over the batch axes.

    Single process: a plain device_put. Several processes: each holds its own slice of the
    global batch (see data.process_slice) and the global array is assembled from them."""
    if jax.process_count() == 1:
        return jax.device_put(batch, batch_shardings(batch, mesh, batch_axis))

    def global_shape(x):
        shape = list(np.shape(x))
        if len(shape) > batch_axis:
            shape[batch_axis] *= jax.process_count()
        return np.empty(shape, np.asarray(x).dtype)

    shardings = batch_shardings(jax.tree.map(global_shape, batch), mesh, batch_axis)
    return jax.tree.map(
        lambda x, s: jax.make_array_from_process_local_data(s, np.asarray(x)), batch, shardings
    )


def put_tree(tree: Any, mesh: Mesh, rules: dict[str, Any] = RULES) -> Any:
    """Place a params/LoRA/optimizer tree on the mesh by its logical axes."""
    return jax.device_put(tree, tree_shardings(tree, mesh, rules))


def describe_mesh(mesh: Mesh) -> str:
    return ", ".join(f"{a}={mesh.shape[a]}" for a in MESH_AXES) + f" ({mesh.devices.size} devices)"


def per_device_bytes(tree: Any) -> int:
    """Bytes one device holds of a placed tree (the largest over devices)."""
    per_dev: dict[Any, int] = {}
    for leaf in jax.tree.leaves(tree):
        for shard in getattr(leaf, "addressable_shards", []):
            per_dev[shard.device] = per_dev.get(shard.device, 0) + shard.data.nbytes
    return max(per_dev.values(), default=0)


class ShardedStep:
    """`jax.jit` with explicit in/out shardings, where the shardings of batch arguments are
    derived from each batch (one compiled program per bucket shape, as jit would anyway).

    `arg_shardings[i]` is a sharding tree for argument i, or the string "batch" (split over
    the batch axes) / "micro_batch" ([micro, B, ...], split on axis 1) / "stacked_micro_batch"
    ([K adapters, micro, B, ...], split on axis 2)."""

    def __init__(
        self,
        fn,
        *,
        mesh: Mesh,
        arg_shardings: tuple,
        out_shardings: Any,
        donate_argnums: tuple[int, ...] = (),
    ):
        self._fn, self._mesh = fn, mesh
        self._args, self._out, self._donate = arg_shardings, out_shardings, donate_argnums
        self._compiled: dict = {}

    def _in_shardings(self, args: tuple) -> tuple:
        out = []
        for spec, arg in zip(self._args, args, strict=True):
            if spec == "batch":
                out.append(batch_shardings(arg, self._mesh, 0))
            elif spec == "micro_batch":
                out.append(batch_shardings(arg, self._mesh, 1))
            elif spec == "stacked_micro_batch":
                out.append(batch_shardings(arg, self._mesh, 2))
            else:
                out.append(spec)
        return tuple(out)

    def jitted(self, *args):
        key = tuple(
            jax.tree.map(lambda x: (np.shape(x), str(getattr(x, "dtype", type(x)))), a)
            if s in ("batch", "micro_batch", "stacked_micro_batch")
            else None
            for s, a in zip(self._args, args, strict=True)
        )
        key = str(key)
        if key not in self._compiled:
            self._compiled[key] = jax.jit(
                self._fn,
                in_shardings=self._in_shardings(args),
                out_shardings=self._out,
                donate_argnums=self._donate,
            )
        return self._compiled[key]

    def __call__(self, *args):
        return self.jitted(*args)(*args)

    @property
    def num_programs(self) -> int:
        return len(self._compiled)


def host_view(x: Any) -> np.ndarray:
    """A global array on every process's host (all-gathered when there are several)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def gather_to_host(tree: Any) -> Any:
    """A (possibly sharded) tree as host numpy. Call on every process: with several
    processes, params split across hosts are all-gathered first, since no single process
    can fetch arrays that span non-addressable devices."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return multihost_utils.process_allgather(tree, tiled=True)
    return jax.device_get(tree)
