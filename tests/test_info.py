"""`cvlab info`: exact parameter counts, FLOPs from torch's counter, a per-stage table that adds up."""
from __future__ import annotations

import torchvision
from torch.utils.flop_counter import FlopCounterMode

from cvlab.run.info import run_info
from cvlab.utils.config import check_overrides


def test_info_resnet50_at_imagenet_size_matches_torchvision_exactly():
    import torch

    summary = run_info(check_overrides("train", ["model=resnet50", "data=synthetic"]))
    assert summary["params"] == 25_557_032
    reference = torchvision.models.resnet50().eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        reference(torch.zeros(1, 3, 224, 224))
    assert summary["flops"] == counter.get_total_flops()  # 8.18 GFLOPs: 2 x 4.09 G multiply-adds
    assert sum(params for _, params, _, _ in summary["stages"]) == summary["params"]
    assert sum(flops for _, _, _, flops in summary["stages"]) == summary["flops"]
    shapes = {name: shape for name, _, shape, _ in summary["stages"]}
    assert shapes["layer4"] == "2048x7x7" and shapes["fc"] == "1000"


def test_info_on_the_embedded_default_uses_the_small_stem(cli_here):
    result = cli_here("info", "model=resnet18")
    assert result.returncode == 0, result.stderr
    assert "11,172,810 parameters" in result.stdout  # 1 input channel, 10 classes, 3x3 stem
    assert "1x8x8" in result.stdout


def test_attention_flops_are_counted_on_the_cpu():
    # torch's counter has no formula for the CPU's fused attention kernel; describe_model runs the math backend.
    from torch import nn

    from cvlab.engine.profiling import describe_model

    class Attention(nn.Module):
        def forward(self, x):  # x: [1, C, H, W] -> 2 heads over H*W tokens of C/2 channels
            tokens = x.flatten(2).transpose(1, 2).reshape(1, -1, 2, x.shape[1] // 2).transpose(1, 2)
            return nn.functional.scaled_dot_product_attention(tokens, tokens, tokens)

    _, flops, _ = describe_model(Attention(), in_chans=8, image_size=4)
    tokens, heads, head_dim = 16, 2, 4
    assert flops == 2 * (2 * heads * tokens * tokens * head_dim)  # Q·Kᵀ and A·V, one multiply-add = 2


def test_info_on_a_gan_counts_one_generated_image_and_one_discriminator_score():
    """A GAN has no forward: info runs its generator on one latent and its discriminator on one image, a row each
    (StyleGAN2 hands its modulated weights on as inputs, which the counter's gradient hooks once tripped over)."""
    import torch

    from cvlab.engine.profiling import describe_model
    from cvlab.models import create_model

    for name in ("progan", "stylegan2"):
        options = {"w_dim": 16} if name == "stylegan2" else {}
        model = create_model(name, image_size=8, in_chans=1, num_classes=10, latent_dim=16, fmap_base=32,
                             fmap_max=16, **options)
        params, flops, rows = describe_model(model, in_chans=1, image_size=8)
        assert [row[0] for row in rows] == ["generator", "discriminator"] and rows[0][2] == "1x8x8"
        assert params == sum(row[1] for row in rows) == sum(p.numel() for p in model.parameters())
        assert flops == rows[0][3] + rows[1][3] and min(rows[0][3], rows[1][3]) > 0
        generator_only = torch.utils.flop_counter.FlopCounterMode(display=False)
        with torch.no_grad(), generator_only:
            model.generator.requires_grad_(False)(model.sample_latents(1, device="cpu"))
        assert rows[0][3] == generator_only.get_total_flops()
        assert all(p.requires_grad for p in model.discriminator.parameters())  # left as it was
