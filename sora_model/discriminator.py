"""The optional adversarial term of VAE training: a 3D PatchGAN discriminator and hinge losses.

The discriminator maps a clip [B, 3, T, H, W] to a grid of real/fake logits, one per
spacetime patch (strided 3D convolutions, halving H and W per layer, keeping T), as the
LDM/VQGAN image discriminator does in 2D. The decoder is trained to raise those logits on its
reconstructions (generator hinge: -D(fake)); the discriminator is trained with the hinge
loss relu(1 - D(real)) + relu(1 + D(fake)). Off by default (train_vae --adv-weight 0).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class DiscriminatorConfig:
    in_channels: int = 3
    channels: int = 64
    layers: int = 3           # strided layers: the patch of one logit grows 2x per layer
    groups: int = 16


class PatchDiscriminator3D(nn.Module):
    def __init__(self, cfg: DiscriminatorConfig = DiscriminatorConfig()):
        super().__init__()
        self.cfg = cfg
        blocks: list[nn.Module] = [nn.Conv3d(cfg.in_channels, cfg.channels, (3, 4, 4), (1, 2, 2), 1),
                                   nn.LeakyReLU(0.2)]
        c = cfg.channels
        for _ in range(1, cfg.layers):
            blocks += [nn.Conv3d(c, 2 * c, (3, 4, 4), (1, 2, 2), 1, bias=False),
                       nn.GroupNorm(min(cfg.groups, 2 * c), 2 * c), nn.LeakyReLU(0.2)]
            c *= 2
        blocks.append(nn.Conv3d(c, 1, 3, 1, 1))
        self.net = nn.Sequential(*blocks)
        self.initialize_weights()

    def initialize_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        # video: [B, 3, T, H, W] -> logits [B, 1, T, H / 2^layers, W / 2^layers]
        return self.net(video)


def discriminator_hinge_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    return F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean()


def generator_hinge_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    return -fake_logits.mean()
