"""End to end on the physics world (sora_model/e2e.py), shortened for CI: the VAE and DiT losses
fall by stated factors and the generated frames' colours are much closer to the world's than
uniform noise's. (The full run, `python -m sora_model.e2e`, is measured in
benchmarks/results/e2e/.)"""
import os

import pytest

from sora_model.e2e import run

pytestmark = pytest.mark.usefixtures("native_kernels")


def test_physics_world_end_to_end(tmp_path):
    pytest.importorskip("av", reason="samples are written through PyAV")
    # 96 VAE steps: the MSE-trained VAE needs more than 16 to settle on the world's colours (an
    # L1 one got there sooner by collapsing to the background; train_vae.RECON_LOSSES); at 48
    # the samples' colour distance was 0.899 against the bound of 0.902. 120 DiT steps: the
    # mini DiT's batches hold few clips, so its loss is noisy step to step (measured here:
    # 1.76 -> 1.28, colour distance 0.66 against noise's 1.80).
    # The byte-level text encoder: this test runs where MiniLM's weights are not installed.
    m = run(str(tmp_path), vae_steps=96, dit_steps=120, progress=False, text="byte")
    assert m["vae_loss_last"] < m["vae_loss_first"] / 2, m
    assert m["dit_loss_last"] < m["dit_loss_first"] / 1.25, m
    assert m["colour_distance_samples"] < m["colour_distance_noise"] / 2, m
    assert m["colour_distance_data"] < m["colour_distance_samples"], m    # the floor: two sets of world clips
    assert all(os.path.exists(tmp_path / f"sample_{i}.gif") for i in range(4))
    assert set(m["caption_errors"]) == {"own", "shifted", "null"}, m
    assert all(0 < e < m["dit_loss_first"] * 2 for e in m["caption_errors"].values()), m
