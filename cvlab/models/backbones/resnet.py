"""ResNet and ResNeXt classification backbones.

Papers:
    He et al. 2016, "Deep Residual Learning for Image Recognition" (ResNet).
    Xie et al. 2017, "Aggregated Residual Transformations for Deep Neural Networks" (ResNeXt: grouped 3×3 convolution
    in the bottleneck, "cardinality" = number of groups).

The layout follows torchvision's ResNet v1.5 (the stride of a downsampling bottleneck sits on its 3×3 conv, not the
first 1×1), and the module names are torchvision's (``conv1``/``bn1``/``layer1``..``layer4``/``fc``; blocks
``conv1``, ``bn1``, ``conv2``, ``bn2``, (``conv3``, ``bn3``), ``downsample``), so a torchvision ``state_dict`` loads
unchanged. ``bn*`` keep their names even when ``norm_layer`` makes them another norm.

cvlab's additions on top of the papers: a small-image stem, the deep stem of He et al. 2019, "Bag of Tricks for
Image Classification with Convolutional Neural Networks" (ResNet-C: three 3×3 convs in place of the 7×7, timm's
``stem_type="deep"`` and MMSegmentation's ResNetV1c layout), dilated (atrous) stages for ``output_stride`` 16/8 with
torchvision's ``replace_stride_with_dilation`` semantics, a GDC classifier head, and pluggable norm / activation /
attention.
"""
from __future__ import annotations

import math
from functools import partial

import torch
from torch import nn

from cvlab.layers.conv import make_global_pool
from cvlab.layers.typing import ActFactory, AttnFactory, NormFactory
from cvlab.models._registry import register_model
from cvlab.models.backbones.features import Backbone, FeatureInfo

# Which of layer2, layer3, layer4 trade their stride for dilation, per output stride.
_DILATED_LAYERS = {32: (False, False, False), 16: (False, False, True), 8: (False, True, True)}
_STEMS = ("auto", "standard", "small", "deep")


def _attn_or_identity(attn_layer: AttnFactory | None, chs: int) -> nn.Module:
    return attn_layer(chs) if attn_layer is not None else nn.Identity()


def _deep_stem(in_chans: int, out_chs: int, norm_layer: NormFactory, act_layer: ActFactory) -> nn.Sequential:
    """ResNet-C's ``conv1``: 3×3 convs in → out/2 (stride 2) → out/2 → out; the first two followed by norm and
    activation, the last by the ResNet's own ``bn1`` / ``act1`` (timm's layout: keys ``conv1.0`` .. ``conv1.6``)."""
    half = out_chs // 2
    return nn.Sequential(
        nn.Conv2d(in_chans, half, 3, 2, 1, bias=False), norm_layer(half), act_layer(),
        nn.Conv2d(half, half, 3, 1, 1, bias=False), norm_layer(half), act_layer(),
        nn.Conv2d(half, out_chs, 3, 1, 1, bias=False),
    )


class BasicBlock(nn.Module):
    """Two 3×3 convolutions and an identity (or projected) shortcut: ``act(attn(F(x)) + x)``. ResNet-18/34.

    ``first_dilation`` is the dilation of the conv in the strided position (``conv1``); torchvision gives a layer's
    first block the previous layer's dilation there. ``dilation`` is used for ``conv2``.
    """

    expansion = 1

    def __init__(
        self,
        in_chs: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        groups: int = 1,
        base_width: int = 64,
        dilation: int = 1,
        first_dilation: int | None = None,
        norm_layer: NormFactory = nn.BatchNorm2d,
        act_layer: ActFactory = nn.ReLU,
        attn_layer: AttnFactory | None = None,
    ):
        super().__init__()
        if groups != 1 or base_width != 64:
            raise ValueError("BasicBlock supports only groups=1 and base_width=64 (use Bottleneck for ResNeXt)")
        first_dilation = first_dilation or dilation
        self.conv1 = nn.Conv2d(in_chs, planes, 3, stride, first_dilation, dilation=first_dilation, bias=False)
        self.bn1 = norm_layer(planes)
        self.act1 = act_layer()
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, dilation, dilation=dilation, bias=False)
        self.bn2 = norm_layer(planes)
        self.attn = _attn_or_identity(attn_layer, planes)
        self.downsample = downsample
        self.act2 = act_layer()

    def residual_norm(self) -> nn.Module:
        """The norm ending the residual branch (zeroed by ``zero_init_residual``)."""
        return self.bn2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.attn(self.bn2(self.conv2(out)))
        return self.act2(out + shortcut)


class Bottleneck(nn.Module):
    """1×1 reduce → 3×3 (strided, grouped for ResNeXt) → 1×1 expand (×4), plus shortcut. ResNet-50/101/152, ResNeXt.

    The inner width is ``planes · base_width / 64 · groups`` (ResNeXt-50 32×4d: 32 groups of 4 channels at
    ``planes=64``). The single 3×3 conv sits in the strided position, so it uses ``first_dilation``.
    """

    expansion = 4

    def __init__(
        self,
        in_chs: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        groups: int = 1,
        base_width: int = 64,
        dilation: int = 1,
        first_dilation: int | None = None,
        norm_layer: NormFactory = nn.BatchNorm2d,
        act_layer: ActFactory = nn.ReLU,
        attn_layer: AttnFactory | None = None,
    ):
        super().__init__()
        first_dilation = first_dilation or dilation
        width = int(planes * (base_width / 64.0)) * groups
        out_chs = planes * self.expansion
        self.conv1 = nn.Conv2d(in_chs, width, 1, bias=False)
        self.bn1 = norm_layer(width)
        self.act1 = act_layer()
        self.conv2 = nn.Conv2d(
            width, width, 3, stride, first_dilation, dilation=first_dilation, groups=groups, bias=False
        )
        self.bn2 = norm_layer(width)
        self.act2 = act_layer()
        self.conv3 = nn.Conv2d(width, out_chs, 1, bias=False)
        self.bn3 = norm_layer(out_chs)
        self.attn = _attn_or_identity(attn_layer, out_chs)
        self.downsample = downsample
        self.act3 = act_layer()

    def residual_norm(self) -> nn.Module:
        """The norm ending the residual branch (zeroed by ``zero_init_residual``)."""
        return self.bn3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.act2(self.bn2(self.conv2(out)))
        out = self.attn(self.bn3(self.conv3(out)))
        return self.act3(out + shortcut)


def _is_affine_norm(module: nn.Module) -> bool:
    norm_types = (nn.BatchNorm2d, nn.GroupNorm, nn.InstanceNorm2d, nn.LayerNorm)
    return isinstance(module, norm_types) and getattr(module, "weight", None) is not None


def init_conv_norm_(model: nn.Module) -> None:
    """torchvision's CNN init: conv weights Kaiming-normal (fan_out, ReLU gain), conv biases 0, norm weight 1 /
    bias 0."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif _is_affine_norm(module):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


def conv_output_size(size: int, strides: list[int]) -> int:
    """Spatial size after convs / pools padded 'same'-style: each stride s maps H to ceil(H / s)."""
    for stride in strides:
        size = math.ceil(size / stride)
    return size


def use_small_stem(stem: str, image_size: int) -> bool:
    """Resolve the ``stem`` option shared by the CNNs: ``"auto"`` picks the small-image stem when image_size <= 64."""
    if stem not in ("auto", "standard", "small"):
        raise ValueError(f"unknown stem {stem!r}; choose 'auto', 'standard' or 'small'")
    return stem == "small" or (stem == "auto" and image_size <= 64)


class ResNet(Backbone):
    """ResNet / ResNeXt: stem → layer1..layer4 (64, 128, 256, 512 planes × expansion) → pool → fc.

    ==================  ==========  ===============  ============
    variant             block       layers           params (1k)
    ==================  ==========  ===============  ============
    resnet18            Basic       2, 2, 2, 2       11,689,512
    resnet34            Basic       3, 4, 6, 3       21,797,672
    resnet50            Bottleneck  3, 4, 6, 3       25,557,032
    resnet101           Bottleneck  3, 4, 23, 3      44,549,160
    resnet152           Bottleneck  3, 8, 36, 3      60,192,808
    resnext50_32x4d     Bottleneck  3, 4, 6, 3       25,028,904
    resnext101_32x8d    Bottleneck  3, 4, 23, 3      88,791,336
    ==================  ==========  ===============  ============

    Args:
        stem: ``"standard"`` (7×7 stride-2 conv + 3×3 stride-2 max-pool, stride 4), ``"small"`` (3×3 stride-1 conv,
            no pool: for 8–64 px inputs), ``"auto"`` (small when ``image_size <= 64``) or ``"deep"`` (ResNet-C:
            3×3 convs to 32 (stride 2), 32, 64 channels, each but the last followed by norm + activation, then
            ``bn1`` / ``act1`` / max-pool as in the standard stem; stride 4, +19,232 parameters at 3 input channels:
            resnet50 25,576,264; timm's ``resnet50d`` has this stem, and its average-pool shortcuts add none).
        output_stride: 32, or 16 / 8 to replace the stride of layer4 / layers 3 and 4 by dilation (same weights,
            larger feature map; for segmentation).
        head: ``"gap"`` (global average pool) or ``"gdc"`` (global depthwise conv sized from ``image_size``).
        groups, width_per_group: ResNeXt cardinality and channels per group (Bottleneck only).
        zero_init_residual: start each residual branch's last norm at weight 0, so every block begins as identity.
        drop_rate: dropout before ``fc``.
        norm_layer / act_layer / attn_layer: see the model contract; ``attn_layer(C)`` runs on the residual branch
            after its last norm, before the add.

    ``forward_features(x: Tensor[N, in_chans, H, W]) -> Tensor[N, num_features, h, w]``. Stages (``feature_info``,
    and ``create_model(name, features_only=True)``): ``act1`` (the stem conv's output, before the max-pool), then
    ``layer1``..``layer4``; reductions 2, 4, 8, 16, 32 with the standard stem (output stride 16: 2, 4, 8, 16, 16;
    8: 2, 4, 8, 8, 8) and 1, 1, 2, 4, 8 with the small one.
    """

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: list[int],
        num_classes: int = 1000,
        in_chans: int = 3,
        image_size: int = 224,
        stem: str = "auto",
        output_stride: int = 32,
        head: str = "gap",
        groups: int = 1,
        width_per_group: int = 64,
        zero_init_residual: bool = False,
        drop_rate: float = 0.0,
        norm_layer: NormFactory | None = None,
        act_layer: ActFactory | None = None,
        attn_layer: AttnFactory | None = None,
    ):
        super().__init__()
        if output_stride not in _DILATED_LAYERS:
            raise ValueError(f"output_stride must be one of {sorted(_DILATED_LAYERS)}, got {output_stride}")
        norm_layer = norm_layer or nn.BatchNorm2d
        act_layer = act_layer or partial(nn.ReLU, inplace=True)
        block_kwargs = dict(
            groups=groups, base_width=width_per_group, norm_layer=norm_layer, act_layer=act_layer, attn_layer=attn_layer
        )

        stem_chs = 64
        if stem not in _STEMS:
            raise ValueError(f"unknown stem {stem!r}; choose one of {', '.join(map(repr, _STEMS))}")
        small = stem != "deep" and use_small_stem(stem, image_size)
        # Registered in forward order (conv1, bn1, act1, maxpool, layer1..4): the feature runner follows it.
        kernel, stride = (3, 1) if small else (7, 2)
        if stem == "deep":
            self.conv1 = _deep_stem(in_chans, stem_chs, norm_layer, act_layer)
        else:
            self.conv1 = nn.Conv2d(in_chans, stem_chs, kernel, stride, kernel // 2, bias=False)
        self.bn1 = norm_layer(stem_chs)
        self.act1 = act_layer()
        self.maxpool = nn.Identity() if small else nn.MaxPool2d(3, 2, 1)
        self.feature_info = FeatureInfo([dict(num_chs=stem_chs, reduction=stride, module="act1")])
        strides = [] if small else [2, 2]

        in_chs, dilation = stem_chs, 1
        dilated = (False, *_DILATED_LAYERS[output_stride])
        for index, (planes, depth) in enumerate(zip((64, 128, 256, 512), layers)):
            stride = 1 if index == 0 else 2
            first_dilation = dilation
            if dilated[index]:
                dilation, stride = dilation * stride, 1
            layer = self._make_layer(block, in_chs, planes, depth, stride, dilation, first_dilation, block_kwargs)
            name = f"layer{index + 1}"
            self.add_module(name, layer)
            in_chs = planes * block.expansion
            strides.append(stride)
            self.feature_info.append(dict(num_chs=in_chs, reduction=math.prod(strides), module=name))

        self.num_features = in_chs
        self.feature_size = conv_output_size(image_size, strides)
        self.global_pool = make_global_pool(head, in_chs, self.feature_size, norm_layer)
        self.drop = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()
        self.fc = nn.Linear(in_chs, num_classes)

        init_conv_norm_(self)
        if zero_init_residual:
            for module in self.modules():
                if isinstance(module, (BasicBlock, Bottleneck)) and _is_affine_norm(module.residual_norm()):
                    nn.init.zeros_(module.residual_norm().weight)

    @staticmethod
    def _make_layer(
        block: type[BasicBlock] | type[Bottleneck],
        in_chs: int,
        planes: int,
        depth: int,
        stride: int,
        dilation: int,
        first_dilation: int,
        block_kwargs: dict,
    ) -> nn.Sequential:
        out_chs = planes * block.expansion
        downsample = None
        if stride != 1 or in_chs != out_chs:
            # Projection shortcut (option B of the paper): 1×1 conv + norm whenever shape changes.
            downsample = nn.Sequential(
                nn.Conv2d(in_chs, out_chs, 1, stride, bias=False), block_kwargs["norm_layer"](out_chs)
            )
        blocks = [block(in_chs, planes, stride, downsample, dilation=dilation, first_dilation=first_dilation,
                        **block_kwargs)]
        blocks += [block(out_chs, planes, dilation=dilation, **block_kwargs) for _ in range(depth - 1)]
        return nn.Sequential(*blocks)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Tensor[N, in_chans, H, W] → Tensor[N, num_features, H / r, W / r] with r the output stride."""
        x = self.maxpool(self.act1(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        """Tensor[N, num_features, h, w] → logits Tensor[N, num_classes]."""
        return self.fc(self.drop(self.global_pool(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _resnet(block: type[BasicBlock] | type[Bottleneck], layers: list[int], **kwargs) -> ResNet:
    return ResNet(block, layers, **kwargs)


@register_model
def resnet18(**kwargs) -> ResNet:
    return _resnet(BasicBlock, [2, 2, 2, 2], **kwargs)


@register_model
def resnet34(**kwargs) -> ResNet:
    return _resnet(BasicBlock, [3, 4, 6, 3], **kwargs)


@register_model
def resnet50(**kwargs) -> ResNet:
    return _resnet(Bottleneck, [3, 4, 6, 3], **kwargs)


@register_model
def resnet101(**kwargs) -> ResNet:
    return _resnet(Bottleneck, [3, 4, 23, 3], **kwargs)


@register_model
def resnet152(**kwargs) -> ResNet:
    return _resnet(Bottleneck, [3, 8, 36, 3], **kwargs)


@register_model
def resnext50_32x4d(**kwargs) -> ResNet:
    return _resnet(Bottleneck, [3, 4, 6, 3], groups=32, width_per_group=4, **kwargs)


@register_model
def resnext101_32x8d(**kwargs) -> ResNet:
    return _resnet(Bottleneck, [3, 4, 23, 3], groups=32, width_per_group=8, **kwargs)
