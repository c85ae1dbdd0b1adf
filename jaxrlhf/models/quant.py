"""A quantized frozen base (QLoRA-style): weights stored as packed integers + block scales,
dequantized block-wise inside the compiled step, where the decoder reads them.

A quantized weight is a `QuantizedArray`, a small pytree that takes the place of a
`"kernel"` (or the `"embed"` table) in the params tree:

    params = quantize_params(params, QuantConfig(kind="nf4"))
    logits = forward(params, ids, mask, cfg=cfg, lora=lora, lora_scale=s)   # unchanged

Every stored weight is in torch layout `[..., rows, cols]` (rows = output features; an
embedding's rows are tokens) and is cut into blocks of `cols`; `transposed` says the
logical array is its transpose (our kernels are `[in, out]`). Per row `r` and block `b`
with values `q[r, b, j]`:

    int8  (per output channel, symmetric):  w = s[r] · q,             q ∈ [-127, 127]
    nf4   (QLoRA NormalFloat4, block 64):   w = absmax[r, b] · NF4[q], q ∈ [0, 15]
    q8_0  (GGUF, block 32):                 w = d[r, b] · q,           q ∈ [-128, 127]
    q4_0  (GGUF, block 32):                 w = d[r, b] · (q − 8),     q ∈ [0, 15]
    q4_1  (GGUF, block 32):                 w = d[r, b] · q + m[r, b], q ∈ [0, 15]

NF4 may quantize its absmax too ("double quantization", as bitsandbytes): per leading
index (a layer), `absmax − offset` is flattened, cut into blocks of 256 and stored as 8-bit
codes of bitsandbytes' signed dynamic map times a float32 scale per block.
Four-bit values are packed two to a byte, as GGUF does: byte j of a block holds value j in
its low nibble and value j + block/2 in its high nibble. The GGUF kinds keep the file's
own bytes (the f16 scales split off into their own array), so no dequantized copy is made
at load time.

The decoder's `linear`, the embedding lookup and the LM head are the only readers of a
frozen weight (`models.transformer.read_kernel`, `embed_rows`, `lm_kernel`): the dense
weight exists only inside the step, one layer at a time under `lax.scan`, and never
reaches an optimizer: integer codes have no gradient and the float scales pass through
`stop_gradient`, so LoRA gradients reach the activations through the dequantized weight
and stop there.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from jaxrlhf.models import dots

Params = dict[str, Any]
QuantKind = Literal["none", "int8", "nf4", "gguf"]
KINDS = ("none", "int8", "nf4", "gguf")
GGUF_KINDS = ("q4_0", "q4_1", "q8_0")
GGUF_BLOCK = 32
DOUBLE_QUANT_BLOCK = 256
# Modules whose weight `quantize_params` may quantize (the rest — norms, biases, the
# `score`/`value` heads — always stay in floating point).
QUANTIZABLE = (
    "embed",
    "lm_head",
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
)

# QLoRA's NormalFloat4 (Dettmers et al. 2023, bitsandbytes `create_normal_map`): quantiles
# of N(0, 1) normalised to [-1, 1], 8 positive and 7 negative values plus an exact zero.
NF4_CODEBOOK = np.array(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    np.float32,
)


@functools.cache
def dynamic_map() -> np.ndarray:
    """bitsandbytes' signed 8-bit dynamic map (`create_dynamic_map(signed=True)`): 256 sorted
    values in [-1, 1], dense near zero; the code book of the double-quantized absmax."""
    data: list[float] = []
    max_exponent_bits, non_sign_bits = 7, 7
    additional = 2 ** (non_sign_bits - max_exponent_bits) - 1  # 0 for these settings
    for i in range(max_exponent_bits):
        n = int(2 ** (i + non_sign_bits - max_exponent_bits) + 1)
        bounds = np.linspace(0.1, 1, n, dtype=np.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        data += (10 ** (-(max_exponent_bits - 1) + i) * means).tolist()
        data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    assert additional == 0
    data += [0.0, 1.0]
    data += [0.0] * (256 - len(data))
    return np.sort(np.asarray(data, np.float32))


# ----------------------------------------------------------------------------- the pytree


@dataclasses.dataclass(frozen=True)
class QuantizedArray:
    """A quantized weight: `codes [..., R, C]` (int8) or `[..., R, C/2]` (two 4-bit values a
    byte), a row's blocks side by side; block scales `scales [..., R, nb]` (float32,
    float16, or uint8 codes when double-quantized), GGUF Q4_1's block minima `mins`, and
    NF4's double-quantization `scale_scales [..., nblocks]` and `scale_offset [...]`. `kind`
    and `transposed` are static (part of the tree structure). The logical shape is
    `[..., R, C]`, or `[..., C, R]` when `transposed`.

    Rows are kept flat (not `[R, nb, block]`) because XLA:CPU fuses the dequantize into a
    one-token matrix-vector product only when the codes are indexed as the weight is: a
    blocked array reshaped inside that fusion costs 5-7x (see `vector_product`)."""

    codes: Any
    scales: Any
    mins: Any = None
    scale_scales: Any = None
    scale_offset: Any = None
    kind: str = "int8"
    transposed: bool = True

    @property
    def packed(self) -> bool:
        """Two 4-bit values per byte (NF4, Q4_0, Q4_1)."""
        return self.kind in ("nf4", "q4_0", "q4_1")

    @property
    def block_size(self) -> int:
        return self.stored_shape[-1] // self.scales.shape[-1]

    @property
    def stored_shape(self) -> tuple[int, ...]:
        *lead, cols = self.codes.shape
        return (*lead, cols * (2 if self.packed else 1))

    @property
    def shape(self) -> tuple[int, ...]:
        s = self.stored_shape
        return (*s[:-2], s[-1], s[-2]) if self.transposed else s

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    @property
    def dtype(self):
        return jnp.dtype(jnp.float32)  # the logical (dequantized) dtype

    @property
    def nbytes(self) -> int:
        return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in self.arrays().values())

    def arrays(self) -> dict[str, Any]:
        """The stored arrays by field name (fields that are None left out)."""
        return {f: getattr(self, f) for f in _DATA_FIELDS if getattr(self, f) is not None}

    def map_arrays(self, fn: Callable[[str, Any], Any]) -> QuantizedArray:
        """The same structure with `fn(field, array)` in place of every stored array."""
        return dataclasses.replace(self, **{f: fn(f, a) for f, a in self.arrays().items()})

    def __array__(self, dtype=None, copy=None):
        """numpy sees the dequantized logical array (so a merged export writes floats)."""
        return np.asarray(jax.device_get(dequantize(self)), dtype=dtype)


_DATA_FIELDS = ("codes", "scales", "mins", "scale_scales", "scale_offset")
QUANT_FIELDS = _DATA_FIELDS
# ndim of the logical weight minus ndim of each stored array ([..., R, bytes] codes,
# [..., R, nb] scales, [..., groups] double-quant scales, [...] offsets).
KERNEL_NDIM_OFFSET = {"codes": 0, "scales": 0, "mins": 0, "scale_scales": 1, "scale_offset": 2}
jax.tree_util.register_dataclass(
    QuantizedArray, data_fields=list(_DATA_FIELDS), meta_fields=["kind", "transposed"]
)


def is_quantized(x: Any) -> bool:
    return isinstance(x, QuantizedArray)


def stack(arrays: list[Any]) -> Any:
    """`np.stack` of dense arrays, or of `QuantizedArray`s array by array (one per layer)."""
    if arrays and is_quantized(arrays[0]):
        return jax.tree.map(lambda *xs: np.stack(xs), *arrays)
    return np.stack(arrays)


# ----------------------------------------------------------------------------- configuration


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantConfig:
    """How the frozen base is stored.

    kind: `none` (floats), `int8` (per-output-channel symmetric), `nf4` (QLoRA NormalFloat4
    with per-block absmax), `gguf` (keep a GGUF file's own Q4_0 / Q4_1 / Q8_0 blocks; only
    when loading a .gguf). `block_size`: NF4's block (QLoRA: 64). `double_quant`: NF4's
    absmax as 8-bit codes in blocks of 256 plus a float32 offset. `skip`: modules left in
    float (`embed`, `lm_head`, or projection names); norms, biases and the `score` /
    `value` heads are never quantized.
    """

    kind: QuantKind = "none"
    block_size: int = 64
    double_quant: bool = True
    skip: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.skip, list | str):
            skip = (self.skip,) if isinstance(self.skip, str) else tuple(self.skip)
            object.__setattr__(self, "skip", skip)
        if self.kind not in KINDS:
            raise ValueError(
                f"model.quant.kind={self.kind!r} is not supported; choose from {', '.join(KINDS)}"
            )
        if not isinstance(self.block_size, int) or self.block_size < 2 or self.block_size % 2:
            raise ValueError(
                f"model.quant.block_size must be an even integer >= 2 (QLoRA uses 64), "
                f"got {self.block_size!r}"
            )
        unknown = [s for s in self.skip if s not in QUANTIZABLE]
        if unknown:
            raise ValueError(
                f"model.quant.skip: {unknown} are not quantizable modules; choose from "
                f"{', '.join(QUANTIZABLE)} (norms, biases and score/value heads stay float)"
            )


# ----------------------------------------------------------------------------- dequantize


def _unpack_nibbles(codes: jax.Array) -> jax.Array:
    """[..., n/2] uint8 -> [..., n] uint8: low nibbles first, then high (the GGUF order)."""
    return jnp.concatenate([codes & 0x0F, codes >> 4], axis=-1)


def _code_values(kind: str, codes: jax.Array) -> jax.Array:
    """Unscaled float32 values of 8-bit codes, or of 4-bit codes already unpacked."""
    if kind in ("int8", "q8_0", "q4_1"):
        return codes.astype(jnp.float32)
    if kind == "nf4":
        return jnp.asarray(NF4_CODEBOOK)[codes.astype(jnp.int32)]
    if kind == "q4_0":
        return (codes.astype(jnp.int8) - jnp.int8(8)).astype(jnp.float32)
    raise ValueError(f"QuantizedArray.kind={kind!r} is unknown")


def block_values(qa: QuantizedArray) -> jax.Array:
    """The per-block values before scaling, float32 `[..., R, nb, block]`."""
    *lead, rows, _ = qa.codes.shape
    codes = qa.codes.reshape(*lead, rows, qa.scales.shape[-1], -1)
    return _code_values(qa.kind, _unpack_nibbles(codes) if qa.packed else codes)


def block_scales(qa: QuantizedArray) -> jax.Array:
    """The per-block scales, float32 `[..., R, nb]` (NF4's absmax decoded if double-quantized:
    `dynamic_map[code] · scale_scales[block] + offset`)."""
    if qa.scale_scales is None:
        return qa.scales.astype(jnp.float32)
    *lead, rows, n_blocks = qa.scales.shape
    n = rows * n_blocks
    n_groups = qa.scale_scales.shape[-1]
    flat = qa.scales.reshape(*lead, n)
    flat = jnp.pad(flat, [(0, 0)] * len(lead) + [(0, n_groups * DOUBLE_QUANT_BLOCK - n)])
    grouped = jnp.asarray(dynamic_map())[flat.astype(jnp.int32)].reshape(
        *lead, n_groups, DOUBLE_QUANT_BLOCK
    )
    decoded = grouped * qa.scale_scales.astype(jnp.float32)[..., None]
    decoded = decoded.reshape(*lead, n_groups * DOUBLE_QUANT_BLOCK)[..., :n]
    decoded = decoded + qa.scale_offset.astype(jnp.float32)[..., None]
    return decoded.reshape(*lead, rows, n_blocks)


def _dequantize_stored(qa: QuantizedArray, scales: jax.Array) -> jax.Array:
    w = block_values(qa) * scales[..., None]
    if qa.mins is not None:
        w = w + qa.mins.astype(jnp.float32)[..., None]
    return w.reshape(*w.shape[:-2], -1)


def _decoded_scales(qa: QuantizedArray) -> jax.Array:
    """`block_scales`, a double-quantized absmax decoded once: fused into the weight's loop,
    XLA:CPU recomputes its 256-entry lookup for every weight (2.4 -> 1.4 ms, 576x1536)."""
    scales = block_scales(qa)
    return scales if qa.scale_scales is None else jax.lax.optimization_barrier(scales)


def dequantize(qa: QuantizedArray, dtype=jnp.float32) -> jax.Array:
    """The logical dense array (`[..., C, R]` if transposed), in `dtype`. Nothing upstream
    of it is differentiated: codes are integers and the scales are `stop_gradient`ed."""
    qa = jax.lax.stop_gradient(qa)
    scales = _decoded_scales(qa)
    w = _dequantize_stored(qa, scales)
    if qa.transposed:
        w = jnp.swapaxes(w, -1, -2)
    return w.astype(dtype)


def vector_product(x: jax.Array, qa: QuantizedArray) -> jax.Array:
    """`x · Wᵀ` for one vector `x [..., C]` (a single token) and the stored `W [R, C]`
    (a kernel's `[out, in]`, an embedding table's `[V, D]`): `[..., R]` in float32.

    The same values as a dot with `dequantize`, arranged so that XLA:CPU fuses the
    dequantize into the matrix-vector product and reads only the packed bytes: scales
    repeated to the codes' flat row, and for 4-bit codes one product per nibble, against
    `x`'s low- and high-half values of every block gathered (and materialised: an
    `optimization_barrier`) beforehand. Measured on a [576, 1536] kernel at one token:
    0.1-0.15 ms against 0.2 ms for float32 and 0.8-1.6 ms for the materialised dequantize
    (docs/quantization.md)."""
    qa = jax.lax.stop_gradient(qa)
    n_blocks = qa.scales.shape[-1]
    block = qa.block_size
    scales = _decoded_scales(qa)
    mins = None if qa.mins is None else qa.mins.astype(jnp.float32)
    v = x.astype(jnp.float32).reshape(1, -1)
    width = block // 2 if qa.packed else block

    def weight(codes: jax.Array) -> jax.Array:  # [R, cols] float32, fused into its product
        w = _code_values(qa.kind, codes) * jnp.repeat(scales, width, axis=-1)
        return w if mins is None else w + jnp.repeat(mins, width, axis=-1)

    if not qa.packed:
        y = v @ weight(qa.codes).T
    else:
        halves = v.reshape(n_blocks, 2, width)
        ordered = jax.lax.optimization_barrier(
            jnp.concatenate([halves[:, 0].reshape(-1), halves[:, 1].reshape(-1)])
        )
        low, high = ordered[None, : n_blocks * width], ordered[None, n_blocks * width :]
        y_low = low @ weight(qa.codes & 0x0F).T
        y_low, high = jax.lax.optimization_barrier((y_low, high))  # two fusions, not one
        y = y_low + high @ weight(qa.codes >> 4).T
    return y.reshape(*x.shape[:-1], -1)


def is_one_vector(x: jax.Array) -> bool:
    """A single token's activations (`[..., C]` with every leading dim 1)."""
    return int(np.prod(x.shape[:-1])) == 1


def tied(w: Any, x: jax.Array) -> tuple[Any, jax.Array]:
    """`(w, x)` through one `optimization_barrier`: the weight's dequantize then depends on
    this call's activations. In a decode loop the packed weight is loop-invariant, and XLA
    would hoist its dequantize out of the loop — a dense float32 copy of the base held for
    the whole rollout (measured: 211 weight-sized buffers on SmolLM2-135M, +510 MiB)."""
    w, x = jax.lax.optimization_barrier((w, x))
    # XLA:CPU drops the barrier before it schedules, and then computes every layer's
    # dequantize of a prefill first (all alive at once: a dense copy). A data dependency it
    # cannot fold keeps each one after its own input: `0·x₀ > 1` is false for every value
    # (0 or NaN > 1), so the scales gain an exact 0.
    never = (x.reshape(-1)[0] * 0 > 1).astype(w.scales.dtype)
    return dataclasses.replace(w, scales=w.scales + never), x


def matmul(x: jax.Array, w: Any) -> jax.Array:
    """`x · w` for a kernel `w` of logical shape `[in, out]`, dense or quantized, in
    `x.dtype`: one token on a quantized 2-D kernel takes `vector_product` (no dense weight
    in memory), everything else a dot with the dequantized weight (materialised per call,
    never hoisted out of a loop: `tied`)."""
    if not is_quantized(w):
        return dots.matmul(x, w.astype(x.dtype))
    w, x = tied(w, x)
    if w.transposed and w.codes.ndim == 2 and is_one_vector(x):
        return vector_product(x, w).astype(x.dtype)
    return dots.matmul(x, dense(w, x.dtype))


def dense(w: Any, dtype=None) -> jax.Array:
    """A weight as a dense array: dequantized if quantized, else cast (`dtype=None`: as is)."""
    if is_quantized(w):
        return dequantize(w, jnp.float32 if dtype is None else dtype)
    return w if dtype is None else w.astype(dtype)


def take_rows(w: Any, ids: jax.Array, dtype) -> jax.Array:
    """Rows `w[ids]` of an embedding table (`[V, D]`, not transposed), dequantizing only the
    gathered rows: `[*ids.shape, D]`."""
    if not is_quantized(w):
        return w.astype(dtype)[ids]
    if w.transposed:
        raise ValueError("take_rows needs an untransposed (row-major) quantized table")
    qa = jax.lax.stop_gradient(w)
    scales = block_scales(qa)[ids]
    rows = dataclasses.replace(
        qa,
        codes=qa.codes[ids],
        scales=scales,
        mins=None if qa.mins is None else qa.mins[ids],
        scale_scales=None,
        scale_offset=None,
    )
    return _dequantize_stored(rows, scales).astype(dtype)


def dequantize_params(params: Any, dtype=jnp.float32) -> Any:
    """The tree with every `QuantizedArray` replaced by its dense value (other leaves kept):
    a float base for a merged export, or the reference of the exactness tests."""
    return jax.tree.map(
        lambda x: dequantize(x, dtype) if is_quantized(x) else x, params, is_leaf=is_quantized
    )


# ----------------------------------------------------------------------------- quantize (host)


def _nearest(values: np.ndarray, book: np.ndarray) -> np.ndarray:
    """Index of the nearest entry of the sorted code book (ties to the lower entry)."""
    mids = (book[1:] + book[:-1]) / 2
    return np.searchsorted(mids, values, side="left").astype(np.uint8)


def _stored(w: Any, transposed: bool) -> np.ndarray:
    w = np.asarray(w, np.float32)
    return np.swapaxes(w, -1, -2) if transposed else w


def _pack_nibbles(q: np.ndarray) -> np.ndarray:
    half = q.shape[-1] // 2
    return (q[..., :half] | (q[..., half:] << 4)).astype(np.uint8)


def quantize_int8(w: Any, *, transposed: bool = True) -> QuantizedArray:
    """Per-output-channel symmetric int8: `s[r] = max|w[r]| / 127`, `q = round(w / s)`."""
    x = _stored(w, transposed)
    scale = np.max(np.abs(x), axis=-1) / 127.0
    inv = np.where(scale == 0, 0.0, 1.0 / np.where(scale == 0, 1.0, scale))
    q = np.clip(np.rint(x * inv[..., None]), -127, 127).astype(np.int8)
    return QuantizedArray(
        codes=q,
        scales=scale.astype(np.float32)[..., None],
        kind="int8",
        transposed=transposed,
    )


def _double_quantize(absmax: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """bitsandbytes' nested absmax: per leading index, `a − mean(a)` in blocks of 256, each
    block as dynamic-map codes of its values over their absmax."""
    *lead, rows, n_blocks = absmax.shape
    n = rows * n_blocks
    offset = absmax.reshape(*lead, n).mean(axis=-1).astype(np.float32)
    centred = absmax.reshape(*lead, n) - offset[..., None]
    n_groups = -(-n // DOUBLE_QUANT_BLOCK)
    pad = [(0, 0)] * len(lead) + [(0, n_groups * DOUBLE_QUANT_BLOCK - n)]
    grouped = np.pad(centred, pad).reshape(*lead, n_groups, DOUBLE_QUANT_BLOCK)
    group_scale = np.max(np.abs(grouped), axis=-1).astype(np.float32)
    safe = np.where(group_scale == 0, 1.0, group_scale)
    codes = _nearest(grouped / safe[..., None], dynamic_map())
    codes = codes.reshape(*lead, n_groups * DOUBLE_QUANT_BLOCK)[..., :n]
    return codes.reshape(*lead, rows, n_blocks), group_scale, offset


def quantize_nf4(
    w: Any, *, block_size: int = 64, double_quant: bool = True, transposed: bool = True
) -> QuantizedArray:
    """NF4: per block of `block_size` along a row, `absmax = max|w|`, `q = nearest NF4 entry
    of w / absmax`; optionally the absmax double-quantized (see `_double_quantize`)."""
    x = _stored(w, transposed)
    *lead, rows, cols = x.shape
    if cols % block_size:
        raise ValueError(f"nf4: a row of {cols} values does not split into blocks of {block_size}")
    blocks = x.reshape(*lead, rows, cols // block_size, block_size)
    absmax = np.max(np.abs(blocks), axis=-1).astype(np.float32)
    safe = np.where(absmax == 0, 1.0, absmax)
    q = _pack_nibbles(_nearest(blocks / safe[..., None], NF4_CODEBOOK)).reshape(*lead, rows, -1)
    if not double_quant:
        return QuantizedArray(codes=q, scales=absmax, kind="nf4", transposed=transposed)
    codes, group_scale, offset = _double_quantize(absmax)
    return QuantizedArray(
        codes=q,
        scales=codes,
        scale_scales=group_scale,
        scale_offset=offset,
        kind="nf4",
        transposed=transposed,
    )


def check_gguf_type(type_name: str, name: str = "tensor") -> str:
    """The kind of a GGUF type that is kept quantized; any other type is refused by name."""
    kind = type_name.lower()
    if kind not in GGUF_KINDS:
        raise ValueError(
            f"GGUF tensor {name!r} has type {type_name}, which jaxrlhf cannot keep quantized "
            f"(supported: {', '.join(k.upper() for k in GGUF_KINDS)}); load it with "
            f"keep_quantized=False to dequantize it"
        )
    return kind


def gguf_blocks(
    raw: np.ndarray, type_name: str, shape: tuple[int, ...], *, name: str = "tensor"
) -> QuantizedArray:
    """A `QuantizedArray` over GGUF block bytes `raw` (uint8, rows of whole blocks) of a
    tensor of torch-layout `shape` `[..., R, C]`, for `Q4_0`, `Q4_1` or `Q8_0`. The bytes
    are split into the f16 scale(s) and the values, not dequantized."""
    kind = check_gguf_type(type_name, name)
    *lead, rows, cols = shape
    if cols % GGUF_BLOCK:
        raise ValueError(f"GGUF tensor {name!r}: rows of {cols} values are not whole blocks")
    head = 4 if kind == "q4_1" else 2
    nbytes = head + (GGUF_BLOCK if kind == "q8_0" else GGUF_BLOCK // 2)
    n_blocks = cols // GGUF_BLOCK
    raw = np.asarray(raw, np.uint8)
    if raw.size != int(np.prod(shape[:-1])) * n_blocks * nbytes:
        raise ValueError(
            f"GGUF tensor {name!r} ({type_name}): {raw.size} bytes do not hold {shape} values"
        )
    blocks = raw.reshape(*lead, rows, n_blocks, nbytes)

    def f16(start: int) -> np.ndarray:
        return np.ascontiguousarray(blocks[..., start : start + 2]).view(np.float16)[..., 0]

    codes = np.ascontiguousarray(blocks[..., head:]).reshape(*lead, rows, -1)
    return QuantizedArray(
        codes=codes.view(np.int8) if kind == "q8_0" else codes,
        scales=f16(0),
        mins=f16(2) if kind == "q4_1" else None,
        kind=kind,
        transposed=False,
    )


def quantize_gguf(w: Any, type_name: str, *, transposed: bool = True) -> QuantizedArray:
    """GGUF Q4_0 / Q4_1 / Q8_0 blocks made by `gguf.quants.quantize` (for tests and for a
    float base stored the llama.cpp way)."""
    import gguf

    check_gguf_type(type_name)
    x = _stored(w, transposed)
    qtype = gguf.GGMLQuantizationType[type_name.upper()]
    raw = gguf.quants.quantize(x, qtype)
    return dataclasses.replace(gguf_blocks(raw, type_name, x.shape), transposed=transposed)


def quantize_array(w: Any, cfg: QuantConfig, *, transposed: bool = True) -> QuantizedArray:
    if cfg.kind == "int8":
        return quantize_int8(w, transposed=transposed)
    if cfg.kind == "nf4":
        return quantize_nf4(
            w, block_size=cfg.block_size, double_quant=cfg.double_quant, transposed=transposed
        )
    raise ValueError(
        f"model.quant.kind={cfg.kind!r} does not quantize a float base; 'gguf' keeps a GGUF "
        f"file's own blocks (load_quantized / load_gguf(keep_quantized=True))"
    )


def _quantize_named(
    w: Any,
    cfg: QuantConfig,
    transposed: bool,
    name: str,
    quantizer: Callable[..., QuantizedArray] | None = None,
) -> Any:
    """One weight quantized (kept if it already is), a failure naming it and the option."""
    if is_quantized(w):
        return w
    try:
        if quantizer is not None:
            return quantizer(w, transposed=transposed)
        return quantize_array(w, cfg, transposed=transposed)
    except ValueError as e:
        raise ValueError(
            f"cannot quantize {name} (shape {tuple(np.shape(w))}): {e}; change "
            f"model.quant.block_size or add {name.split('.')[-1]!r} to model.quant.skip"
        ) from e


def quantize_params(
    params: Params,
    kind: QuantKind | str | QuantConfig,
    *,
    skip: tuple[str, ...] | None = None,
    quantizer: Callable[..., QuantizedArray] | None = None,
) -> Params:
    """The params tree with its projection kernels, LM head and embedding table quantized
    (except the modules in `skip`); norms, biases and heads are kept as they are.

    `kind` is `"int8"`, `"nf4"` (defaults of `QuantConfig`), a `QuantConfig`, or `"none"`
    (returned unchanged). `quantizer(w, transposed=...)` overrides how an array is
    quantized (e.g. `functools.partial(quantize_gguf, type_name="Q4_0")`). Runs on the host,
    one stacked weight at a time.
    """
    cfg = kind if isinstance(kind, QuantConfig) else QuantConfig(kind=kind)  # type: ignore[arg-type]
    if skip is not None:
        cfg = dataclasses.replace(cfg, skip=tuple(skip))
    if cfg.kind == "none" and quantizer is None:
        return params

    def q(path: tuple[str, ...], w: Any) -> Any:
        target = _quantized_as(path, cfg)
        return w if target is None else _quantize_named(w, cfg, *target, quantizer)

    out = dict(params)
    if "embed" in params:
        out["embed"] = q(("embed",), params["embed"])
    if "lm_head" in params:
        out["lm_head"] = {
            **params["lm_head"],
            "kernel": q(("lm_head", "kernel"), params["lm_head"]["kernel"]),
        }
    if "layers" in params:
        out["layers"] = {
            name: {**module, "kernel": q(("layers", name, "kernel"), module["kernel"])}
            if "kernel" in module
            else module
            for name, module in params["layers"].items()
        }
    return out


def _quantized_as(path: tuple[str, ...], cfg: QuantConfig) -> tuple[bool, str] | None:
    """`(transposed, name)` if the weight at `path` in the params tree is one `cfg`
    quantizes — the embedding, the LM head, a block's projection kernel, not in `cfg.skip`
    — else None."""
    if path == ("embed",) and "embed" not in cfg.skip:
        return False, "embed"
    if path == ("lm_head", "kernel") and "lm_head" not in cfg.skip:
        return True, "lm_head"
    if len(path) == 3 and path[0] == "layers" and path[2] == "kernel":
        if path[1] in QUANTIZABLE and path[1] not in cfg.skip:
            return True, f"layers.{path[1]}"
    return None


# ----------------------------------------------------------------------------- bookkeeping


def logical_size(tree: Any) -> int:
    """Number of parameters, counting a quantized weight by its logical shape."""
    leaves = jax.tree.leaves(tree, is_leaf=is_quantized)
    return sum(int(np.prod(x.shape)) for x in leaves if hasattr(x, "shape"))


def float32_bytes(tree: Any) -> int:
    """Bytes the tree would take with every parameter in float32 (the baseline of
    `resident bytes / float32 bytes`)."""
    return 4 * logical_size(tree)


def quant_summary(params: Params) -> dict[str, int]:
    """`{kind: number of quantized weights}` (`"float"` for dense weights of ≥ 2 dims)."""
    counts: dict[str, int] = {}
    for x in jax.tree.leaves(params, is_leaf=is_quantized):
        key = x.kind if is_quantized(x) else ("float" if np.ndim(x) >= 2 else None)
        if key:
            counts[key] = counts.get(key, 0) + 1
    return counts


# ----------------------------------------------------------------------------- sharding


def leaf_axes(kernel_axes: tuple, field: str, *, transposed: bool) -> tuple:
    """Logical axes of one stored array of a quantized weight whose logical axes are
    `kernel_axes` (e.g. `("layers", "embed", "heads")`): the codes' rows and bytes and the
    scales' rows and blocks take the kernel's axes, so a shard of a row's bytes holds whole
    blocks with their scales whenever the mesh axis divides the blocks."""
    *lead, a, b = kernel_axes
    rows, cols = (b, a) if transposed else (a, b)
    lead = tuple(lead)
    return {
        "codes": (*lead, rows, cols),
        "scales": (*lead, rows, cols),
        "mins": (*lead, rows, cols),
        "scale_scales": (*lead, None),
        "scale_offset": lead,
    }[field]


# ----------------------------------------------------------------------------- loading


def load_quantized(
    path_or_name: str, quant: QuantConfig, *, dtype=jnp.float32
) -> tuple[Any, Params, Any]:
    """`(config, params, tokenizer)` with the base stored as `quant` says: `gguf` keeps a
    .gguf file's own blocks (`load_gguf(keep_quantized=True)`); `int8` / `nf4` load in
    float and quantize (`quantize_params`); `none` is `load_model`."""
    from pathlib import Path

    from jaxrlhf.models import loading

    if quant.kind == "gguf":
        is_default = isinstance(path_or_name, str) and (
            path_or_name.lower() in loading.DEFAULT_MODEL_NAMES
        )
        path = loading.default_model_path() if is_default else Path(path_or_name)
        if path.suffix.lower() != ".gguf":
            raise ValueError(
                f"model.quant.kind='gguf' keeps a GGUF file's blocks, but {path} is not a .gguf "
                f"file; use kind 'int8' or 'nf4' for an HF folder"
            )
        cfg, params, tok = loading.load_gguf(path, dtype=dtype, keep_quantized=True)
        return cfg, {**params, **_skipped(params, quant.skip)}, tok
    return loading.load_model(path_or_name, dtype=dtype, weight_hook=quantizing_hook(quant))


def quantizing_hook(cfg: QuantConfig) -> Callable[[tuple[str, ...], Any], Any]:
    """A loader's `weight_hook` that quantizes, one layer's array at a time as it is read,
    exactly the weights `quantize_params(params, cfg)` would (the same values: every scale,
    double quantization included, is per layer), so the float base is never whole."""

    def hook(path: tuple[str, ...], w: Any) -> Any:
        target = None if cfg.kind == "none" else _quantized_as(path, cfg)
        return w if target is None else _quantize_named(w, cfg, *target)

    return hook


def _skipped(params: Params, skip: tuple[str, ...]) -> Params:
    """The top-level entries of `params` with the `skip` modules dequantized."""
    out: Params = {}
    for name in skip:
        if name == "embed" and is_quantized(params.get("embed")):
            out["embed"] = np.asarray(params["embed"])
        elif name == "lm_head" and "lm_head" in params:
            out["lm_head"] = dequantize_params(params["lm_head"])
    layer_skips = [s for s in skip if s in params.get("layers", {})]
    if layer_skips:
        layers = dict(params["layers"])
        for name in layer_skips:
            layers[name] = {
                k: np.asarray(v) if is_quantized(v) else v for k, v in layers[name].items()
            }
        out["layers"] = layers
    return out
