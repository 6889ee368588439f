"""MlTr: a hierarchical window transformer for multi-label image classification.

Cheng et al., "MlTr: Multi-label Classification with Transformer" (2021) name three parts and
published no code; this module builds them on the Swin Transformer layout (Liu et al. 2021):

* **Window partitioning and in-window pixel attention**: multi-head self-attention among the
  tokens of each non-overlapping window with a learned relative-position bias, windows shifted
  by half a window in every second block (with the mask the cyclic shift needs), patch embedding
  and patch merging between four stages. With the cross-window part switched off this is Swin,
  key for key, so ImageNet Swin checkpoints load into it.
* **Cross-window attention**: in every block each token also attends to one summary token per
  window of the whole feature map (the mean of the window's normalised tokens), so every pixel
  sees the whole image at a cost linear in the number of windows. It has its own query and
  key/value projections and its own softmax; its head outputs are scaled by a per-channel gate
  initialised at zero and added to the in-window attention's head outputs before the shared
  output projection. At gate zero the block computes exactly Swin's block.
* **Heads**: ``pool`` (global average pooling and a linear layer) or ``query`` (one learned query
  per class cross-attends to the final tokens, as in ML-Decoder and Query2Label).

The model returns logits; losses and metrics own the sigmoid.

Input contract: :class:`MlTrConfig` also says how an image becomes the model's input (``image_size``,
the ``resize`` rule, ``mean`` and ``std``); it is saved in every checkpoint and logged with the
model, so a consumer needs nothing but the model: decode to RGB uint8, resize by the rule, then
:func:`normalize`.

Stem: ``patch`` is Swin's patch embedding (a ``patch_size`` x ``patch_size`` strided conv), which
ImageNet Swin checkpoints load into; ``conv`` is a small stack of 3x3 stride-2 convolutions
(Xiao et al. 2021, "Early convolutions help transformers see better"), which optimises much faster
from scratch and is what the tiny variant uses.

Window rule (also what :class:`MlTrConfig` checks): the image size is a multiple of
``patch_size * 2**(num_stages - 1)`` so every stage has an integer grid; a stage whose grid is
not larger than the window uses one window covering the whole stage and no shift (Swin's clamp);
otherwise the window must divide the stage's grid. A configuration that breaks the rule raises a
``ValueError`` that lists the window sizes fitting the image and the image sizes fitting the window.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from mltr.errors import ConfigError

_logger = logging.getLogger(__name__)

# Added to the attention logits of token pairs the shifted-window mask separates (Swin's value).
MASK_VALUE = -100.0
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESIZE_RULES = ("squash",)  # squash: resize to image_size x image_size, aspect ratio not kept, no crop


def window_partition(x: torch.Tensor, window_size: int) -> torch.Tensor:
    """Split a (B, H, W, C) map into (B*nW, ws, ws, C) windows, windows of one image together."""
    B, H, W, C = x.shape
    x = x.view(B, H // window_size, window_size, W // window_size, window_size, C)  # B, H/ws, ws, W/ws, ws, C
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window_size, window_size, C)  # B*nW, ws, ws, C


def window_reverse(windows: torch.Tensor, window_size: int, H: int, W: int) -> torch.Tensor:
    """Inverse of :func:`window_partition`: (B*nW, ws, ws, C) windows back to a (B, H, W, C) map."""
    C = windows.shape[-1]
    ws = window_size
    x = windows.view(-1, H // ws, W // ws, ws, ws, C)  # B, H/ws, W/ws, ws, ws, C
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, H, W, C)  # B, H, W, C


def window_means(x: torch.Tensor, window_size: int) -> torch.Tensor:
    """One summary token per window, the mean of its tokens: (B, H, W, C) -> (B, nW, C), row-major windows."""
    B, H, W, C = x.shape
    x = x.view(B, H // window_size, window_size, W // window_size, window_size, C)  # B, H/ws, ws, W/ws, ws, C
    return x.mean(dim=(2, 4)).view(B, -1, C)  # B, nW, C


def relative_position_index(window_size: int) -> torch.Tensor:
    """(ws*ws, ws*ws) index into a ((2ws-1)^2, nH) bias table for every pair of tokens in a window."""
    coords = torch.stack(torch.meshgrid(torch.arange(window_size), torch.arange(window_size), indexing="ij"))
    coords = coords.flatten(1)  # 2, ws*ws
    relative = coords[:, :, None] - coords[:, None, :] + (window_size - 1)  # 2, ws*ws, ws*ws in [0, 2ws-2]
    return relative[0] * (2 * window_size - 1) + relative[1]  # ws*ws, ws*ws


def shifted_window_mask(height: int, width: int, window_size: int, shift: int) -> torch.Tensor:
    """(nW, ws*ws, ws*ws) additive mask for windows over a map rolled by ``-shift``.

    After the cyclic shift, the last window of a row (or column) holds tokens from both edges of
    the image. Rows ``[H - ws, H - shift)`` and ``[H - shift, H)`` (and the same for columns) are
    then different regions; tokens of one window attend only to tokens of their own region.
    """
    rows = torch.arange(height)
    cols = torch.arange(width)
    row_region = (rows >= height - window_size).long() + (rows >= height - shift).long()  # H
    col_region = (cols >= width - window_size).long() + (cols >= width - shift).long()  # W
    region = (row_region[:, None] * 3 + col_region[None, :]).view(1, height, width, 1)  # 1, H, W, 1
    region = window_partition(region, window_size).view(-1, window_size * window_size)  # nW, ws*ws
    differ = region[:, :, None] != region[:, None, :]  # nW, ws*ws, ws*ws
    return torch.zeros(differ.shape).masked_fill(differ, MASK_VALUE)


def stage_resolutions(image_size: int, patch_size: int, num_stages: int) -> tuple[int, ...]:
    """Token grid side of every stage: the patch grid, halved by each patch merging."""
    grid = image_size // patch_size
    return tuple(grid // 2**i for i in range(num_stages))


def stage_window(resolution: int, window_size: int) -> tuple[int, int]:
    """(window, shift) a stage uses: a window not smaller than the grid is clamped to it and not shifted."""
    if resolution <= window_size:
        return resolution, 0
    return window_size, window_size // 2


def window_fits(resolutions: tuple[int, ...], window_size: int) -> bool:
    return window_size >= 1 and all(r % stage_window(r, window_size)[0] == 0 for r in resolutions)


def fitting_window_sizes(image_size: int, patch_size: int, num_stages: int) -> list[int]:
    """Window sizes that fit every stage of this image size (and any size above the first stage's grid)."""
    resolutions = stage_resolutions(image_size, patch_size, num_stages)
    return [w for w in range(1, resolutions[0] + 1) if window_fits(resolutions, w)]


def fitting_image_sizes(
    window_size: int, patch_size: int, num_stages: int, near: int, count: int = 6
) -> list[int]:
    """The ``count`` image sizes closest to ``near`` that fit ``window_size``, ascending."""
    step = patch_size * 2 ** (num_stages - 1)
    candidates = [
        k * step
        for k in range(1, 4 * max(near, step) // step + 1)
        if window_fits(stage_resolutions(k * step, patch_size, num_stages), window_size)
    ]
    return sorted(sorted(candidates, key=lambda size: (abs(size - near), size))[:count])


@dataclass(frozen=True)
class MlTrConfig:
    """Everything needed to rebuild an MlTr model; stored in MlTr checkpoints."""

    image_size: int = 224
    patch_size: int = 4
    in_chans: int = 3
    num_classes: int = 80
    embed_dim: int = 96
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_heads: tuple[int, ...] = (3, 6, 12, 24)
    # Window side in tokens; clamped to a stage's grid when the grid is not larger (see the module docstring).
    window_size: int = 7
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    # False removes the cross-window attention (and its parameters): the network is then Swin.
    cross_window: bool = True
    head: Literal["pool", "query"] = "pool"
    # Width of the query head's decoder; None means the backbone's final width.
    query_dim: int | None = None
    query_heads: int = 8
    # Dropout before the classifier, and the stochastic-depth rate reached by the last block.
    drop_rate: float = 0.0
    drop_path_rate: float = 0.1
    stem: Literal["patch", "conv"] = "patch"  # see the module docstring
    # Output channels of the conv stem's 3x3 convs, one per stride-2 conv; empty: doubling up to
    # embed_dim (16, 32 for embed_dim 32 and patch_size 4).
    stem_widths: tuple[int, ...] = ()
    # Input contract: evaluation resizes by `resize` to image_size, then (x / 255 - mean) / std.
    resize: Literal["squash"] = "squash"
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    def __post_init__(self) -> None:
        for name in ("image_size", "patch_size", "in_chans", "num_classes", "embed_dim", "window_size",
                     "query_heads", "depths", "num_heads"):  # fmt: skip
            values = getattr(self, name)
            for value in values if isinstance(values, (tuple, list)) else (values,):
                if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    raise ConfigError(f"{name} must be a positive integer (each, for a list), got {values!r}")
        if self.query_dim is not None and (not isinstance(self.query_dim, int) or self.query_dim < 1):
            raise ConfigError(f"query_dim must be a positive integer or None, got {self.query_dim!r}")
        for name in ("drop_rate", "drop_path_rate"):  # a rate of 1 drops everything: NaN, not a model
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        object.__setattr__(self, "depths", tuple(int(d) for d in self.depths))
        object.__setattr__(self, "num_heads", tuple(int(h) for h in self.num_heads))
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))
        object.__setattr__(self, "stem_widths", tuple(int(w) for w in self.stem_widths))
        if len(self.mean) != self.in_chans or len(self.std) != self.in_chans or min(self.std) <= 0:
            raise ConfigError(
                f"mean {self.mean} and std {self.std} need one value per input channel ({self.in_chans}), "
                f"std positive"
            )
        if self.resize not in RESIZE_RULES:
            raise ConfigError(f"unknown resize rule {self.resize!r}; choose one of {', '.join(RESIZE_RULES)}")
        if self.stem not in ("patch", "conv"):
            raise ConfigError(f"stem must be 'patch' or 'conv', not {self.stem!r}")
        if self.stem == "conv" and (self.patch_size < 2 or self.patch_size & (self.patch_size - 1)):
            raise ConfigError(f"the conv stem needs a power-of-two patch_size >= 2, got {self.patch_size}")
        convs = self.patch_size.bit_length() - 1
        if self.stem_widths and (
            self.stem != "conv" or len(self.stem_widths) != convs or min(self.stem_widths) < 1
        ):
            raise ConfigError(
                f"stem_widths {self.stem_widths} needs the conv stem and one positive width per stride-2 "
                f"conv: {convs} for patch_size {self.patch_size}"
            )
        num_stages = len(self.depths)
        if num_stages == 0 or len(self.num_heads) != num_stages:
            raise ConfigError(f"depths {self.depths} and num_heads {self.num_heads} need one entry per stage")
        for i, heads in enumerate(self.num_heads):
            if self.stage_dims[i] % heads:
                raise ConfigError(f"stage {i} width {self.stage_dims[i]} is not divisible by {heads} heads")
        if self.head not in ("pool", "query"):
            raise ConfigError(f"head must be 'pool' or 'query', not {self.head!r}")
        if self.head == "query" and self.decoder_dim % self.query_heads:
            raise ConfigError(f"query_dim {self.decoder_dim} is not divisible by {self.query_heads} heads")
        step = self.patch_size * 2 ** (num_stages - 1)
        if self.image_size < step or self.image_size % step:
            lower = max(step, self.image_size // step * step)
            raise ConfigError(
                f"image_size={self.image_size} must be a multiple of patch_size * 2**(num_stages - 1) = "
                f"{step} (each of the {num_stages - 1} patch mergings halves the grid); "
                f"nearest: {lower}, {lower + step}"
            )
        resolutions = stage_resolutions(self.image_size, self.patch_size, num_stages)
        if not window_fits(resolutions, self.window_size):
            windows = fitting_window_sizes(self.image_size, self.patch_size, num_stages)
            images = fitting_image_sizes(self.window_size, self.patch_size, num_stages, near=self.image_size)
            raise ConfigError(
                f"window_size={self.window_size} does not fit image_size={self.image_size}: the stage grids "
                f"are {resolutions} and a window must divide every grid larger than itself (a grid not "
                f"larger than the window is one window). Window sizes that fit image_size "
                f"{self.image_size}: {', '.join(map(str, windows))} (or larger); image sizes that fit "
                f"window_size {self.window_size}: {', '.join(map(str, images)) or 'none near this size'}"
            )

    @property
    def stage_dims(self) -> tuple[int, ...]:
        return tuple(self.embed_dim * 2**i for i in range(len(self.depths)))

    @property
    def num_features(self) -> int:
        return self.stage_dims[-1]

    @property
    def decoder_dim(self) -> int:
        return self.query_dim or self.num_features

    def input_contract(self) -> dict[str, Any]:
        """How an RGB image becomes this model's input: what a consumer of the model must do."""
        return {
            "image_size": self.image_size,
            "resize": self.resize,
            "mean": list(self.mean),
            "std": list(self.std),
            "channels": "RGB",
            "layout": "NCHW float32, (uint8 / 255 - mean) / std",
        }


def autocast(device: torch.device):
    """The precision the network runs in, in training, evaluation and serving alike: bf16 autocast
    on GPU, plain fp32 on CPU. Thresholds calibrated on a GPU are applied to a GPU's served
    scores computed the same way."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def normalize(
    images: torch.Tensor, mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD
) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float32 ``(x / 255 - mean) / std`` on the images' device (the input contract).

    Always float32, also under autocast (the model's autocast casts at its first layer). Float
    input is refused: pixels already scaled to [0, 1] would be divided by 255 a second time.
    """
    if images.is_floating_point():
        raise ValueError(f"normalize takes uint8 pixels (0-255), got {images.dtype}")
    mean_t = torch.tensor(mean, device=images.device, dtype=torch.float32).view(1, -1, 1, 1)
    std_t = torch.tensor(std, device=images.device, dtype=torch.float32).view(1, -1, 1, 1)
    return (images.to(torch.float32) / 255.0 - mean_t) / std_t


class DropPath(nn.Module):
    """Stochastic depth: drop a residual branch for whole samples during training."""

    def __init__(self, rate: float = 0.0):
        super().__init__()
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rate == 0.0 or not self.training:
            return x
        keep = 1.0 - self.rate
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)  # B, 1, ...
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"rate={self.rate}"


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class PatchEmbed(nn.Module):
    """Non-overlapping patches to tokens: (B, 3, H, W) -> (B, H/p, W/p, C), normalised."""

    def __init__(self, patch_size: int, in_chans: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x).permute(0, 2, 3, 1)  # B, H/p, W/p, C
        return self.norm(x)


class ConvStem(nn.Module):
    """3x3 stride-2 convolutions (BatchNorm, ReLU) down to 1/patch_size, then a 1x1 projection.

    Xiao et al. 2021's stem, a drop-in for the patchify conv: (B, 3, H, W) -> (B, H/p, W/p, C),
    normalised like :class:`PatchEmbed`'s output. ``widths`` are the 3x3 convs' output channels
    (default: doubling up to ``dim``, at least 8).
    """

    def __init__(self, patch_size: int, in_chans: int, dim: int, widths: tuple[int, ...] = ()):
        super().__init__()
        steps = patch_size.bit_length() - 1  # log2(patch_size) stride-2 convolutions
        widths = widths or tuple(max(dim // 2 ** (steps - i), 8) for i in range(1, steps + 1))
        layers: list[nn.Module] = []
        previous = in_chans
        for width in widths:
            layers += [
                nn.Conv2d(previous, width, kernel_size=3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
            ]
            previous = width
        self.convs = nn.Sequential(*layers)
        self.proj = nn.Conv2d(previous, dim, kernel_size=1)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.convs(x)  # B, widths[-1], H/p, W/p
        x = self.proj(x).permute(0, 2, 3, 1)  # B, H/p, W/p, C
        return self.norm(x)


class PatchMerging(nn.Module):
    """Concatenate each 2x2 group of tokens and project: (B, H, W, C) -> (B, H/2, W/2, 2C)."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, out_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        x = x.view(B, H // 2, 2, W // 2, 2, C)  # B, H/2, dy, W/2, dx, C
        # Channel groups in Swin's order (dy, dx) = (0, 0), (1, 0), (0, 1), (1, 1): dx outer, dy inner.
        x = x.permute(0, 1, 3, 4, 2, 5).reshape(B, H // 2, W // 2, 4 * C)  # B, H/2, W/2, 4C
        return self.reduction(self.norm(x))


class CrossWindowAttention(nn.Module):
    """Every token attends to the nW window summaries of its image; gated head outputs.

    The gate is per channel and starts at zero; it scales the values (nW per image, so the
    multiplication is cheap), which scales the output by the same factor.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.gate = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor, summaries: torch.Tensor) -> torch.Tensor:
        """x: (B*nW, N, C) tokens, one image's windows together; summaries: (B, nW, C) -> (B*nW, N, nH, hd).

        Which window a token sits in does not matter here, so the (possibly shifted) windows of the
        in-window attention serve as they are: each image's B*nW rows are one sequence of nW*N queries.
        """
        B_, N, C = x.shape
        B, hd = summaries.shape[0], C // self.num_heads
        q = self.q(x).view(B, -1, self.num_heads, hd).transpose(1, 2)  # B, nH, nW*N, hd
        k, v = self.kv(summaries).view(B, -1, 2, C).unbind(2)  # B, nW, C each
        k = k.view(B, -1, self.num_heads, hd).transpose(1, 2)  # B, nH, nW, hd
        v = (v * self.gate).view(B, -1, self.num_heads, hd).transpose(1, 2)  # B, nH, nW, hd
        out = F.scaled_dot_product_attention(q, k, v)  # B, nH, nW*N, hd
        return out.transpose(1, 2).reshape(B_, N, self.num_heads, hd)  # B*nW, N, nH, hd


class WindowAttention(nn.Module):
    """In-window multi-head self-attention with relative-position bias, plus the cross-window part."""

    def __init__(self, dim: int, num_heads: int, window_size: int, qkv_bias: bool, cross_window: bool):
        super().__init__()
        self.num_heads = num_heads
        self.window_size = window_size
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        index = relative_position_index(window_size)  # ws*ws, ws*ws
        self.register_buffer("relative_position_index", index, persistent=False)
        self.cross = CrossWindowAttention(dim, num_heads, qkv_bias) if cross_window else None

    def relative_position_bias(self) -> torch.Tensor:
        N = self.window_size * self.window_size
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]  # N*N, nH
        return bias.view(N, N, -1).permute(2, 0, 1)  # nH, N, N

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, summaries: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x: (B*nW, N, C) windows; mask: (nW, N, N) or None; summaries: (B, nW, C) for the cross part."""
        B_, N, C = x.shape
        qkv = self.qkv(x).view(B_, N, 3, self.num_heads, C // self.num_heads)  # B*nW, N, 3, nH, hd
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # B*nW, nH, N, hd each
        bias = self.relative_position_bias()  # nH, N, N
        if mask is None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.unsqueeze(0))  # B*nW, nH, N, hd
        else:
            # Fold windows into heads so one (nW*nH, N, N) mask broadcasts over the batch instead of being
            # copied for every image.
            nW, hd = mask.shape[0], C // self.num_heads
            q, k, v = (t.reshape(-1, nW * self.num_heads, N, hd) for t in (q, k, v))  # B, nW*nH, N, hd
            attn_mask = (mask.unsqueeze(1) + bias).reshape(1, nW * self.num_heads, N, N)  # 1, nW*nH, N, N
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # B, nW*nH, N, hd
            out = out.reshape(B_, self.num_heads, N, hd)  # B*nW, nH, N, hd (a copy when kernels transpose)
        out = out.transpose(1, 2)  # B*nW, N, nH, hd
        if self.cross is not None and summaries is not None:
            out = out + self.cross(x, summaries)  # B*nW, N, nH, hd
        if torch.compiler.is_exporting():
            # The fused attention kernels traced by torch.export return (B*nW, N, nH, hd) in memory, so
            # the reshape below is traced as a view; ONNX export decomposes attention into matmuls whose
            # output is (B*nW, nH, N, hd) in memory, and that view fails. An explicit contiguous copy
            # holds for both (eager needs none: reshape copies only when it must).
            out = out.clone(memory_format=torch.contiguous_format)
        return self.proj(out.reshape(B_, N, C))  # B*nW, N, C


class MlTrBlock(nn.Module):
    """Norm, (shifted) window attention + cross-window attention, residual; norm, MLP, residual."""

    def __init__(
        self,
        dim: int,
        resolution: int,
        num_heads: int,
        window_size: int,
        shifted: bool,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        cross_window: bool = True,
        drop_path: float = 0.0,
    ):
        super().__init__()
        self.resolution = resolution
        self.window_size, shift = stage_window(resolution, window_size)
        self.shift_size = shift if shifted else 0
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, num_heads, self.window_size, qkv_bias, cross_window)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path)
        mask = None
        if self.shift_size:
            mask = shifted_window_mask(resolution, resolution, self.window_size, self.shift_size)  # nW, N, N
        self.register_buffer("attn_mask", mask, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        ws, shift = self.window_size, self.shift_size
        h = self.norm1(x)  # B, H, W, C
        summaries = window_means(h, ws) if self.attn.cross is not None else None  # B, nW, C
        if shift:
            h = torch.roll(h, shifts=(-shift, -shift), dims=(1, 2))
        windows = window_partition(h, ws).view(-1, ws * ws, C)  # B*nW, ws*ws, C
        windows = self.attn(windows, self.attn_mask, summaries)  # B*nW, ws*ws, C
        h = window_reverse(windows.view(-1, ws, ws, C), ws, H, W)  # B, H, W, C
        if shift:
            h = torch.roll(h, shifts=(shift, shift), dims=(1, 2))
        x = x + self.drop_path(h)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class MlTrStage(nn.Module):
    """Patch merging (all but the first stage), then blocks alternating plain and shifted windows."""

    def __init__(
        self,
        in_dim: int,
        dim: int,
        resolution: int,
        depth: int,
        num_heads: int,
        window_size: int,
        downsample: bool,
        mlp_ratio: float,
        qkv_bias: bool,
        cross_window: bool,
        drop_path: list[float],
    ):
        super().__init__()
        self.downsample = PatchMerging(in_dim, dim) if downsample else nn.Identity()
        self.blocks = nn.Sequential(
            *[
                MlTrBlock(
                    dim,
                    resolution,
                    num_heads,
                    window_size,
                    shifted=i % 2 == 1,
                    mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias,
                    cross_window=cross_window,
                    drop_path=drop_path[i],
                )
                for i in range(depth)
            ]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.downsample(x))


class PoolHead(nn.Module):
    """Global average pooling over the final tokens and a linear classifier."""

    def __init__(self, dim: int, num_classes: int, drop_rate: float = 0.0):
        super().__init__()
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.drop(x.mean(dim=(1, 2)))  # B, C
        return x if pre_logits else self.fc(x)


class QueryHead(nn.Module):
    """One learned query per class cross-attends to the final tokens; a per-class linear reads it out.

    A decoder layer without self-attention (ML-Decoder): tokens are projected to the decoder
    width, queries attend to them, then an MLP; class k's logit is the dot product of its output
    with its own weight vector plus a bias (ML-Decoder's group FC with one query per class).
    """

    def __init__(self, dim: int, num_classes: int, decoder_dim: int, num_heads: int, drop_rate: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        self.proj_in = nn.Linear(dim, decoder_dim)
        self.queries = nn.Parameter(torch.zeros(num_classes, decoder_dim))
        self.q = nn.Linear(decoder_dim, decoder_dim)
        self.kv = nn.Linear(decoder_dim, 2 * decoder_dim)
        self.proj = nn.Linear(decoder_dim, decoder_dim)
        self.norm1 = nn.LayerNorm(decoder_dim)
        self.mlp = Mlp(decoder_dim, 4 * decoder_dim)
        self.norm2 = nn.LayerNorm(decoder_dim)
        self.drop = nn.Dropout(drop_rate)
        self.weight = nn.Parameter(torch.zeros(num_classes, decoder_dim))
        self.bias = nn.Parameter(torch.zeros(num_classes))

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        B = x.shape[0]
        K, D = self.queries.shape
        hd = D // self.num_heads
        tokens = self.proj_in(x.flatten(1, 2))  # B, L, D
        kv = self.kv(tokens).view(B, -1, 2, self.num_heads, hd)  # B, L, 2, nH, hd
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)  # B, nH, L, hd each
        q = self.q(self.queries).view(1, K, self.num_heads, hd).transpose(1, 2)  # 1, nH, K, hd
        q = q.expand(B, -1, -1, -1)  # B, nH, K, hd
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, K, D)  # B, K, D
        y = self.norm1(self.queries + self.proj(out))  # B, K, D
        y = self.norm2(y + self.mlp(y))  # B, K, D
        y = self.drop(y)
        return y if pre_logits else (y * self.weight).sum(-1) + self.bias  # B, K


def _init_weights(module: nn.Module) -> None:
    """Swin's initialisation: truncated normal (std 0.02) linear weights and tables, zero biases."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    elif isinstance(module, WindowAttention):
        nn.init.trunc_normal_(module.relative_position_bias_table, std=0.02)
    elif isinstance(module, QueryHead):
        nn.init.trunc_normal_(module.queries, std=0.02)
        nn.init.trunc_normal_(module.weight, std=0.02)


class MlTr(nn.Module):
    """Patch embedding, four stages of MlTr blocks, final norm, and a classification head."""

    def __init__(self, config: MlTrConfig):
        super().__init__()
        self.config = config
        self.num_classes = config.num_classes
        self.num_features = config.num_features
        dims = config.stage_dims
        resolutions = stage_resolutions(config.image_size, config.patch_size, len(config.depths))
        total = sum(config.depths)
        rates = [config.drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        self.patch_embed: nn.Module
        if config.stem == "conv":
            self.patch_embed = ConvStem(config.patch_size, config.in_chans, dims[0], config.stem_widths)
        else:
            self.patch_embed = PatchEmbed(config.patch_size, config.in_chans, dims[0])
        self.layers = nn.Sequential(
            *[
                MlTrStage(
                    in_dim=dims[max(i - 1, 0)],
                    dim=dims[i],
                    resolution=resolutions[i],
                    depth=config.depths[i],
                    num_heads=config.num_heads[i],
                    window_size=config.window_size,
                    downsample=i > 0,
                    mlp_ratio=config.mlp_ratio,
                    qkv_bias=config.qkv_bias,
                    cross_window=config.cross_window,
                    drop_path=rates[sum(config.depths[:i]) : sum(config.depths[: i + 1])],
                )
                for i in range(len(config.depths))
            ]
        )
        self.norm = nn.LayerNorm(self.num_features)
        if config.head == "pool":
            self.head: nn.Module = PoolHead(self.num_features, config.num_classes, config.drop_rate)
        else:
            self.head = QueryHead(
                self.num_features,
                config.num_classes,
                config.decoder_dim,
                config.query_heads,
                config.drop_rate,
            )
        self.apply(_init_weights)

    def no_weight_decay(self) -> set[str]:
        """Relative-position tables, class queries, and every 1-D parameter (norms, biases, gates)."""
        return {
            name
            for name, p in self.named_parameters()
            if p.ndim <= 1 or name.endswith(("relative_position_bias_table", "queries"))
        }

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) images -> (B, H/32, W/32, C) final-stage tokens after the last norm."""
        size, chans = self.config.image_size, self.config.in_chans
        if x.ndim != 4 or x.shape[1:] != (chans, size, size):
            raise ValueError(f"expected images of shape (B, {chans}, {size}, {size}), got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(
                f"expected normalised float images, got {x.dtype}: apply mltr.model.normalize first"
            )
        x = self.patch_embed(x)  # B, H/p, W/p, C
        x = self.layers(x)  # B, H/32, W/32, C_last
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        # The head in float32 whatever autocast runs the backbone in: bf16 logits (8 bits of
        # mantissa) tie many scores, which moves average precision and the thresholds calibrated on it.
        with torch.autocast(x.device.type, enabled=False):
            return self.head(x.float(), pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def resize_relative_position_table(table: torch.Tensor, window_size: int) -> torch.Tensor:
    """Bicubic resampling of a ((2w-1)^2, nH) relative-position table to window ``window_size``."""
    side = round(table.shape[0] ** 0.5)
    if side * side != table.shape[0]:
        raise ValueError(f"relative-position table of {table.shape[0]} rows is not a square window's")
    new_side = 2 * window_size - 1
    if side == new_side:
        return table
    grid = table.float().T.reshape(1, -1, side, side)  # 1, nH, 2w-1, 2w-1
    grid = F.interpolate(grid, size=(new_side, new_side), mode="bicubic", align_corners=False)  # 1, nH, ...
    return grid.reshape(-1, new_side * new_side).T.contiguous().to(table.dtype)  # (2w'-1)^2, nH


def _unwrap_state_dict(state_dict: Mapping[str, Any]) -> Mapping[str, Any]:
    for wrapper in ("model", "state_dict"):
        if isinstance(state_dict.get(wrapper), Mapping):
            state_dict = state_dict[wrapper]
    return state_dict


def convert_state_dict(state_dict: Mapping[str, Any], model: MlTr) -> dict[str, torch.Tensor]:
    """Map a Microsoft Swin, timm Swin or MlTr state dict onto ``model``'s keys and shapes.

    MlTr's keys are timm's (patch merging at the start of stage i+1). Microsoft checkpoints put it
    at the end of stage i (``layers.0.downsample`` exists) and name the classifier ``head``; both
    are renamed, as in timm's ``checkpoint_filter_fn``. The 4C channel order of patch merging is the
    same in both (timm's permute reproduces Microsoft's x0, x1, x2, x3 concatenation), so weights
    need no reordering. Buffers (``relative_position_index``, ``attn_mask``) are dropped; a
    ``module.`` prefix (DDP) is removed; relative-position tables are resampled (bicubic) to the
    model's windows. Keys are not checked against the model here (:func:`mltr.load_pretrained` does).
    """
    state_dict = _unwrap_state_dict(state_dict)
    if all(k.startswith("module.") for k in state_dict):
        state_dict = {k[len("module.") :]: v for k, v in state_dict.items()}
    microsoft = any(k.startswith("layers.0.downsample.") for k in state_dict)
    targets = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key.endswith(("relative_position_index", "attn_mask")):
            continue
        if microsoft:
            key = re.sub(r"^layers\.(\d+)\.downsample", lambda m: f"layers.{int(m[1]) + 1}.downsample", key)
            key = re.sub(r"^head\.(weight|bias)$", r"head.fc.\1", key)
        table = key.endswith("relative_position_bias_table") and key in targets
        # Another window size resamples; another number of heads is left for the caller to report.
        if table and value.shape != targets[key].shape and value.shape[1] == targets[key].shape[1]:
            window = model.get_submodule(key.rsplit(".", 1)[0]).window_size
            value = resize_relative_position_table(value, window)
        out[key] = value
    return out


VARIANTS: dict[str, MlTrConfig] = {
    # Trains on a CPU in seconds: tests, the demo and smoke runs (64 to 128 px images). The conv
    # stem learns far faster from scratch than the patch stem: docs/tiny-model.md has the evidence.
    "mltr_tiny": MlTrConfig(
        image_size=64,
        window_size=4,
        embed_dim=32,
        depths=(2, 2, 2, 2),
        num_heads=(2, 4, 8, 16),
        drop_path_rate=0.0,
        stem="conv",
        stem_widths=(32, 64),
    ),
    # Swin-T layout, 224 px, window 7.
    "mltr_s": MlTrConfig(
        image_size=224,
        window_size=7,
        embed_dim=96,
        depths=(2, 2, 6, 2),
        num_heads=(3, 6, 12, 24),
        drop_path_rate=0.1,
    ),
    # Swin-S layout, 384 px, window 12.
    "mltr_m": MlTrConfig(
        image_size=384,
        window_size=12,
        embed_dim=96,
        depths=(2, 2, 18, 2),
        num_heads=(3, 6, 12, 24),
        drop_path_rate=0.2,
    ),
    # Swin-B layout, 384 px, window 12.
    "mltr_l": MlTrConfig(
        image_size=384,
        window_size=12,
        embed_dim=128,
        depths=(2, 2, 18, 2),
        num_heads=(4, 8, 16, 32),
        drop_path_rate=0.3,
    ),
    # Swin-L layout, 384 px, window 12.
    "mltr_xl": MlTrConfig(
        image_size=384,
        window_size=12,
        embed_dim=192,
        depths=(2, 2, 18, 2),
        num_heads=(6, 12, 24, 48),
        drop_path_rate=0.3,
    ),
}


def list_models() -> list[str]:
    return list(VARIANTS)


def create_model(name: str, **overrides: Any) -> MlTr:
    """Build a named variant; any :class:`MlTrConfig` field can be overridden (``window_size=12``, ...)."""
    if name not in VARIANTS:
        raise ConfigError(f"unknown model {name!r}; choose one of: {', '.join(VARIANTS)}")
    fields = {f.name for f in dataclasses.fields(MlTrConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise TypeError(f"unknown MlTrConfig field(s) {unknown}; known: {', '.join(sorted(fields))}")
    return MlTr(dataclasses.replace(VARIANTS[name], **overrides))
