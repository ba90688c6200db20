"""Structural re-parameterisation: RepVGG's block, trained as three parallel branches, deployed as one 3×3 conv.

Reference: Ding et al. 2021, "RepVGG: Making VGG-style ConvNets Great Again" (``repvgg.py`` of DingXiaoH/RepVGG);
YOLOv6's EfficientRep and YOLOv7's RepConv use the same block.

Training runs ``act(BN(conv3x3(x)) + BN(conv1x1(x)) + BN(x))`` (the identity branch only where the shapes allow
it: ``in_chs == out_chs`` and stride 1). Every branch is linear once its BatchNorm uses running statistics, so in
eval mode their sum is one 3×3 convolution with a bias: each BatchNorm scales its conv's kernel by
``γ / √(σ² + ε)`` and adds ``β − μ·γ / √(σ² + ε)``, the 1×1 kernel is zero-padded to 3×3, and the identity is the
3×3 kernel with a 1 at the centre of its own channel. No library offers this fold for three branches
(``torch.nn.utils.fusion`` folds one conv with its norm), so it is written here.

- In eval mode :class:`RepVGGBlock` runs that single conv, folded from the current weights on each call, so
  validation and ``cvlab eval`` see the deployed network while training can go on.
- :meth:`RepVGGBlock.fuse` (a fuse hook, below) makes the fold permanent: the branches are replaced by one biased
  3×3 conv, as YOLOv6's ``switch_to_deploy``; it is idempotent.

A block whose norm is neither BatchNorm with running statistics nor the identity (``norm=gn``) has no such fold;
it runs and is exported with its branches.

The fuse hook, the deployed form of any network (:func:`fuse_modules`): a module that defines ``fuse()`` (no
arguments) folds its own training-time structure into the ops it infers with, in place and idempotently: RepVGG's
branches here, a conv's BatchNorm (:meth:`cvlab.layers.conv.ConvNormAct.fuse`), YOLOv7's implicit layers. Modules
are fused innermost first, so a block's hook finds its parts fused already: a RepVGG block whose branch convs have
folded their BatchNorms (identity norms now) folds them as they are. `cvlab export` fuses every network it writes
(:func:`cvlab.engine.export.fuse_for_export`); `cvlab eval` and `cvlab predict` fuse a detector's, never one that
trains on.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cvlab.layers.conv import ConvNormAct
from cvlab.layers.typing import ActFactory, NormFactory


def _foldable(norm: nn.Module) -> bool:
    """Whether ``norm`` is linear in eval mode: the identity, or BatchNorm with running statistics."""
    if isinstance(norm, nn.Identity):
        return True
    return isinstance(norm, nn.modules.batchnorm._BatchNorm) and norm.track_running_stats


def _fold(kernel: torch.Tensor, bias: torch.Tensor | None, norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """A conv's (kernel Tensor[O, I, k, k], bias Tensor[O] or None) followed by ``norm`` (eval) as one biased conv."""
    if bias is None:
        bias = kernel.new_zeros(kernel.shape[0])
    if isinstance(norm, nn.Identity):
        return kernel, bias
    weight = norm.weight if norm.affine else torch.ones_like(norm.running_var)
    shift = norm.bias if norm.affine else torch.zeros_like(norm.running_mean)
    scale = weight / torch.sqrt(norm.running_var + norm.eps)
    return kernel * scale.reshape(-1, 1, 1, 1), shift + (bias - norm.running_mean) * scale


class RepVGGBlock(nn.Module):
    """RepVGG's block: Tensor[N, in_chs, H, W] → Tensor[N, out_chs, H / stride, W / stride].

    Branches: ``conv3x3`` (3×3 conv-norm), ``conv1x1`` (1×1 conv-norm, same stride), and ``identity`` (a norm of
    the input, or None when ``in_chs != out_chs`` or ``stride != 1``); their sum goes through the activation.
    After :meth:`fuse` the block holds one biased 3×3 conv, ``reparam``, instead.

    ``norm_layer=None`` means BatchNorm2d; ``act_layer=None`` means ReLU (RepVGG's and YOLOv6's; YOLOv7's RepConv
    passes SiLU; ``nn.Identity`` for none).

    Parameters at ``in_chs == out_chs = C``, stride 1, BatchNorm: ``9C² + C² + 3·2C`` training,
    ``9C² + C`` deployed.
    """

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1, norm_layer: NormFactory | None = None,
                 act_layer: ActFactory | None = None):
        super().__init__()
        norm_layer = norm_layer or nn.BatchNorm2d
        self.in_chs, self.out_chs, self.stride = in_chs, out_chs, stride
        self.conv3x3 = ConvNormAct(in_chs, out_chs, 3, stride, norm_layer=norm_layer)
        self.conv1x1 = ConvNormAct(in_chs, out_chs, 1, stride, norm_layer=norm_layer)
        self.identity = norm_layer(in_chs) if in_chs == out_chs and stride == 1 else None
        self.act = (act_layer or nn.ReLU)()

    @property
    def foldable(self) -> bool:
        """Whether the branches fold into one conv (every norm BatchNorm with running statistics, or identity)."""
        if hasattr(self, "reparam"):
            return True
        norms = [self.conv3x3[1], self.conv1x1[1]] + ([self.identity] if self.identity is not None else [])
        return all(_foldable(norm) for norm in norms)

    def equivalent_kernel_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The eval-mode branches as one conv: (kernel Tensor[out_chs, in_chs, 3, 3], bias Tensor[out_chs])."""
        if hasattr(self, "reparam"):
            return self.reparam.weight, self.reparam.bias
        if not self.foldable:
            raise RuntimeError(f"a RepVGG block with {type(self.conv3x3[1]).__name__} has no single-conv form")
        kernel, bias = _fold(self.conv3x3[0].weight, self.conv3x3[0].bias, self.conv3x3[1])
        kernel1x1, bias1x1 = _fold(self.conv1x1[0].weight, self.conv1x1[0].bias, self.conv1x1[1])
        kernel, bias = kernel + F.pad(kernel1x1, [1, 1, 1, 1]), bias + bias1x1
        if self.identity is not None:
            centre = torch.zeros_like(kernel)
            centre[torch.arange(self.in_chs), torch.arange(self.in_chs), 1, 1] = 1
            kernel_id, bias_id = _fold(centre, None, self.identity)
            kernel, bias = kernel + kernel_id, bias + bias_id
        return kernel, bias

    def forward_branches(self, x: torch.Tensor) -> torch.Tensor:
        """The training form: the activation of the three branches' sum (each norm in its current mode)."""
        out = self.conv3x3(x) + self.conv1x1(x)
        if self.identity is not None:
            out = out + self.identity(x)
        return self.act(out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "reparam"):
            return self.act(self.reparam(x))
        if self.training or not self.foldable:
            return self.forward_branches(x)
        kernel, bias = self.equivalent_kernel_bias()
        return self.act(F.conv2d(x, kernel, bias, self.stride, padding=1))

    def fuse(self) -> None:
        """Replaces the branches by ``reparam``, the one biased 3×3 conv they equal in eval mode, in place (the
        export fuse hook). Needs eval mode (the BatchNorms fold with their running statistics); a block that is
        fused already, or whose norm does not fold, stays as it is."""
        if hasattr(self, "reparam") or not self.foldable:
            return
        if self.training:
            raise RuntimeError("a RepVGG block folds its BatchNorms with their running statistics: call eval() first")
        kernel, bias = self.equivalent_kernel_bias()
        conv = self.conv3x3[0]
        self.reparam = nn.Conv2d(self.in_chs, self.out_chs, 3, self.stride, padding=1, bias=True,
                                 device=kernel.device, dtype=kernel.dtype)
        with torch.no_grad():
            self.reparam.weight.copy_(kernel)
            self.reparam.bias.copy_(bias)
        self.reparam.weight.requires_grad_(conv.weight.requires_grad)
        self.reparam.bias.requires_grad_(conv.weight.requires_grad)
        del self.conv3x3, self.conv1x1, self.identity


def fuse_modules(network: nn.Module, include_root: bool = True) -> list[str]:
    """Calls the fuse hook of every module of ``network`` that defines one (``network`` itself too, unless
    ``include_root`` is False: a network's own hook fusing its parts), innermost first; returns the names of the
    modules fused ("" is the network). ``network`` must be in eval mode (a hook refuses to fold BatchNorms in training
    mode); modules a hook builds join in eval mode."""
    hooks = [(name, module.fuse) for name, module in reversed(list(network.named_modules()))
             if (include_root or module is not network) and callable(getattr(module, "fuse", None))
             and not isinstance(module.fuse, nn.Module)]  # a sub-layer named fuse (SK attention) is no hook
    for _, hook in hooks:
        hook()
    network.train(network.training)  # the new modules (reparam convs, identities) start in training mode
    return [name for name, _ in hooks]

