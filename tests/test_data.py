"""The DiT's data (sora_model/data.py): latent token counts, clips fitted to a token bound
(frames to 1 + 4k, downscaled with the aspect ratio kept, never cropped), first-fit-decreasing
token batches with no padding, captioned clips from a JSONL manifest, all of it for a VAE of
other compression factors and a DiT patch of 2 frames too (clips the VAE takes, latents the
patch divides), clear errors."""
import itertools
import json
import os

import pytest
import torch

from sora_model.data import (captioned_clips, captioned_videos, first_fit_decreasing, fit_to_tokens, fitted_shape,
                              latent_tokens, token_batches)
from sora_model.physics_world import WorldConfig, physics_clips


def test_latent_tokens():
    assert latent_tokens((3, 9, 64, 96)) == 3 * 4 * 6
    assert latent_tokens((3, 1, 32, 32)) == 4
    assert latent_tokens((3, 9, 64, 96), patch_size=(1, 1, 1)) == 3 * 8 * 12


def test_fit_to_tokens():
    video = torch.rand(3, 11, 64, 160) * 2 - 1
    same = fit_to_tokens(video, max_tokens=10_000)
    assert same.shape == (3, 9, 64, 160) and torch.equal(same, video[:, :9])       # 11 frames -> 9 = 1 + 4 * 2
    small = fit_to_tokens(video, max_tokens=40)
    T, H, W = small.shape[1:]
    assert latent_tokens(small.shape) <= 40 and H % 16 == 0 and W % 16 == 0
    assert abs(W / H - 160 / 64) <= 16 / H                                         # aspect kept (to a 16-pixel unit)
    expected = torch.nn.functional.interpolate(video[:, :9].transpose(0, 1), size=(H, W), mode="bilinear",
                                               antialias=True).transpose(0, 1)
    torch.testing.assert_close(small, expected)                                    # the whole frame: no crop
    with pytest.raises(ValueError, match="smaller than one token"):
        fit_to_tokens(torch.zeros(3, 1, 8, 64), 100)
    with pytest.raises(ValueError, match="max_tokens: 2 is fewer than"):
        fit_to_tokens(torch.zeros(3, 9, 16, 160), 2)


def test_first_fit_decreasing():
    bins = first_fit_decreasing([5, 3, 7, 2, 4, 1], 8)
    assert sorted(i for b in bins for i in b) == list(range(6))
    assert all(sum([5, 3, 7, 2, 4, 1][i] for i in b) <= 8 for b in bins) and len(bins) == 3   # 22 tokens, optimal
    with pytest.raises(ValueError, match="item 1: 9 tokens, over the batch budget of 8"):
        first_fit_decreasing([3, 9], 8)


def test_token_batches_mixed_sizes_no_padding():
    cfg = WorldConfig(sizes=((64, 64), (64, 96), (96, 64), (32, 128)), frames=(1, 5, 9))
    clips = list(itertools.islice(physics_clips(cfg, seed=0), 50))
    batches = list(token_batches(clips, budget=256, window=16))
    used = [id(v) for b in batches for v, _ in b]
    assert sorted(used) == sorted(id(v) for v, _ in clips)                         # every clip once
    sizes = [sum(latent_tokens(v.shape) for v, _ in b) for b in batches]
    assert max(sizes) <= 256 and sum(sizes) / len(sizes) > 0.8 * 256              # full batches
    assert any(len({tuple(v.shape) for v, _ in b}) > 1 for b in batches)           # mixed sizes together


def test_captioned_manifest(tmp_path):
    pytest.importorskip("av", reason="video I/O needs PyAV (the dev extra installs it)")
    from sora_model.video_io import write_video
    frames = (torch.rand(6, 48, 80, 3) * 255).to(torch.uint8)
    write_video(str(tmp_path / "clip.mp4"), frames, fps=8)
    write_video(str(tmp_path / "still.gif"), frames[:1], fps=8)
    lines = [{"path": "clip.mp4", "caption": "noise"}, {"path": "still.gif", "caption": "an image"}]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(e) for e in lines) + "\n")
    got = dict((c, v) for v, c in itertools.islice(captioned_videos(str(tmp_path / "m.jsonl"), max_tokens=20), 2))
    assert set(got) == {"noise", "an image"}
    assert got["an image"].shape[1] == 1 and got["noise"].shape[1] == 5
    for v in got.values():
        assert v.shape[2] % 16 == 0 and v.shape[3] % 16 == 0 and latent_tokens(v.shape) <= 20
    (tmp_path / "bad.jsonl").write_text(json.dumps({"path": "clip.mp4"}) + "\n")
    with pytest.raises(ValueError, match=r"manifest '.*bad.jsonl' line 1 \('clip.mp4'\): \"caption\": expected a "
                                         r"non-empty string, got none"):
        next(captioned_videos(str(tmp_path / "bad.jsonl"), 20))


def test_token_batches_window_smaller_than_a_batch():
    """A window whose clips all fit one batch takes more clips (an endless source, a budget
    several clips wide: it used to loop on the same window forever)."""
    batches = token_batches(physics_clips(WorldConfig(), seed=1), budget=128, window=2)
    for batch in itertools.islice(batches, 3):
        assert 64 < sum(latent_tokens(v.shape) for v, _ in batch) <= 128 and len(batch) > 2


def test_token_batches_clip_over_the_budget():
    """A clip over the budget is named by its place in the caller's stream, its caption and
    shape, as it is drawn: not by its index inside a window, after the batches before it."""
    small = [(torch.zeros(3, 1, 32, 32), f"small {i}") for i in range(40)]     # 4 tokens each
    big = (torch.zeros(3, 1, 128, 128), "a big one")                           # 64 tokens
    with pytest.raises(ValueError, match=r"clips: clip 40 \('a big one', shape \(3, 1, 128, 128\)\) has 64 latent "
                                         r"tokens, over the batch budget of 16"):
        list(token_batches(small + [big], budget=16, window=8))


def test_fitted_shape_is_fit_to_tokens_shape():
    for shape, bound in [((3, 9, 64, 96), 10_000), ((3, 11, 64, 96), 40), ((3, 1, 200, 100), 30), ((3, 6, 48, 80), 20)]:
        assert fitted_shape(shape, bound) == tuple(fit_to_tokens(torch.zeros(shape), bound).shape)


def _manifest(tmp_path, n=6):
    from sora_model.video_io import write_video
    lines = []
    for i in range(n):   # mixed durations and sizes, MP4 and GIF
        T, H, W = [(6, 48, 80), (1, 32, 32), (9, 64, 48), (5, 32, 96)][i % 4]
        name = f"clip{i}.{'gif' if i % 2 else 'mp4'}"
        write_video(str(tmp_path / name), (torch.rand(T, H, W, 3) * 255).to(torch.uint8), fps=8)
        lines.append({"path": name, "caption": f"clip {i}"})
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(e) for e in lines) + "\n")
    return str(tmp_path / "m.jsonl")


def test_manifest_shapes_come_from_metadata(tmp_path):
    """captioned_clips knows every clip's shape without decoding it, and it is the shape the
    decoded clip has."""
    pytest.importorskip("av", reason="video I/O needs PyAV (the dev extra installs it)")
    import sora_model.video_io as video_io
    manifest = _manifest(tmp_path)
    read = video_io.read_video
    video_io.read_video = None           # nothing may decode while the clips are listed
    try:
        clips = list(itertools.islice(captioned_clips(manifest, max_tokens=24), 6))
    finally:
        video_io.read_video = read
    assert len({c.path for c, _ in clips}) == 6
    for clip, _ in clips:
        assert tuple(clip.load().shape) == clip.shape
    probe = video_io.probe_video
    video_io.probe_video = None          # a second pass (a later training step) reuses the probes
    try:
        again = list(itertools.islice(captioned_clips(manifest, max_tokens=24, seed=5), 6))
    finally:
        video_io.probe_video = probe
    assert {c.path: c.shape for c, _ in again} == {c.path: c.shape for c, _ in clips}


def test_manifest_batch_decodes_only_its_clips(tmp_path, monkeypatch):
    """A training step on a manifest packs the window's clips by their metadata and decodes only
    the clips of the batch it returns."""
    pytest.importorskip("av", reason="video I/O needs PyAV (the dev extra installs it)")
    import sora_model.video_io as video_io
    from sora_model.train import TrainConfig, step_batch
    manifest = _manifest(tmp_path, n=8)
    decoded = []
    read = video_io.read_video
    monkeypatch.setattr(video_io, "read_video", lambda path, **kw: decoded.append(path) or read(path, **kw))
    batch = step_batch(TrainConfig(data=manifest, budget=24, max_tokens=24), 0, (1, 2, 2))
    assert 0 < sum(latent_tokens(v.shape) for v, _ in batch) <= 24
    assert len(decoded) == len(batch) < 16                     # the window holds 16 clips


# a VAE of compression 2 in time and 4 in space (the tiny VAE's are 4 and 8)
OTHER_VAE = {"channel_mults": (1, 2, 2), "temporal_down": (True, False)}


def test_other_compression_and_patch():
    assert latent_tokens((3, 9, 32, 48), temporal=2, spatial=4) == 5 * 4 * 6
    assert latent_tokens((3, 9, 32, 48), patch_size=(1, 1, 1), temporal=8, spatial=4) == 2 * 8 * 12
    assert fitted_shape((3, 12, 32, 48), 10_000, temporal=2, spatial=4) == (3, 11, 32, 48)
    assert fitted_shape((3, 12, 32, 48), 10_000, temporal=8, spatial=4) == (3, 9, 32, 48)
    assert fitted_shape((3, 5, 36, 44), 10_000, (1, 1, 1), temporal=2, spatial=4) == (3, 5, 36, 44)   # 4-pixel units
    assert fitted_shape((3, 5, 36, 44), 10_000, (1, 2, 2), temporal=2, spatial=4) == (3, 5, 32, 40)   # 8-pixel units
    # a patch of 2 latent frames: 13 frames are 4 latent frames, 12 are 3 -> 2 (5 frames)
    assert fitted_shape((3, 13, 32, 32), 10_000, (2, 2, 2)) == (3, 13, 32, 32)
    assert fitted_shape((3, 12, 32, 32), 10_000, (2, 2, 2)) == (3, 5, 32, 32)
    small = fitted_shape((3, 9, 64, 96), 30, temporal=2, spatial=4)
    assert latent_tokens(small, temporal=2, spatial=4) <= 30 and small[2] % 8 == 0 and small[3] % 8 == 0
    for shape, bound, kw in [((3, 11, 64, 96), 40, dict(temporal=2, spatial=4)), ((3, 13, 40, 56), 10_000,
                                                                                   dict(patch_size=(2, 2, 2)))]:
        assert fitted_shape(shape, bound, **kw) == tuple(fit_to_tokens(torch.zeros(shape), bound, **kw).shape)
    with pytest.raises(ValueError, match=r"video: \(3, 1, 32, 32\) is smaller than one token \(5 frames of 16x16 "
                                         r"pixels: the VAE's compression 4 in time and 8 in space, the DiT's patch "
                                         r"\(2, 2, 2\)\)"):
        fitted_shape((3, 1, 32, 32), 100, (2, 2, 2))
    with pytest.raises(ValueError, match=r"video: \(3, 1, 4, 8\) is smaller than one token \(1 frame of 8x8 pixels"):
        fitted_shape((3, 1, 4, 8), 100, temporal=2, spatial=4)
    with pytest.raises(ValueError, match="temporal: expected the VAE's temporal_compression, a positive int, got 0"):
        latent_tokens((3, 9, 32, 32), temporal=0)


@pytest.mark.usefixtures("native_kernels")
def test_fitted_clips_are_what_the_vae_and_the_dit_take():
    """A clip fitted for a VAE of compression (2, 4) and a DiT patch encodes without error, to a
    latent the patch divides, of latent_tokens tokens."""
    from sora_model.vae import VideoAutoencoder, vae_config
    torch.manual_seed(0)
    vae = VideoAutoencoder(vae_config("tiny", **OTHER_VAE)).eval()
    tc, sc = vae.cfg.temporal_compression, vae.cfg.spatial_compression
    for shape, patch in [((3, 8, 30, 44), (1, 2, 2)), ((3, 6, 30, 44), (2, 1, 1))]:
        video = fit_to_tokens(torch.rand(shape) * 2 - 1, 10_000, patch, tc, sc)
        with torch.no_grad():
            z = vae.encode(video[None]).mode()[0]
        assert all(n % p == 0 for n, p in zip(z.shape[1:], patch)), (shape, patch, z.shape)
        tokens = z.shape[1] // patch[0] * (z.shape[2] // patch[1]) * (z.shape[3] // patch[2])
        assert tokens == latent_tokens(video.shape, patch, tc, sc)


def test_token_batches_count_with_the_vaes_compression():
    """Batches of physics clips counted for a VAE of compression (2, 4): each clip has 2 to 7
    times its (4, 8) tokens, and every batch stays within the budget in those."""
    clips = list(itertools.islice(physics_clips(WorldConfig(), seed=0), 24))
    batches = list(token_batches(clips, budget=512, window=8, temporal=2, spatial=4))
    sizes = [sum(latent_tokens(v.shape, temporal=2, spatial=4) for v, _ in b) for b in batches]
    assert sum(len(b) for b in batches) == 24 and max(sizes) <= 512 and sum(sizes) / len(sizes) > 0.8 * 512
    assert sum(latent_tokens(v.shape) for v, _ in clips) * 2 < sum(sizes)


def test_manifest_clips_for_another_vae(tmp_path, monkeypatch):
    """A training step on a manifest with a VAE of compression (2, 4) fits the clips with it: 4
    frames become 3 (not 1), 40 x 56 pixels stay (8-pixel units, not 16), and the batch's
    clips are what that VAE takes, within the budget in its tokens."""
    pytest.importorskip("av", reason="video I/O needs PyAV (the dev extra installs it)")
    from sora_model.train import TrainConfig, step_batch
    from sora_model.video_io import write_video
    write_video(str(tmp_path / "clip.mp4"), (torch.rand(4, 40, 56, 3) * 255).to(torch.uint8), fps=8)
    (tmp_path / "m.jsonl").write_text(json.dumps({"path": "clip.mp4", "caption": "noise"}) + "\n")
    clip, _ = next(captioned_clips(str(tmp_path / "m.jsonl"), 1000, temporal=2, spatial=4))
    assert clip.shape == (3, 3, 40, 56) and tuple(clip.load().shape) == clip.shape
    cfg = TrainConfig(data=str(tmp_path / "m.jsonl"), budget=200, max_tokens=200, temporal_compression=2,
                      spatial_compression=4)
    batch = step_batch(cfg, 0, (1, 2, 2))
    assert all(tuple(v.shape) == (3, 3, 40, 56) for v, _ in batch)
    assert sum(latent_tokens(v.shape, temporal=2, spatial=4) for v, _ in batch) <= 200


def test_downscale_keeps_the_aspect_ratio():
    """A clip over the bound goes to the unit grid within it whose long side is the nearest (at
    most half a unit off) to its short side times the clip's aspect ratio, the most tokens of
    those: what the unit grid allows. (Rounding each side down on its own gave 9 frames of
    1080 x 1920 -> 96 x 192 at 256 tokens, aspect 1.78 -> 2.0, and 40 x 1000 -> 16 x 640 at 64,
    aspect 25 -> 40.)"""
    assert fitted_shape((3, 9, 1080, 1920), 256) == (3, 9, 112, 192)              # 3 * 84 tokens, aspect 1.71
    assert fitted_shape((3, 1, 1080, 1920), 256) == (3, 1, 192, 336)              # 252 tokens, aspect 1.75
    assert fitted_shape((3, 1, 1920, 1080), 256) == (3, 1, 336, 192)
    assert fitted_shape((3, 1, 40, 1000), 64) == (3, 1, 16, 400)                  # aspect 25 exactly
    assert fitted_shape((3, 1, 1000, 40), 64) == (3, 1, 400, 16)
    g = torch.Generator().manual_seed(0)
    shapes = [(3, 1, 1080, 1920), (3, 1, 40, 1000), (3, 9, 720, 1280), (3, 13, 100, 3000), (3, 5, 333, 517)]
    shapes += [(3, int(torch.randint(1, 14, (1,), generator=g)), *torch.randint(16, 1200, (2,), generator=g).tolist())
               for _ in range(40)]
    for shape in shapes:
        for flip in (False, True):
            C, T, H, W = (*shape[:2], shape[3], shape[2]) if flip else shape
            for patch, spatial in [((1, 2, 2), 8), ((1, 1, 1), 8), ((1, 2, 2), 4)]:
                unit = spatial * patch[1]
                native = latent_tokens((C, T, H, W), patch, spatial=spatial)
                frames = 1 + (T - 1) // 4
                for bound in (frames * 3, 64, 256, 1000):
                    if bound >= native:
                        continue
                    # the reference: every unit grid within the bound whose long side is within half a unit
                    # of the short side times the aspect ratio; the most tokens of those
                    ratio = max(H, W) / min(H, W)
                    grids = [(a, b) for a in range(1, min(H, W) // unit + 1) for b in range(1, max(H, W) // unit + 1)
                             if abs(b - a * ratio) <= 0.5]
                    best = max((a * b for a, b in grids if frames * a * b <= bound), default=0)
                    if not best:
                        with pytest.raises(ValueError, match=rf"max_tokens: {bound} is fewer than the "
                                                             rf"{frames * min(a * b for a, b in grids)} tokens"):
                            fitted_shape((C, T, H, W), bound, patch, spatial=spatial)
                        continue
                    _, _, h, w = fitted_shape((C, T, H, W), bound, patch, spatial=spatial)
                    what = ((C, T, H, W), bound, patch, spatial, (h, w))
                    assert h % unit == 0 and w % unit == 0 and h <= H and w <= W, what
                    assert latent_tokens((C, T, h, w), patch, spatial=spatial) == frames * best <= bound, what
                    short, long = (h, w) if H <= W else (w, h)
                    assert abs(long - short * ratio) <= unit / 2 + 1e-9, what             # half a unit at most


def test_max_tokens_must_be_positive():
    for bad in (-5, 0, 2.5, True):
        with pytest.raises(ValueError, match=rf"max_tokens: expected a positive int \(latent tokens per clip\), "
                                             rf"got {bad!r}"):
            fitted_shape((3, 9, 64, 96), bad)
    with pytest.raises(ValueError, match=r"max_tokens: expected a positive int .* got -5"):
        next(captioned_clips("no-such-manifest.jsonl", -5))


def test_manifest_lines_are_checked_when_it_is_read(tmp_path):
    """Every line is checked before the first clip, whatever the random order: an entry that is
    not an object, a missing file, a file that is not a video, a clip smaller than one token,
    one whose frames alone are over max_tokens; each error names the manifest, the line and the
    file."""
    pytest.importorskip("av", reason="video I/O needs PyAV (the dev extra installs it)")
    from sora_model.video_io import write_video
    write_video(str(tmp_path / "ok.gif"), (torch.rand(1, 32, 48, 3) * 255).to(torch.uint8), fps=8)   # 2 tokens at least
    write_video(str(tmp_path / "thin.gif"), (torch.rand(1, 8, 64, 3) * 255).to(torch.uint8), fps=8)
    write_video(str(tmp_path / "long.mp4"), (torch.rand(13, 32, 32, 3) * 255).to(torch.uint8), fps=8)
    (tmp_path / "text.mp4").write_text("not a video")
    good = [json.dumps({"path": "ok.gif", "caption": f"ok {i}"}) for i in range(5)]
    cases = [('["a.mp4", "cap"]', r"line 6: expected a JSON object \{\"path\": ..., \"caption\": ...\}, got an array"),
             ('"str"', r"line 6: expected a JSON object .*, got a string"),
             ("null", r"line 6: expected a JSON object .*, got null"),
             ('{"path": 3, "caption": "c"}', r"line 6: \"path\": expected the clip's file .*, got 3"),
             ('{"caption": "c"}', r"line 6: \"path\": expected the clip's file .*, got none"),
             (json.dumps({"path": "gone.mp4", "caption": "c"}), r"line 6 \('gone.mp4'\): no such file '.*gone.mp4'"),
             (json.dumps({"path": "text.mp4", "caption": "c"}), r"line 6 \('text.mp4'\): "),
             (json.dumps({"path": "thin.gif", "caption": "c"}),
              r"line 6 \('thin.gif'\): video: \(3, 1, 8, 64\) is smaller than one token"),
             (json.dumps({"path": "long.mp4", "caption": "c"}),
              r"line 6 \('long.mp4'\): max_tokens: 3 is fewer than the 4 tokens")]
    for n, (line, message) in enumerate(cases):
        manifest = tmp_path / f"m{n}.jsonl"
        manifest.write_text("\n".join(good + [line]) + "\n")
        for seed in range(3):      # the bad line last: a check on use would yield good clips first
            with pytest.raises(ValueError, match=rf"manifest '{manifest}' {message}"):
                next(captioned_clips(str(manifest), 3, seed=seed))
    with pytest.raises(ValueError, match=r"manifest: expected a JSONL file .* got '.*nothing.jsonl' \(no such file\)"):
        next(captioned_clips(str(tmp_path / "nothing.jsonl"), 64))


def test_manifest_clip_shapes_follow_their_files(tmp_path):
    """The manifest's checks are cached per manifest version, but each clip's shape is its file's
    when the clip is drawn: a file rewritten at another size gives the new shape, a removed one
    an error naming the line."""
    pytest.importorskip("av", reason="video I/O needs PyAV (the dev extra installs it)")
    from sora_model.video_io import write_video
    clip = tmp_path / "clip.gif"
    write_video(str(clip), (torch.rand(1, 32, 48, 3) * 255).to(torch.uint8), fps=8)
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"path": "clip.gif", "caption": "c"}) + "\n")
    assert next(captioned_clips(str(manifest), 64))[0].shape == (3, 1, 32, 48)
    os.remove(clip)
    write_video(str(clip), (torch.rand(1, 64, 64, 3) * 255).to(torch.uint8), fps=8)
    drawn, _ = next(captioned_clips(str(manifest), 64))
    assert drawn.shape == (3, 1, 64, 64)
    assert drawn.load().shape == (3, 1, 64, 64)
    os.remove(clip)
    clips = captioned_clips(str(manifest), 64)
    with pytest.raises(ValueError, match=rf"manifest '{manifest}' line 1 \('clip.gif'\): .*No such file"):
        next(clips)
