"""The optional adversarial term of VAE training: the 3D PatchGAN's logit grid, the hinge
losses, a discriminator that learns to tell clips from noise, and train_vae with the term on
(discriminator updated) and off (untouched)."""
import copy

import pytest
import torch

from sora_model.data import synthetic_videos
from sora_model.discriminator import (DiscriminatorConfig, PatchDiscriminator3D, discriminator_hinge_loss,
                                      generator_hinge_loss)

pytestmark = pytest.mark.usefixtures("native_kernels")


def test_logit_grid_and_losses():
    disc = PatchDiscriminator3D(DiscriminatorConfig(channels=8, layers=3))
    assert disc(torch.zeros(2, 3, 5, 32, 48)).shape == (2, 1, 5, 4, 6)
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.0])
    assert discriminator_hinge_loss(real, fake).item() == pytest.approx(0.25 + 0.5)
    assert generator_hinge_loss(fake).item() == pytest.approx(1.0)


def test_discriminator_learns_clips_from_noise():
    torch.manual_seed(0)
    disc = PatchDiscriminator3D(DiscriminatorConfig(channels=8, layers=2))
    opt = torch.optim.AdamW(disc.parameters(), lr=2e-3, betas=(0.5, 0.9))
    clips = synthetic_videos(5, 16, 16, seed=1)
    losses = []
    for _ in range(40):
        real = torch.stack([next(clips) for _ in range(4)])
        fake = torch.rand_like(real) * 2 - 1
        loss = discriminator_hinge_loss(disc(real), disc(fake))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    # 2.0 is the loss of logits at 0 (chance); the last steps must be at most half of it
    assert sum(losses[:5]) / 5 > 1.5 and sum(losses[-5:]) / 5 < 1.0, losses


@pytest.mark.parametrize("weight, start, updated", [(0.5, 3, True), (0.0, 0, False), (0.5, 100, False)])
def test_train_vae_adversarial(tmp_path, weight, start, updated):
    from sora_model import train_vae
    args = train_vae.parse_args(["--config", "tiny", "--frames", "5", "--size", "16", "--batch", "2", "--steps", "5",
                                 "--out", str(tmp_path / "vae.safetensors"), "--device", "cpu", "--no-progress",
                                 "--adv-weight", str(weight), "--adv-start", str(start)])
    disc = PatchDiscriminator3D(DiscriminatorConfig(channels=8, layers=2))
    before = copy.deepcopy(disc.state_dict())
    losses = train_vae.train(args, discriminator=disc)
    assert len(losses) == 5 and all(torch.isfinite(torch.tensor(losses)))
    changed = any(not torch.equal(before[k], v) for k, v in disc.state_dict().items())
    assert changed == updated
    assert all(p.requires_grad for p in disc.parameters())


def test_adv_weight_error():
    from sora_model import train_vae
    with pytest.raises(SystemExit):
        train_vae.parse_args(["--adv-weight", "-1"])
