"""Sampling from a training run (sora_model/sample.py): three aspect ratios and an image in one
packed batch, written as MP4 and GIF through the streaming decode; a progress bar unless
--no-progress; the sizes a sample takes follow the VAE's compression and the DiT's patch (a run
trained and sampled with a VAE of compression 2 in time and 4 in space); clear argument errors."""
import itertools
import json
import os

import pytest
import torch

from sora_kernels.testing.memory import peak_bytes
from sora_model import sample as sm
from sora_model import train as tr
from sora_model.data import latent_tokens
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


# compression 2 in time and 4 in space (the tiny VAE's are 4 and 8): one stage fewer, one
# temporal down-sample
OTHER_VAE = {"channel_mults": (1, 2, 2), "temporal_down": (True, False), "latent_channels": 8}


def test_sizes_follow_the_vae_and_the_patch():
    tiny, other = vae_config("tiny"), vae_config("tiny", **OTHER_VAE)
    assert (other.temporal_compression, other.spatial_compression) == (2, 4)
    for vae, patch, size in [(tiny, (1, 2, 2), (13, 64, 96)), (tiny, (1, 1, 1), (5, 24, 40)),
                             (other, (1, 2, 2), (3, 24, 40)), (other, (1, 1, 1), (7, 4, 12)),
                             (tiny, (2, 2, 2), (5, 32, 32))]:
        assert sm.size_problem(size, vae, patch) is None, (vae, patch, size)
    for vae, patch, size, why in [
            (tiny, (1, 2, 2), (4, 32, 32), "frames must be 1 + 4k (the VAE's temporal compression is 4), got 4"),
            (tiny, (1, 2, 2), (5, 24, 32),
             "height must be a positive multiple of 16 (the VAE's spatial compression 8 x the DiT's patch 2), got 24"),
            (tiny, (1, 1, 1), (5, 24, 36),
             "width must be a positive multiple of 8 (the VAE's spatial compression 8 x the DiT's patch 1), got 36"),
            (other, (1, 2, 2), (5, 24, 36),
             "width must be a positive multiple of 8 (the VAE's spatial compression 4 x the DiT's patch 2), got 36"),
            (other, (1, 2, 2), (4, 24, 40), "frames must be 1 + 2k (the VAE's temporal compression is 2), got 4"),
            (tiny, (2, 2, 2), (9, 32, 32), "frames must be 1 + 4k with 1 + k a multiple of 2 (the DiT's patch takes "
                                           "2 latent frames), got 9: 3 latent frames")]:
        assert sm.size_problem(size, vae, patch) == why


def test_sample_with_another_vae(tmp_path):
    """A run trained on a VAE of compression (2, 4) and 8 latent channels samples 3-frame clips
    and 8-pixel multiples (which the tiny VAE would refuse) with a DiT of 8 input channels, and
    refuses the tiny VAE, a size this VAE cannot take, and (train) a config whose compression
    or channels are not its VAE's."""
    pytest.importorskip("av", reason="video I/O needs PyAV (the dev extra installs it)")
    from sora_model.train_vae import load_checkpoint
    from sora_model.video_io import read_video
    torch.manual_seed(0)
    vae_file, tiny_file = str(tmp_path / "vae.safetensors"), str(tmp_path / "tiny.safetensors")
    save_vae(vae_file, VideoAutoencoder(vae_config("tiny", **OTHER_VAE)), 0)
    save_vae(tiny_file, VideoAutoencoder(vae_config("tiny")), 0)
    vae = load_checkpoint(vae_file)
    run = str(tmp_path / "run")
    with pytest.raises(ValueError, match=r"cfg.temporal_compression, cfg.spatial_compression, cfg.latent_channels: "
                                         r"expected the VAE's \(2, 4, 8\), got \(4, 8, 16\)"):
        tr.train(tr.TrainConfig(steps=1), vae, run, progress=False)
    # sora-train takes the compression from --vae; the physics world's largest clips (13 x 48 x 48)
    # are 7 x 6 x 6 = 252 tokens through this VAE
    tr.main(["--vae", vae_file, "--out", run, "--steps", "1", "--budget", "256", "--max-tokens", "64", "--device",
             "cpu", "--no-progress"])
    cfg = sm.run_config(run)
    assert (cfg.temporal_compression, cfg.spatial_compression, cfg.latent_channels) == (2, 4, 8)
    assert sm.load_run(run).dit.cfg.in_channels == 8
    with open(os.path.join(run, "log.jsonl")) as f:
        logged = json.loads(f.readline())["tokens"]
    assert 0 < logged <= 256          # packed in this VAE's tokens
    assert logged == sum(latent_tokens(v.shape, (1, 2, 2), 2, 4) for v, _ in tr.step_batch(cfg, 0, (1, 2, 2)))
    sizes = ["3x24x40", "1x16x24"]
    args = ["--run", run, "--vae", vae_file, "--prompt", "a ball", "--steps", "1", "--method", "euler", "--out",
            str(tmp_path / "out"), "--device", "cpu", "--no-progress"]
    sm.main(args + [a for s in sizes for a in ("--size", s)])
    for i, size in enumerate(sizes):
        frames, _ = read_video(str(tmp_path / "out" / f"sample_{i}.mp4"))
        assert tuple(frames.shape) == (*map(int, size.split("x")), 3)
    with pytest.raises(ValueError, match=r"--size 5x24x36: width must be a positive multiple of 8 \(the VAE's "
                                         r"spatial compression 4 x the DiT's patch 2\), got 36"):
        sm.main(args + ["--size", "5x24x36"])
    with pytest.raises(ValueError, match=r"--vae: expected a VAE of the run's \(temporal compression, spatial "
                                         r"compression, latent channels\) = \(2, 4, 8\), got \(4, 8, 16\)"):
        sm.main([a if a != vae_file else tiny_file for a in args] + ["--size", "3x24x40"])
    with pytest.raises(ValueError, match=r"sizes\[1\]: frames must be 1 \+ 2k"):
        sm.generate(sm.load_run(run), vae, ["a", "b"], [(3, 24, 40), (4, 24, 40)], steps=1)


def test_argument_errors(tmp_path, capsys):
    for bad in ("5x32", "0x32x32", "5x32x0", "5x32x32x1"):
        with pytest.raises(SystemExit):
            sm.parse_args(["--run", "r", "--vae", "v", "--prompt", "p", "--size", bad])
    # steps and guidance are checked before the run and the VAE load (guidance NaN or inf would
    # make every velocity NaN and write NaN videos)
    for flag, value, message in (("--steps", "0", "--steps: expected a positive int, got 0"),
                                 ("--guidance", "nan", "--guidance: expected a finite number, got nan"),
                                 ("--guidance", "inf", "--guidance: expected a finite number, got inf")):
        capsys.readouterr()
        with pytest.raises(SystemExit):
            sm.parse_args(["--run", "r", "--vae", "v", "--prompt", "p", "--size", "1x16x16", flag, value])
        assert message in capsys.readouterr().err
    # which sizes a run takes depends on its VAE and DiT (size_problem, after they are loaded)
    assert sm.parse_args(["--run", "r", "--vae", "v", "--prompt", "p", "--size", "4x30x32"]).size == [(4, 30, 32)]
    with pytest.raises(SystemExit):
        sm.parse_args(["--run", "r", "--vae", "v", "--prompt", "a", "--prompt", "b", "--size", "1x16x16",
                       "--size", "1x16x16", "--size", "1x16x16"])
    with pytest.raises(ValueError, match="run: no checkpoint.safetensors in"):
        sm.load_run(str(tmp_path))


def test_sample_streams_to_the_files_within_a_budget(tmp_path, monkeypatch):
    """sora-sample writes each chunk the streaming decode yields (2 latent frames: 5 then 8
    frames of a 13-frame sample) and never the whole video at once; --max-memory-gb picks the
    decode's chunk for the budget (1 latent frame: 1 + 4 + 4 + 4 frames), with the frames of
    the unbounded decode, and the decode's measured peak within the budget (decoded with
    autograd, each chunk's graph lived on through the carried frames: 9.6x over); a budget no
    plan fits is an error naming the flag before sampling; a decode that fails part-way leaves
    no file."""
    pytest.importorskip("av", reason="video I/O needs PyAV (the dev extra installs it)")
    from sora_model import video_io
    from sora_model.train_vae import load_checkpoint
    torch.manual_seed(0)
    vae_file, run = str(tmp_path / "vae.safetensors"), str(tmp_path / "run")
    save_vae(vae_file, VideoAutoencoder(vae_config("tiny")), 0)
    tr.train(tr.TrainConfig(steps=1, budget=128, max_tokens=64), load_checkpoint(vae_file), run, progress=False)
    vae = load_checkpoint(vae_file).eval()
    z = torch.empty(1, 16, 4, 4, 6)
    one = vae.plan_decode(z, 1, None, 1.0, keep_output=False).estimate_bytes
    two = vae.plan_decode(z, 2, None, 1.0, keep_output=False).estimate_bytes
    assert one < two
    budget = one / 2 ** 30
    assert vae.plan_decode(z, None, None, budget, keep_output=False).chunk_frames == 1
    written = []
    write = video_io.VideoWriter.write
    monkeypatch.setattr(video_io.VideoWriter, "write",
                        lambda self, frames: written.append((self.ext, frames.shape[0])) or write(self, frames))
    args = ["--run", run, "--vae", vae_file, "--prompt", "a ball", "--size", "13x32x48", "--steps", "1", "--method",
            "euler", "--device", "cpu", "--no-progress"]
    sm.main(args + ["--out", str(tmp_path / "a")])
    assert [n for ext, n in written if ext == ".mp4"] == [5, 8]
    written.clear()
    sm.main(args + ["--out", str(tmp_path / "b"), "--max-memory-gb", str(budget)])
    assert [n for ext, n in written if ext == ".mp4"] == [1, 4, 4, 4]
    assert [n for ext, n in written if ext == ".gif"] == [1, 4, 4, 4]
    model = sm.load_run(run)
    plain = sm.generate(model, vae, ["a ball"], [(13, 32, 48)], steps=1, method="euler")[0]
    bounded = sm.generate(model, vae, ["a ball"], [(13, 32, 48)], steps=1, method="euler", max_memory_gb=budget)[0]
    assert plain.shape == bounded.shape == (13, 32, 48, 3)
    assert (plain.int() - bounded.int()).abs().max() <= 1                 # exact decodes, up to rounding
    assert all(p.requires_grad for p in vae.parameters())                 # as load_checkpoint gives them
    latent = torch.randn(16, 4, 4, 6)
    assert 0 < peak_bytes(lambda: list(sm.decode_frames(vae, latent, budget)), torch.device("cpu")) <= one
    assert torch.is_grad_enabled()
    real = sm.decode_frames

    def failing(*a):
        yield from itertools.islice(real(*a), 1)
        raise RuntimeError("the decode failed")
    monkeypatch.setattr(sm, "decode_frames", failing)
    with pytest.raises(RuntimeError, match="the decode failed"):
        sm.main(args + ["--out", str(tmp_path / "d")])
    assert os.listdir(tmp_path / "d") == []
    monkeypatch.setattr(sm, "decode_frames", real)
    monkeypatch.setattr(sm, "sample_latents", lambda *a, **k: pytest.fail("sampled before the budget was checked"))
    with pytest.raises(ValueError, match=r"--max-memory-gb: 0.001 GB is below the smallest estimated peak, "
                                         r"[0-9.]+ GB \(chunk_frames=1"):
        sm.main(args + ["--out", str(tmp_path / "c"), "--max-memory-gb", "0.001"])
    with pytest.raises(SystemExit):
        sm.parse_args(args + ["--max-memory-gb", "0"])
    with pytest.raises(SystemExit):
        sm.parse_args(args + ["--fps", "0"])


def test_sampling_shift_base(tmp_path, monkeypatch, capsys):
    """shift_base_tokens (sora-sample --shift-base-tokens) is the sampling schedule's shift base,
    256 by default whatever the run trained with: it reaches diffusion.sample and changes the
    latents of a trained model; a value that is no positive int is an error naming it."""
    import sora_model.diffusion as diffusion
    from sora_model.train_vae import load_checkpoint
    torch.manual_seed(0)
    vae_file = str(tmp_path / "vae.safetensors")
    save_vae(vae_file, VideoAutoencoder(vae_config("tiny")), 0)
    vae = load_checkpoint(vae_file)
    tr.train(tr.TrainConfig(steps=1, budget=128, max_tokens=64, shift_base_tokens=32), vae, str(tmp_path / "run"),
             progress=False)
    model = sm.load_run(str(tmp_path / "run"), ema=False)     # the trained weights: v is not 0
    schedules = []
    monkeypatch.setattr(sm, "sample", lambda *a, cfg, **k: schedules.append(cfg) or diffusion.sample(*a, cfg=cfg, **k))
    default = sm.sample_latents(model, vae, ["a ball"], [(5, 32, 32)], steps=2)
    shifted = sm.sample_latents(model, vae, ["a ball"], [(5, 32, 32)], steps=2, shift_base_tokens=8)
    assert schedules == [diffusion.FlowConfig(), diffusion.FlowConfig(base_tokens=8)]
    assert not torch.equal(default[0], shifted[0])
    for bad in (0, 2.5):
        with pytest.raises(ValueError, match=rf"shift_base_tokens: expected a positive int \(latent tokens\), got "
                                             rf"{bad}"):
            sm.sample_latents(model, vae, ["a ball"], [(5, 32, 32)], steps=2, shift_base_tokens=bad)
    with pytest.raises(SystemExit):
        sm.parse_args(["--run", "r", "--vae", "v", "--prompt", "p", "--size", "1x16x16", "--shift-base-tokens", "0"])
    assert "--shift-base-tokens: expected a positive int (latent tokens), got 0" in capsys.readouterr().err

    # generate's argument and sora-sample's flag reach sample_latents (stopped there: the rest is
    # test_sample_mixed_sizes')
    class Sampled(Exception):
        pass

    def stop(*args, shift_base_tokens, **kwargs):
        raise Sampled(shift_base_tokens)
    monkeypatch.setattr(sm, "sample_latents", stop)
    with pytest.raises(Sampled) as got:
        sm.generate(model, vae, ["a ball"], [(5, 32, 32)], steps=2, shift_base_tokens=8)
    assert got.value.args == (8,)
    pytest.importorskip("av", reason="sora-sample checks for PyAV before sampling")
    with pytest.raises(Sampled) as got:
        sm.main(["--run", str(tmp_path / "run"), "--vae", vae_file, "--prompt", "p", "--size", "1x32x32",
                 "--device", "cpu", "--no-progress", "--shift-base-tokens", "64"])
    assert got.value.args == (64,)
