"""2D -> 3D inflation: pure weight functions and a torch.fx graph converter.

`inflate_weight` / `inflate_state_dict` turn 2D conv kernels into 3D ones (pure functions).
`inflate(module_2d)` traces a 2D network with torch.fx (timm's leaf modules and autowrapped
functions included), replaces every module with its 3D equivalent (deep copies, no shared
storage) and rewrites the dimension-dependent functional ops of the graph. The result is a
`torch.fx.GraphModule` taking (B, C, D, H, W) and returning the same structure as the 2D module
(a list of feature maps for timm `features_only` models). Its parameter names are those of the
2D module, so `inflate_state_dict(module_2d.state_dict())` loads into it strictly.

Geometry is isotropic, as in the seed's DX-Net: a k x k kernel becomes k x k x k, stride (s, s)
becomes (s, s, s), padding likewise; `depth=` overrides the depth of every kernel taller than 1
(the depth padding then keeps the depth "same"-sized for stride 1).

To know which tensor dimension is which, the converter tracks a layout per graph value: the dim
tags of a spatial tensor in the 2D graph (("N", "C", "H", "W") for the input, ("N", "H", "W", "C")
after a channels-last permute, ...); in 3D a "D" dim is inserted just before "H". Ops are
rewritten from these tags, and anything without a rule raises `InflationError` naming the op and
the module path.
"""

from __future__ import annotations

import copy
import math
import operator
from dataclasses import dataclass
from typing import Any, Callable, Literal, Mapping, Sequence

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import (
    BatchNormAct2d,
    Linear as TimmLinear,
    Conv2dSame,
    DropPath,
    GroupNorm,
    GroupNorm1,
    LayerNorm,
    LayerNorm2d,
    get_notrace_functions,
    is_notrace_module,
)
from timm.layers.pool2d_same import MaxPool2dSame
from torch import Tensor

__all__ = [
    "InflationError",
    "InflateMode",
    "inflate",
    "inflate_weight",
    "inflate_state_dict",
    "center_index",
    "Conv3dSame",
    "MaxPool3dSame",
    "BatchNormAct3d",
    "LayerNorm3d",
    "pad_same_3d",
]

InflateMode = Literal["repeat", "center"]
_MODES = ("repeat", "center")


class InflationError(ValueError):
    """A 2D module or op with no 3D rule; the message names the op and its module path."""


class _Unsupported(Exception):
    """Raised by the rules; `inflate` turns it into an InflationError naming op and path."""


# ----------------------------------------------------------------------------------------------
# Pure weight functions
# ----------------------------------------------------------------------------------------------


def _check_mode(mode: str) -> None:
    if mode not in _MODES:
        raise ValueError(f"inflate mode must be one of {_MODES}, got {mode!r}")


def center_index(depth: int) -> int:
    """Depth slice that holds the 2D kernel in `center` mode.

    Odd depth: the centre. Even depth: (depth - 1) // 2, the slice that PyTorch's and TF's
    "same" padding align with the output position (left pad = (depth - 1) // 2).
    """
    return (depth - 1) // 2


def inflate_weight(w2d: Tensor, depth: int, mode: InflateMode = "repeat") -> Tensor:
    """(O, I, kh, kw) -> (O, I, depth, kh, kw).

    `repeat` (I3D, the paper's rule): the kernel repeated along depth and divided by `depth`,
    so the 3D kernel summed over depth equals the 2D kernel. `center`: the 2D kernel in slice
    `center_index(depth)`, zeros elsewhere, so a depth-constant input gives the 2D response.
    """
    if not isinstance(w2d, Tensor) or w2d.ndim != 4:
        shape = tuple(w2d.shape) if isinstance(w2d, Tensor) else type(w2d).__name__
        raise ValueError(f"inflate_weight: expected a 4D conv weight (O, I, kh, kw), got {shape}")
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
        raise ValueError(f"inflate_weight: depth must be a positive int, got {depth!r}")
    _check_mode(mode)
    if mode == "repeat":
        return w2d.unsqueeze(2).repeat(1, 1, depth, 1, 1) / depth
    out = w2d.new_zeros((w2d.shape[0], w2d.shape[1], depth, w2d.shape[2], w2d.shape[3]))
    out[:, :, center_index(depth)] = w2d
    return out


def _kernel_depth(kernel_height: int, depth: int | None) -> int:
    """Isotropic depth (= kernel height) unless `depth` overrides kernels taller than 1."""
    if depth is not None and kernel_height > 1:
        return depth
    return kernel_height


def inflate_state_dict(
    state_2d: Mapping[str, Tensor], mode: InflateMode = "repeat", depth: int | None = None
) -> dict[str, Tensor]:
    """State dict of a 2D network -> state dict of its `inflate`d 3D version (same keys).

    Every 4D tensor is taken to be a conv kernel and inflated with `inflate_weight` (depth =
    its height, or `depth` for kernels taller than 1, exactly as `inflate` builds the convs);
    every other tensor is cloned unchanged.
    """
    _check_mode(mode)
    out: dict[str, Tensor] = {}
    for key, value in state_2d.items():
        if not isinstance(value, Tensor):
            raise ValueError(f"inflate_state_dict: entry {key!r} is a {type(value).__name__}, not a tensor")
        if value.ndim == 4:
            out[key] = inflate_weight(value.detach(), _kernel_depth(value.shape[2], depth), mode)
        else:
            out[key] = value.detach().clone()
    return out


# ----------------------------------------------------------------------------------------------
# 3D modules with no torch.nn equivalent
# ----------------------------------------------------------------------------------------------


def _same_pad_amount(size: int, kernel: int, stride: int, dilation: int) -> int:
    return max((math.ceil(size / stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)


def pad_same_3d(
    x: Tensor,
    kernel_size: Sequence[int],
    stride: Sequence[int],
    dilation: Sequence[int] = (1, 1, 1),
    value: float = 0.0,
) -> Tensor:
    """TensorFlow 'SAME' padding of a (B, C, D, H, W) tensor (timm's `pad_same`, in 3D)."""
    pads: list[int] = []
    for size, k, s, d in reversed(list(zip(x.shape[-3:], kernel_size, stride, dilation))):
        total = _same_pad_amount(int(size), k, s, d)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads, value=value)


class Conv3dSame(nn.Conv3d):
    """Conv3d with TensorFlow 'SAME' dynamic padding (timm's Conv2dSame, in 3D)."""

    def forward(self, x: Tensor) -> Tensor:
        x = pad_same_3d(x, self.kernel_size, self.stride, self.dilation)
        return F.conv3d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class MaxPool3dSame(nn.MaxPool3d):
    """MaxPool3d with TensorFlow 'SAME' padding (timm's MaxPool2dSame, in 3D)."""

    def forward(self, x: Tensor) -> Tensor:
        x = pad_same_3d(x, self.kernel_size, self.stride, self.dilation, value=-float("inf"))
        return F.max_pool3d(x, self.kernel_size, self.stride, 0, self.dilation, self.ceil_mode)


class BatchNormAct3d(nn.BatchNorm3d):
    """BatchNorm3d + dropout + activation; same parameter/buffer names as timm's BatchNormAct2d."""

    def __init__(self, num_features: int, drop: nn.Module, act: nn.Module, **bn_kwargs: Any) -> None:
        super().__init__(num_features, **bn_kwargs)
        self.drop = drop
        self.act = act

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.drop(super().forward(x)))


class LayerNorm3d(nn.LayerNorm):
    """LayerNorm over the channels of a channels-first (B, C, D, H, W) tensor."""

    def forward(self, x: Tensor) -> Tensor:
        x = x.permute(0, 2, 3, 4, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 4, 1, 2, 3)


# ----------------------------------------------------------------------------------------------
# Module rules
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Spec:
    mode: InflateMode
    depth: int | None


def _iso(value: int | Sequence[int]) -> tuple[int, ...]:
    """2D geometry -> 3D, isotropic: k -> (k, k, k); (a, b) -> (a, a, b)."""
    if isinstance(value, int):
        return (value, value, value)
    if len(value) != 2:
        raise _Unsupported(f"expected a 2D size, got {tuple(value)}")
    return (value[0], value[0], value[1])


def _iso_optional(value: Any) -> Any:
    """Adaptive-pool output sizes: ints and None stay (they apply to every dim)."""
    if value is None or isinstance(value, int):
        return value
    if len(value) != 2:
        raise _Unsupported(f"expected a 2D output size, got {tuple(value)}")
    return (value[0], value[0], value[1])


def _pad4_to_6(pad: Sequence[int]) -> tuple[int, ...]:
    """(left, right, top, bottom) -> (left, right, top, bottom, front, back), front/back = top/bottom."""
    if len(pad) != 4:
        raise _Unsupported(f"expected 4 padding values, got {tuple(pad)}")
    return (*pad, pad[2], pad[3])


def _load_copy(new: nn.Module, state: Mapping[str, Tensor], old: nn.Module) -> nn.Module:
    new.load_state_dict(state)  # copies values: no storage shared with the source
    new.train(old.training)
    return new


def _conv_geometry(conv: nn.Conv2d, spec: _Spec) -> dict[str, Any]:
    kh, kw = conv.kernel_size
    kd = _kernel_depth(kh, spec.depth)
    sh, sw = conv.stride
    dh, dw = conv.dilation
    padding: Any = conv.padding
    if not isinstance(padding, str):
        pd = padding[0] if kd == kh else dh * (kd - 1) // 2
        padding = (pd, padding[0], padding[1])
    return dict(kernel_size=(kd, kh, kw), stride=(sh, sh, sw), padding=padding, dilation=(dh, dh, dw))


def _conv3d(conv: nn.Conv2d, spec: _Spec, cls: type[nn.Conv3d] = nn.Conv3d) -> nn.Conv3d:
    geometry = _conv_geometry(conv, spec)
    new = cls(
        conv.in_channels,
        conv.out_channels,
        groups=conv.groups,
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
        device=conv.weight.device,
        dtype=conv.weight.dtype,
        **geometry,
    )
    state = {"weight": inflate_weight(conv.weight.detach(), geometry["kernel_size"][0], spec.mode)}
    if conv.bias is not None:
        state["bias"] = conv.bias.detach()
    return _load_copy(new, state, conv)


def _conv3d_same(conv: nn.Conv2d, spec: _Spec) -> nn.Conv3d:
    return _conv3d(conv, spec, Conv3dSame)


def _bn_kwargs(bn: nn.modules.batchnorm._NormBase) -> dict[str, Any]:
    return dict(eps=bn.eps, momentum=bn.momentum, affine=bn.affine, track_running_stats=bn.track_running_stats)


def _batchnorm3d(bn: nn.BatchNorm2d, spec: _Spec) -> nn.Module:
    return _load_copy(nn.BatchNorm3d(bn.num_features, **_bn_kwargs(bn)), bn.state_dict(), bn)


def _instancenorm3d(norm: nn.InstanceNorm2d, spec: _Spec) -> nn.Module:
    return _load_copy(nn.InstanceNorm3d(norm.num_features, **_bn_kwargs(norm)), norm.state_dict(), norm)


def _batchnorm_act3d(bn: nn.BatchNorm2d, spec: _Spec) -> nn.Module:
    for part in ("drop", "act"):
        if _passthrough_kind(getattr(bn, part)) != "any":
            raise _Unsupported(f"its {part} layer {type(getattr(bn, part)).__name__} has no 3D rule")
    new = BatchNormAct3d(bn.num_features, copy.deepcopy(bn.drop), copy.deepcopy(bn.act), **_bn_kwargs(bn))
    return _load_copy(new, bn.state_dict(), bn)


def _layernorm3d(norm: nn.LayerNorm, spec: _Spec) -> nn.Module:
    new = LayerNorm3d(norm.normalized_shape, eps=norm.eps, elementwise_affine=norm.elementwise_affine)
    return _load_copy(new, norm.state_dict(), norm)


def _maxpool3d(pool: nn.MaxPool2d, spec: _Spec, cls: type[nn.MaxPool3d] = nn.MaxPool3d) -> nn.Module:
    if pool.return_indices:
        raise _Unsupported("return_indices=True")
    geometry = (_iso(pool.kernel_size), _iso(pool.stride), _iso(pool.padding), _iso(pool.dilation))
    return cls(*geometry, ceil_mode=pool.ceil_mode)


def _maxpool3d_same(pool: nn.MaxPool2d, spec: _Spec) -> nn.Module:
    return _maxpool3d(pool, spec, MaxPool3dSame)


def _avgpool3d(pool: nn.AvgPool2d, spec: _Spec) -> nn.Module:
    if pool.divisor_override is not None:
        raise _Unsupported("divisor_override is set")
    return nn.AvgPool3d(
        _iso(pool.kernel_size),
        _iso(pool.stride),
        _iso(pool.padding),
        ceil_mode=pool.ceil_mode,
        count_include_pad=pool.count_include_pad,
    )


def _adaptive_avgpool3d(pool: nn.AdaptiveAvgPool2d, spec: _Spec) -> nn.Module:
    return nn.AdaptiveAvgPool3d(_iso_optional(pool.output_size))


def _adaptive_maxpool3d(pool: nn.AdaptiveMaxPool2d, spec: _Spec) -> nn.Module:
    if pool.return_indices:
        raise _Unsupported("return_indices=True")
    return nn.AdaptiveMaxPool3d(_iso_optional(pool.output_size))


def _dropout3d(drop: nn.Dropout2d, spec: _Spec) -> nn.Module:
    return nn.Dropout3d(drop.p, drop.inplace)


def _pad3d(pad: nn.Module, spec: _Spec) -> nn.Module:
    cls = {
        nn.ZeroPad2d: nn.ZeroPad3d,
        nn.ReflectionPad2d: nn.ReflectionPad3d,
        nn.ReplicationPad2d: nn.ReplicationPad3d,
    }.get(type(pad))
    if cls is not None:
        return cls(_pad4_to_6(pad.padding))
    return nn.ConstantPad3d(_pad4_to_6(pad.padding), pad.value)


_INTERPOLATE_MODES = {"nearest": "nearest", "nearest-exact": "nearest-exact", "bilinear": "trilinear", "area": "area"}


def _upsample3d(up: nn.Upsample, spec: _Spec) -> nn.Module:
    if up.size is not None and not isinstance(up.size, int):
        raise _Unsupported(f"a 2D target size {up.size} fixes no depth")
    if up.mode not in _INTERPOLATE_MODES:
        raise _Unsupported(f"mode {up.mode!r} has no 3D equivalent")
    scale = up.scale_factor
    if isinstance(scale, (tuple, list)):
        scale = _iso(scale)
    return nn.Upsample(up.size, scale, _INTERPOLATE_MODES[up.mode], up.align_corners)


ModuleRule = Callable[[Any, _Spec], nn.Module]


def _module_rules() -> dict[type, ModuleRule]:
    """Exact types only: a subclass (e.g. timm's StdConv2d) may change semantics, so it needs its own rule."""
    rules: dict[type, ModuleRule] = {
        nn.Conv2d: _conv3d,
        Conv2dSame: _conv3d_same,
        nn.BatchNorm2d: _batchnorm3d,
        BatchNormAct2d: _batchnorm_act3d,
        nn.InstanceNorm2d: _instancenorm3d,
        LayerNorm2d: _layernorm3d,
        nn.MaxPool2d: _maxpool3d,
        MaxPool2dSame: _maxpool3d_same,
        nn.AvgPool2d: _avgpool3d,
        nn.AdaptiveAvgPool2d: _adaptive_avgpool3d,
        nn.AdaptiveMaxPool2d: _adaptive_maxpool3d,
        nn.Dropout2d: _dropout3d,
        nn.Upsample: _upsample3d,
    }
    for pad in (nn.ZeroPad2d, nn.ConstantPad2d, nn.ReflectionPad2d, nn.ReplicationPad2d):
        rules[pad] = _pad3d
    return rules


# Modules kept as they are. "any": elementwise; "channels_last": acts on the last dim, which
# must be the channels; "channels_first": acts per channel on dim 1 for any rank.
_ELEMENTWISE_MODULES: tuple[type, ...] = (
    nn.Identity, nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Sigmoid, nn.Tanh, nn.Hardswish,
    nn.Hardsigmoid, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.Mish, nn.Softplus,
    nn.Hardtanh, nn.Dropout, nn.AlphaDropout,
)  # fmt: skip
_TIMM_ACTIVATION_MODULES = ("timm.layers.activations", "timm.layers.activations_me")


def _passthrough_kind(module: nn.Module) -> str | None:
    kind = type(module)
    if kind in _ELEMENTWISE_MODULES or kind is DropPath or kind.__module__ in _TIMM_ACTIVATION_MODULES:
        return "any"
    if kind in (nn.Linear, TimmLinear, nn.LayerNorm, LayerNorm):
        return "channels_last"
    if kind in (nn.GroupNorm, GroupNorm, GroupNorm1):
        return "channels_first"
    return None


# ----------------------------------------------------------------------------------------------
# Layouts of graph values
# ----------------------------------------------------------------------------------------------

_NCHW = ("N", "C", "H", "W")
_NHWC = ("N", "H", "W", "C")
_SPATIAL = ("H", "W")


@dataclass(frozen=True)
class _Val:
    """What the converter knows about a graph value.

    tags: dim tags of a spatial tensor in the 2D graph (None: not spatial);
    rank: rank of a non-spatial tensor (None: unknown or not a tensor);
    seq: a list/tuple of tensors that each have `tags` (split/chunk).
    """

    tags: tuple[str, ...] | None = None
    rank: int | None = None
    seq: bool = False


_PLAIN = _Val()


def _tags3d(tags: tuple[str, ...]) -> tuple[str, ...]:
    if "H" not in tags:
        return tags
    i = tags.index("H")
    return (*tags[:i], "D", *tags[i:])


def _norm_dim(dim: int, rank: int) -> int:
    if not isinstance(dim, int) or not -rank <= dim < rank:
        raise _Unsupported(f"dim {dim!r} is not a literal dim of a rank-{rank} tensor")
    return dim % rank


def _expand_dim(dim: int, tags: tuple[str, ...]) -> list[int]:
    """A 2D dim -> its 3D dims: "H" -> ["D", "H"] (reductions, permutes, flatten)."""
    tag = tags[_norm_dim(dim, len(tags))]
    t3 = _tags3d(tags)
    return [t3.index("D"), t3.index("H")] if tag == "H" else [t3.index(tag)]


def _same_dim(dim: int, tags: tuple[str, ...]) -> int:
    """A 2D dim -> the 3D dim with the same tag (cat, split: "H" stays "H")."""
    return _tags3d(tags).index(tags[_norm_dim(dim, len(tags))])


def _as_dims(dim: Any) -> list[int]:
    return [dim] if isinstance(dim, int) else list(dim)


# ----------------------------------------------------------------------------------------------
# Node argument helpers
# ----------------------------------------------------------------------------------------------


def _arg(node: fx.Node, pos: int, name: str, default: Any = None) -> Any:
    if len(node.args) > pos:
        return node.args[pos]
    return node.kwargs.get(name, default)


def _set_arg(node: fx.Node, pos: int, name: str, value: Any) -> None:
    if len(node.args) > pos:
        args = list(node.args)
        args[pos] = value
        node.args = tuple(args)
    else:
        node.kwargs = {**node.kwargs, name: value}


def _varargs(node: fx.Node, start: int = 1) -> tuple[list[Any], bool]:
    """x.permute(0, 2, 3, 1) / x.permute((0, 2, 3, 1)) -> ([0, 2, 3, 1], packed?)."""
    rest = list(node.args[start:])
    if len(rest) == 1 and isinstance(rest[0], (tuple, list)):
        return list(rest[0]), True
    return rest, False


def _set_varargs(node: fx.Node, values: Sequence[Any], packed: bool, start: int = 1) -> None:
    head = node.args[:start]
    node.args = (*head, tuple(values)) if packed else (*head, *values)


def _node_vals(value: Any, vals: Mapping[fx.Node, _Val]) -> list[_Val]:
    """Values of every node found in an argument (nested lists/tuples included)."""
    found: list[_Val] = []
    fx.node.map_arg(value, lambda n: found.append(vals[n]) or n)
    return found


# ----------------------------------------------------------------------------------------------
# Function / method rules: (node, layout of its inputs) -> layout of its output
# ----------------------------------------------------------------------------------------------

FnRule = Callable[[fx.Node, Mapping[fx.Node, _Val]], _Val]


def _broadcast(vals: Sequence[_Val]) -> _Val:
    layouts = {v.tags for v in vals if v.tags is not None}
    if not layouts:
        ranks = [v.rank for v in vals]
        return _Val(rank=max(ranks) if ranks and None not in ranks else None)
    if len(layouts) > 1:
        raise _Unsupported(f"combines tensors of different layouts {sorted(layouts)}")
    for v in vals:
        if v.tags is None and (v.rank is None or v.rank > 1):
            raise _Unsupported(f"broadcasts a non-spatial tensor of rank {v.rank} against a spatial one")
    return _Val(tags=layouts.pop())


def _elementwise(node: fx.Node, vals: Mapping[fx.Node, _Val]) -> _Val:
    return _broadcast(_node_vals((node.args, node.kwargs), vals))


def _input(node: fx.Node, vals: Mapping[fx.Node, _Val]) -> _Val:
    first = node.args[0] if node.args else None
    if not isinstance(first, fx.Node):
        raise _Unsupported("its first argument is not a graph value")
    return vals[first]


def _spatial_input(node: fx.Node, vals: Mapping[fx.Node, _Val]) -> tuple[str, ...] | None:
    v = _input(node, vals)
    if v.seq:
        raise _Unsupported("is applied to a list of tensors")
    return v.tags


def _reduce(node: fx.Node, vals: Mapping[fx.Node, _Val]) -> _Val:
    tags = _spatial_input(node, vals)
    dim = _arg(node, 1, "dim")
    keepdim = bool(_arg(node, 2, "keepdim", False))
    if tags is None:
        return _PLAIN
    if dim is None:
        return _Val(rank=0)
    dims2 = sorted({_norm_dim(d, len(tags)) for d in _as_dims(dim)})
    dims3 = sorted(d3 for d in dims2 for d3 in _expand_dim(d, tags))
    _set_arg(node, 1, "dim", dims3[0] if isinstance(dim, int) and len(dims3) == 1 else tuple(dims3))
    if keepdim:
        return _Val(tags=tags)
    kept = tuple(t for i, t in enumerate(tags) if i not in dims2)
    return _Val(tags=kept) if set(kept) & set(_SPATIAL) else _Val(rank=len(kept))


def _permute(node: fx.Node, vals: Mapping[fx.Node, _Val]) -> _Val:
    tags = _spatial_input(node, vals)
    if tags is None:
        return _PLAIN
    perm, packed = _varargs(node)
    if sorted(_norm_dim(p, len(tags)) for p in perm) != list(range(len(tags))):
        raise _Unsupported(f"permutation {tuple(perm)} does not match a rank-{len(tags)} tensor")
    _set_varargs(node, [d for p in perm for d in _expand_dim(p, tags)], packed)
    return _Val(tags=tuple(tags[_norm_dim(p, len(tags))] for p in perm))


def _transpose(node: fx.Node, vals: Mapping[fx.Node, _Val]) -> _Val:
    tags = _spatial_input(node, vals)
    if tags is None:
        return _PLAIN
    d0, d1 = _norm_dim(node.args[1], len(tags)), _norm_dim(node.args[2], len(tags))
    if "H" in (tags[d0], tags[d1]):
        raise _Unsupported("swaps the H dim, which has no single 3D counterpart")
    node.args = (node.args[0], _same_dim(d0, tags), _same_dim(d1, tags))
    swapped = list(tags)
    swapped[d0], swapped[d1] = swapped[d1], swapped[d0]
    return _Val(tags=tuple(swapped))


def _reshape(node: fx.Node, vals: Mapping[fx.Node, _Val]) -> _Val:
    """Only reshapes of non-spatial tensors into a broadcastable (1, C, 1, 1)-like shape change."""
    if _spatial_input(node, vals) is not None:
        raise _Unsupported("reshapes a spatial tensor")
    shape, packed = _varargs(node)
    if any(not isinstance(s, int) for s in shape):
        return _Val(rank=len(shape))
    if len(shape) == 4 and shape[2] == shape[3] == 1:
        _set_varargs(node, [*shape[:2], 1, *shape[2:]], packed)
        return _Val(tags=_NCHW)
    if len(shape) == 4 and shape[1] == shape[2] == 1:
        _set_varargs(node, [shape[0], 1, 1, 1, shape[3]], packed)
        return _Val(tags=_NHWC)
    return _Val(rank=len(shape))


def _flatten_dims(tags: tuple[str, ...], start: int, end: int) -> tuple[int, int, _Val]:
    start, end = _norm_dim(start, len(tags)), _norm_dim(end, len(tags))
    merged = tags[start : end + 1]
    kept = tags[:start] + (("X",) if merged else ()) + tags[end + 1 :]
    out = _Val(tags=kept) if set(kept) & set(_SPATIAL) else _Val(rank=len(kept))
    return _expand_dim(start, tags)[0], _expand_dim(end, tags)[-1], out


def _flatten(node: fx.Node, vals: Mapping[fx.Node, _Val]) -> _Val:
    tags = _spatial_input(node, vals)
    if tags is None:
        return _PLAIN
    start3, end3, out = _flatten_dims(tags, _arg(node, 1, "start_dim", 0), _arg(node, 2, "end_dim", -1))
    _set_arg(node, 1, "start_dim", start3)
    _set_arg(node, 2, "end_dim", end3)
    return out


def _cat(node: fx.Node, vals: Mapping[fx.Node, _Val]) -> _Val:
    out = _broadcast(_node_vals(node.args[0], vals))
    if out.tags is not None:
        _set_arg(node, 1, "dim", _same_dim(_arg(node, 1, "dim", 0), out.tags))
    return out


def _split(node: fx.Node, vals: Mapping[fx.Node, _Val]) -> _Val:
    tags = _spatial_input(node, vals)
    if tags is not None:
        _set_arg(node, 2, "dim", _same_dim(_arg(node, 2, "dim", 0), tags))
    return _Val(tags=tags, seq=True)


def _getitem(node: fx.Node, vals: Mapping[fx.Node, _Val]) -> _Val:
    source = _input(node, vals)
    if source.seq:
        return _Val(tags=source.tags)
    if source.tags is None:
        return _PLAIN
    index = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
    if len(index) > len(source.tags) or any(i is None or i is Ellipsis or isinstance(i, fx.Node) for i in index):
        raise _Unsupported(f"indexes a spatial tensor with {node.args[1]!r}")
    new_index: list[Any] = []
    for tag, i in zip(source.tags, index):
        if tag in _SPATIAL and i != slice(None):
            raise _Unsupported(f"indexes the spatial dim {tag} with {i!r}")
        new_index += [slice(None), i] if tag == "H" else [i]
    node.args = (node.args[0], tuple(new_index))
    kept = tuple(t for t, i in zip(source.tags, index) if not isinstance(i, int)) + source.tags[len(index) :]
    return _Val(tags=kept)


def _shape_query(node: fx.Node, vals: Mapping[fx.Node, _Val]) -> _Val:
    """x.shape / x.size() / x.dim() of a spatial tensor would be read with 2D positions."""
    if _spatial_input(node, vals) is not None:
        raise _Unsupported("reads the shape of a spatial tensor, whose dims move in 3D")
    return _PLAIN


def _require_nchw(node: fx.Node, vals: Mapping[fx.Node, _Val]) -> None:
    tags = _spatial_input(node, vals)
    if tags != _NCHW:
        raise _Unsupported(f"expects an (N, C, H, W) input, got layout {tags}")


def _pad(node: fx.Node, vals: Mapping[fx.Node, _Val]) -> _Val:
    tags = _spatial_input(node, vals)
    pad = list(_arg(node, 1, "pad"))
    if tags is None:
        return _PLAIN
    if len(pad) == 4 and tags[-2:] == _SPATIAL:
        _set_arg(node, 1, "pad", _pad4_to_6(pad))
    elif not (len(pad) == 2 and tags[-1] == "W"):
        raise _Unsupported(f"pads {pad} on layout {tags}")
    return _Val(tags=tags)


def _retarget(
    target: Callable[..., Any], iso_args: Sequence[tuple[int, str]], reject: tuple[int, str] | None = None
) -> FnRule:
    """Functional pools -> their 3D function, geometry arguments made isotropic; `reject`: an
    argument (return_indices, divisor_override) that must be unset."""

    def rule(node: fx.Node, vals: Mapping[fx.Node, _Val]) -> _Val:
        _require_nchw(node, vals)
        if reject is not None and _arg(node, *reject) not in (None, False):
            raise _Unsupported(f"{reject[1]} is set")
        for pos, name in iso_args:
            value = _arg(node, pos, name)
            if value is not None:
                fix = _iso_optional if name == "output_size" else _iso
                _set_arg(node, pos, name, fix(value))
        node.target = target
        return _Val(tags=_NCHW)

    return rule


def _interpolate(node: fx.Node, vals: Mapping[fx.Node, _Val]) -> _Val:
    _require_nchw(node, vals)
    size, scale = _arg(node, 1, "size"), _arg(node, 2, "scale_factor")
    mode = _arg(node, 3, "mode", "nearest")
    if size is not None and not isinstance(size, int):
        raise _Unsupported(f"a 2D target size {size!r} fixes no depth")
    if mode not in _INTERPOLATE_MODES or _arg(node, 6, "antialias", False):
        raise _Unsupported(f"mode {mode!r} (antialias={_arg(node, 6, 'antialias', False)}) has no 3D equivalent")
    if isinstance(scale, (tuple, list)):
        _set_arg(node, 2, "scale_factor", _iso(scale))
    _set_arg(node, 3, "mode", _INTERPOLATE_MODES[mode])
    return _Val(tags=_NCHW)


def _channel_rule(dim_tag: str, tag_pos: int) -> FnRule:
    """Functional ops that act on one dim for any rank (linear, layer_norm: last; batch/group_norm: 1)."""

    def rule(node: fx.Node, vals: Mapping[fx.Node, _Val]) -> _Val:
        tags = _spatial_input(node, vals)
        if tags is not None and tags[tag_pos] != dim_tag:
            raise _Unsupported(f"normalises dim {tag_pos} of layout {tags}, not the channels")
        if node.target is F.layer_norm and len(_as_dims(_arg(node, 1, "normalized_shape"))) != 1:
            raise _Unsupported("normalises more than the channel dim")
        return _Val(tags=tags) if tags is not None else _PLAIN

    return rule


def _fn_rules() -> dict[Any, FnRule]:
    rules: dict[Any, FnRule] = {}
    elementwise_fns = [
        operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv, operator.neg,
        operator.pow, operator.iadd, operator.isub, operator.imul, operator.itruediv,
        torch.add, torch.sub, torch.mul, torch.div, torch.sigmoid, torch.tanh, torch.relu, torch.exp,
        torch.sqrt, torch.rsqrt, torch.abs, torch.neg, torch.pow, torch.clamp, torch.clip,
        torch.maximum, torch.minimum, torch.where, torch.square,
        F.relu, F.relu6, F.silu, F.gelu, F.sigmoid, F.tanh, F.hardswish, F.hardsigmoid, F.leaky_relu,
        F.elu, F.selu, F.celu, F.mish, F.softplus, F.hardtanh, F.dropout, F.logsigmoid,
    ]  # fmt: skip
    elementwise_methods = [
        "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "sigmoid", "sigmoid_", "relu",
        "relu_", "tanh", "tanh_", "clamp", "clamp_", "clamp_min", "clamp_min_", "exp", "neg", "pow",
        "sqrt", "rsqrt", "abs", "square", "contiguous", "float", "half", "double", "bfloat16", "to",
        "type", "type_as", "clone", "detach", "requires_grad_",
    ]  # fmt: skip
    rules.update({f: _elementwise for f in elementwise_fns + elementwise_methods})
    for key in ("mean", "sum", "amax", "amin", "std", "var", torch.mean, torch.sum, torch.amax, torch.amin):
        rules[key] = _reduce
    rules.update({"permute": _permute, torch.permute: _permute, "transpose": _transpose, torch.transpose: _transpose})
    rules.update({"reshape": _reshape, "view": _reshape, torch.reshape: _reshape})
    rules.update({"flatten": _flatten, torch.flatten: _flatten})
    rules.update({torch.cat: _cat, torch.concat: _cat, torch.concatenate: _cat})
    rules.update({"split": _split, "chunk": _split, torch.split: _split, torch.chunk: _split})
    rules.update({operator.getitem: _getitem, F.pad: _pad, F.interpolate: _interpolate})
    rules.update({getattr: _shape_query, "size": _shape_query, "dim": _shape_query})
    rules[F.adaptive_avg_pool2d] = _retarget(F.adaptive_avg_pool3d, [(1, "output_size")])
    rules[F.adaptive_max_pool2d] = _retarget(F.adaptive_max_pool3d, [(1, "output_size")], (2, "return_indices"))
    pool_geometry = [(1, "kernel_size"), (2, "stride"), (3, "padding")]
    rules[F.avg_pool2d] = _retarget(F.avg_pool3d, pool_geometry, (6, "divisor_override"))
    rules[F.max_pool2d] = _retarget(F.max_pool3d, [*pool_geometry, (4, "dilation")], (6, "return_indices"))
    rules[F.layer_norm] = rules[F.linear] = _channel_rule("C", -1)
    for fn in (F.batch_norm, F.group_norm, F.instance_norm):
        rules[fn] = _channel_rule("C", 1)
    return rules


def _fn_rule(target: Any) -> FnRule | None:
    rule = _FN_RULES.get(target) if _hashable(target) else None
    if rule is None and getattr(target, "__module__", None) in _TIMM_ACTIVATION_MODULES:
        return _elementwise
    return rule


def _hashable(value: Any) -> bool:
    try:
        hash(value)
    except TypeError:
        return False
    return True


# ----------------------------------------------------------------------------------------------
# Tracing and graph conversion
# ----------------------------------------------------------------------------------------------


class _Tracer(fx.Tracer):
    """torch.fx tracer that keeps timm's leaf modules and autowrapped functions, and every module
    that has a 3D rule, as leaves."""

    def __init__(self) -> None:
        super().__init__(autowrap_functions=tuple(f for f in get_notrace_functions() if callable(f)))

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        kind = type(m)
        if kind in _MODULE_RULES or _passthrough_kind(m) is not None or is_notrace_module(kind):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def _target_name(node: fx.Node, root: nn.Module) -> str:
    if node.op == "call_module":
        return type(root.get_submodule(node.target)).__name__
    if node.op != "call_function":
        return str(node.target)
    target = node.target
    name = getattr(target, "__name__", repr(target))
    for namespace, label in ((operator, "operator"), (torch, "torch"), (F, "torch.nn.functional")):
        if getattr(namespace, name, None) is target:
            return f"{label}.{name}"
    return f"{getattr(target, '__module__', '?')}.{name}"


def _module_path(node: fx.Node) -> str:
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "<root>"
    qualified = list(stack.values())[-1]
    return str(qualified[0] if isinstance(qualified, tuple) else qualified) or "<root>"


class _GraphInflater:
    """Walks the traced 2D graph once, in order: computes layouts, swaps modules, rewrites ops."""

    def __init__(self, root: nn.Module, graph: fx.Graph, spec: _Spec) -> None:
        self.root, self.graph, self.spec = root, graph, spec
        self.vals: dict[fx.Node, _Val] = {}
        self.converted: dict[str, _Val] = {}  # module path -> its output layout

    def run(self) -> None:
        for node in list(self.graph.nodes):
            try:
                self.vals[node] = self._visit(node)
            except _Unsupported as err:
                raise InflationError(
                    f"cannot inflate {node.op} {_target_name(node, self.root)} at {_module_path(node)}: {err}"
                ) from None

    def _visit(self, node: fx.Node) -> _Val:
        if node.op == "placeholder":
            return _Val(tags=_NCHW)
        if node.op == "get_attr":
            value = _get_attr(self.root, str(node.target))
            return _Val(rank=value.ndim) if isinstance(value, Tensor) else _PLAIN
        if node.op == "output":
            return _PLAIN
        if node.op == "call_module":
            return self._visit_module(node)
        rule = _fn_rule(node.target)
        if rule is None:
            raise _Unsupported("no 3D rule for this op")
        return rule(node, self.vals)

    def _visit_module(self, node: fx.Node) -> _Val:
        target = str(node.target)
        module = self.root.get_submodule(target)
        tags = _spatial_input(node, self.vals)
        if target in self.converted:  # a module called twice is converted once
            return self.converted[target]
        kind = _passthrough_kind(module)
        if kind is not None:
            return self._check_passthrough(kind, tags)
        if type(module) is nn.Flatten:
            return self._flatten_module(target, module, tags)
        rule = _MODULE_RULES.get(type(module))
        if rule is None:
            raise _Unsupported("no 3D rule for this module type")
        if tags != _NCHW:
            raise _Unsupported(f"expects an (N, C, H, W) input, got layout {tags}")
        self._replace(target, rule(module, self.spec), _Val(tags=_NCHW))
        return _Val(tags=_NCHW)

    @staticmethod
    def _check_passthrough(kind: str, tags: tuple[str, ...] | None) -> _Val:
        if tags is None:
            return _PLAIN
        if kind == "channels_last" and tags[-1] != "C":
            raise _Unsupported(f"acts on the last dim, which is {tags[-1]} (layout {tags}), not the channels")
        if kind == "channels_first" and tags[1] != "C":
            raise _Unsupported(f"acts on dim 1, which is {tags[1]} (layout {tags}), not the channels")
        return _Val(tags=tags)

    def _flatten_module(self, target: str, module: nn.Flatten, tags: tuple[str, ...] | None) -> _Val:
        if tags is None:
            return _PLAIN
        start3, end3, out = _flatten_dims(tags, module.start_dim, module.end_dim)
        self._replace(target, nn.Flatten(start3, end3), out)
        return out

    def _replace(self, target: str, new: nn.Module, out: _Val) -> None:
        parent_name, _, name = target.rpartition(".")
        setattr(self.root.get_submodule(parent_name), name, new)
        self.converted[target] = out


def _get_attr(root: nn.Module, target: str) -> Any:
    value: Any = root
    for part in target.split("."):
        value = getattr(value, part)
    return value


def _trace(module: nn.Module) -> fx.Graph:
    try:
        return _Tracer().trace(module)
    except Exception as err:  # fx raises many kinds (TraceError, TypeError on proxies, ...)
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise InflationError(f"cannot trace {type(module).__name__} with torch.fx: {first}") from None


def inflate(module_2d: nn.Module, mode: InflateMode = "repeat", depth: int | None = None) -> fx.GraphModule:
    """2D network -> 3D network (a GraphModule) with the same parameter names and output structure.

    The source is deep-copied first: the result shares no storage with `module_2d`. timm
    `features_only` wrappers (FeatureListNet, EfficientNetFeatures, ...) are traced as they are,
    so the 3D module returns the same list of feature maps and keeps `feature_info`.
    """
    if not isinstance(module_2d, nn.Module):
        raise ValueError(f"inflate: module_2d must be a torch.nn.Module, got {type(module_2d).__name__}")
    _check_mode(mode)
    if depth is not None and (isinstance(depth, bool) or not isinstance(depth, int) or depth < 1):
        raise ValueError(f"inflate: depth must be a positive int or None, got {depth!r}")
    root = copy.deepcopy(module_2d)
    graph = _trace(root)
    _GraphInflater(root, graph, _Spec(mode, depth)).run()
    graph.lint()
    module_3d = fx.GraphModule(root, graph, class_name=f"{type(module_2d).__name__}3d")
    if hasattr(module_2d, "feature_info"):
        module_3d.feature_info = copy.deepcopy(module_2d.feature_info)
    module_3d.train(module_2d.training)
    return module_3d


_MODULE_RULES: dict[type, ModuleRule] = _module_rules()
_FN_RULES: dict[Any, FnRule] = _fn_rules()
