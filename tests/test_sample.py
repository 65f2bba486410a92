"""Sampling from a training run (sora_model/sample.py): three aspect ratios and an image in one
packed batch, written as MP4 and GIF through the streaming decode; a progress bar unless
--no-progress; clear argument errors."""
import os

import pytest
import torch

from sora_model import sample as sm
from sora_model import train as tr
from sora_model.train_vae import save_checkpoint as save_vae
from sora_model.vae import VideoAutoencoder, vae_config

pytestmark = pytest.mark.usefixtures("native_kernels")


def test_sample_mixed_sizes(tmp_path, capfd):
    pytest.importorskip("av", reason="video I/O needs PyAV (the dev extra installs it)")
    from sora_model.train_vae import load_checkpoint
    from sora_model.video_io import read_video
    torch.manual_seed(0)
    vae_file = str(tmp_path / "vae.safetensors")
    save_vae(vae_file, VideoAutoencoder(vae_config("tiny")), 0)
    tr.train(tr.TrainConfig(steps=1, budget=128, max_tokens=64), load_checkpoint(vae_file), str(tmp_path / "run"),
             progress=False)
    sizes = ["5x32x48", "9x48x32", "5x32x64", "1x32x32"]
    paths = sm.main(["--run", str(tmp_path / "run"), "--vae", vae_file, "--prompt", "a small red ball falls",
                     *[a for s in sizes for a in ("--size", s)], "--steps", "2", "--out", str(tmp_path / "out"),
                     "--device", "cpu", "--no-progress"])
    assert len(paths) == 8
    assert "sample:" not in capfd.readouterr().err
    for i, size in enumerate(sizes):
        T, H, W = map(int, size.split("x"))
        frames, _ = read_video(str(tmp_path / "out" / f"sample_{i}.mp4"))
        assert tuple(frames.shape) == (T, H, W, 3)
        assert os.path.exists(tmp_path / "out" / f"sample_{i}.gif")
        assert open(tmp_path / "out" / f"sample_{i}.txt").read() == "a small red ball falls\n"
    # without --no-progress a bar counts the sampling steps
    sm.main(["--run", str(tmp_path / "run"), "--vae", vae_file, "--prompt", "a ball", "--size", "1x32x32",
             "--steps", "3", "--method", "euler", "--out", str(tmp_path / "bar"), "--device", "cpu"])
    err = capfd.readouterr().err
    assert "sample: 100%" in err and "3/3" in err, err


def test_argument_errors(tmp_path):
    for bad in ("4x32x32", "5x30x32", "5x32"):
        with pytest.raises(SystemExit):
            sm.parse_args(["--run", "r", "--vae", "v", "--prompt", "p", "--size", bad])
    with pytest.raises(SystemExit):
        sm.parse_args(["--run", "r", "--vae", "v", "--prompt", "a", "--prompt", "b", "--size", "1x16x16",
                       "--size", "1x16x16", "--size", "1x16x16"])
    with pytest.raises(ValueError, match="run: no checkpoint.safetensors in"):
        sm.load_run(str(tmp_path))
