"""The causal video autoencoder: shapes for images and videos, chunked (streaming) decoding
equal to the full decode, memory of the streaming decode flat in T, clear errors."""
import pytest
import torch

from conftest import DEVICE
from sora_kernels.testing.memory import peak_bytes
from sora_model import vae as vae_module
from sora_model.vae import CausalConv3d, DecodeState, VideoAutoencoder, to_uint8_frames, vae_config

pytestmark = pytest.mark.usefixtures("native_kernels")


def tiny(seed=0, **overrides):
    torch.manual_seed(seed)
    return VideoAutoencoder(vae_config("tiny", **overrides)).to(DEVICE).eval()


@pytest.mark.parametrize("T, H, W", [(1, 16, 24), (5, 16, 16), (9, 8, 32)])
def test_encode_decode_shapes(T, H, W):
    vae = tiny()
    video = torch.rand(2, 3, T, H, W, device=DEVICE) * 2 - 1
    with torch.no_grad():
        posterior = vae.encode(video)
        assert posterior.mean.shape == (2, 16, 1 + (T - 1) // 4, H // 8, W // 8)
        out = vae.decode(posterior.sample())
    assert out.shape == video.shape
    assert torch.isfinite(posterior.kl())


@pytest.mark.parametrize("grad", [False, True], ids=["inference", "autograd"])
@pytest.mark.parametrize("T", [1, 2, 3, 5])
def test_causal_conv_from_zeros_equals_the_padded_conv(T, grad):
    """A first chunk (zero left padding) skips the taps that would read the zeros: equal to
    Conv3d over the zero-padded input, and it carries the padded input's last frames on."""
    torch.manual_seed(0)
    conv = CausalConv3d(8, 6).to(DEVICE)
    x = torch.randn(2, 8, T, 9, 7, device=DEVICE)
    padded = torch.cat([x.new_zeros(2, 8, 2, 9, 7), x], dim=2)
    expected = torch.nn.functional.conv3d(padded, conv.conv.weight, conv.conv.bias, padding=(0, 1, 1))
    state = DecodeState()
    with torch.set_grad_enabled(grad):
        out = conv(x, state)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state.frames[id(conv)], padded[:, :, -2:], rtol=0, atol=0)
    if grad:  # the weight's gradient flows through the sliced taps
        (g_ours,) = torch.autograd.grad(out.square().sum(), conv.conv.weight)
        (g_ref,) = torch.autograd.grad(expected.square().sum(), conv.conv.weight)
        torch.testing.assert_close(g_ours, g_ref, rtol=1e-4, atol=1e-4)


def _upsampled(x):
    B, C, T, H, W = x.shape
    return torch.nn.functional.interpolate(x.reshape(B, C * T, H, W), scale_factor=2, mode="nearest").reshape(
        B, C, T, 2 * H, 2 * W)


@pytest.mark.parametrize("grad", [False, True], ids=["inference", "autograd"])
@pytest.mark.parametrize("T", [1, 2, 5])
def test_upsampling_conv_equals_nearest_then_conv(T, grad):
    """CausalConv3d(upsample=True), the sub-pixel convolution, equals nearest 2x up-sampling
    then Conv3d over the zero-padded frames, for a first chunk and for a second one that reads
    the carried frames (kept at the input's resolution); gradients of x and the weight too."""
    torch.manual_seed(0)
    conv = CausalConv3d(8, 6, upsample=True).to(DEVICE)
    x1 = torch.randn(2, 8, T, 5, 7, device=DEVICE, requires_grad=grad)
    x2 = torch.randn(2, 8, 3, 5, 7, device=DEVICE)
    state = DecodeState()
    with torch.set_grad_enabled(grad):
        out = torch.cat([conv(x1, state), conv(x2, state)], dim=2)
    assert state.frames[id(conv)].shape == (2, 8, 2, 5, 7)
    with torch.set_grad_enabled(grad):
        _assert_is_conv_of(out, _upsampled(torch.cat([x1, x2], dim=2)), conv, x1, grad)


def _assert_is_conv_of(out, up, conv, x, grad):
    """out equals conv's Conv3d over the frames `up` behind two zero frames (padding 1 in
    space); with grad, so do the gradients of x, the weight and the bias."""
    zeros = up.new_zeros(*up.shape[:2], 2, *up.shape[3:])
    expected = torch.nn.functional.conv3d(torch.cat([zeros, up], dim=2), conv.conv.weight, conv.conv.bias,
                                          padding=(0, 1, 1))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    if grad:
        dout = torch.randn_like(out)
        ours = torch.autograd.grad(out, [x, conv.conv.weight, conv.conv.bias], dout)
        ref = torch.autograd.grad(expected, [x, conv.conv.weight, conv.conv.bias], dout)
        for name, a, b in zip(["x", "weight", "bias"], ours, ref):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("grad", [False, True], ids=["inference", "autograd"])
@pytest.mark.parametrize("chunks", [[1], [2], [5], [1, 1, 1], [1, 3], [2, 1, 2], [3, 2]])
def test_upsampling_in_time_equals_repeat_then_conv(chunks, grad):
    """CausalConv3d(upsample=True, upsample_t=True), the convolution of the frames up-sampled in
    time from the frames themselves, equals Upsample's old way: frame 0 once and every later
    frame twice (repeat_interleave), nearest 2x in space, then the causal Conv3d behind zero
    frames; decoded whole or in chunks (each carrying its last frame, and whether it is the
    video's lone frame 0); gradients of x, the weight and the bias too."""
    torch.manual_seed(0)
    conv = CausalConv3d(8, 6, upsample=True, upsample_t=True).to(DEVICE)
    x = torch.randn(2, 8, sum(chunks), 5, 7, device=DEVICE, requires_grad=grad)
    state = DecodeState()
    with torch.set_grad_enabled(grad):
        parts, t0 = [], 0
        for n in chunks:
            parts.append(conv(x[:, :, t0:t0 + n], state))
            t0 += n
        out = torch.cat(parts, dim=2)
        assert [p.shape[2] for p in parts] == [2 * n - (i == 0) for i, n in enumerate(chunks)]
        frames = torch.cat([x[:, :, :1], x[:, :, 1:].repeat_interleave(2, dim=2)], dim=2)
        _assert_is_conv_of(out, _upsampled(frames), conv, x, grad)


def test_upsampling_conv_needs_a_3x3_stride_1_kernel():
    with pytest.raises(ValueError, match="upsample: needs kernel 3 and stride 1, got kernel 3, stride 2"):
        CausalConv3d(4, 4, stride=2, upsample=True)
    with pytest.raises(ValueError, match="upsample_t: up-sampling in time needs upsample=True"):
        CausalConv3d(4, 4, upsample_t=True)


def test_temporal_upsample_checks_first_against_the_state():
    """The temporal Upsample reads "first chunk" off its state (no carried frame); a caller
    whose `first` says otherwise is an error, not frames up-sampled the wrong way."""
    from sora_model.vae import Upsample
    up = Upsample(4, temporal=True).to(DEVICE)
    x = torch.randn(1, 4, 2, 3, 3, device=DEVICE)
    with pytest.raises(RuntimeError, match="Upsample: first=False, but the state lacks a previous chunk's frame"):
        up(x, None, first=False)
    state = DecodeState()
    assert up(x, state, first=True).shape == (1, 4, 3, 6, 6)
    with pytest.raises(RuntimeError, match="Upsample: first=True, but the state holds a previous chunk's frame"):
        up(x, state, first=True)
    assert up(x, state, first=False).shape == (1, 4, 4, 6, 6)


def test_first_frame_is_encoded_on_its_own():
    """An image is a 1-frame video: the latent of frame 0 does not depend on later frames."""
    vae = tiny()
    video = torch.randn(1, 3, 5, 16, 16, device=DEVICE)
    with torch.no_grad():
        image = vae.encode(video[:, :, :1]).mean
        clip = vae.encode(video).mean
    torch.testing.assert_close(clip[:, :, :1], image, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk", [1, 2, 3])
def test_streaming_decode_equals_full(chunk):
    vae = tiny(seed=1)
    z = torch.randn(1, 16, 5, 2, 3, device=DEVICE)
    with torch.no_grad():
        full = vae.decode(z)
        chunks = list(vae.decode_stream(z, chunk_frames=chunk))
        chunked = vae.decode(z, chunk_frames=chunk)
    assert full.shape == (1, 3, 17, 16, 24)
    sizes = [c.shape[2] for c in chunks]
    assert sizes[0] == 1 + 4 * (min(chunk, 5) - 1) and sum(sizes) == 17
    assert (chunked - full).abs().max().item() <= 1e-4
    assert torch.equal(torch.cat(chunks, dim=2), chunked)


@pytest.mark.skipif(DEVICE.type != "cpu", reason="channels-last convolutions are the CPU inference path's")
def test_cpu_inference_convolves_channels_last(monkeypatch):
    """CPU inference runs every convolution on channels-last-3d tensors (vae.CPU_CHANNELS_LAST;
    oneDNN's faster kernels here), and the decoder's layers keep that layout: at batch 1 (where
    a run of frames is a contiguous view) the latent, conv_in's input, is the only tensor a
    convolution converts, whole or chunked. With it off, contiguous tensors. Decodes (full,
    chunked, tiled) and encodes agree between the two layouts; with autograd on, oneDNN is not
    called."""
    vae = tiny(seed=3)
    z, video = torch.randn(2, 16, 3, 3, 4), torch.rand(2, 3, 9, 16, 24) * 2 - 1
    layout = {True: torch.channels_last_3d, False: torch.contiguous_format}
    names = {m: n for n, m in vae.decoder.named_modules()}
    inside, converted, seen = [], set(), []
    for m in names:                 # the innermost module running: a CausalConv3d, or a ResBlock's skip
        if isinstance(m, (CausalConv3d, vae_module.ResBlock)):
            m.register_forward_pre_hook(lambda m, args: inside.append(names[m]))
            m.register_forward_hook(lambda m, args, out: inside.pop() and None)
    conv3d, onednn = vae_module.conv3d, torch.mkldnn_convolution
    monkeypatch.setattr(vae_module, "conv3d", lambda x, *args: (
        x.is_contiguous(memory_format=layout[vae_module.CPU_CHANNELS_LAST]) or converted.add(inside[-1])) and 0
        or conv3d(x, *args))
    monkeypatch.setattr(torch, "mkldnn_convolution", lambda x, w, *args: seen.append(
        (x.is_contiguous(memory_format=layout[True]), x.is_contiguous(),
         w.is_contiguous(memory_format=layout[vae_module.CPU_CHANNELS_LAST]))) or onednn(x, w, *args))
    out = {}
    for channels_last in (True, False):
        monkeypatch.setattr(vae_module, "CPU_CHANNELS_LAST", channels_last)
        converted.clear()
        seen.clear()
        with torch.no_grad():
            vae.decode(z[:1]), vae.decode(z[:1], chunk_frames=1)
            if channels_last:   # (contiguous, a first chunk's slices of frames are copied: T is inside C)
                assert converted == {"conv_in"}, converted
            out[channels_last] = (vae.decode(z), vae.decode(z, chunk_frames=1),
                                  vae.decode(z, chunk_frames=2, tile=(2, 3)), vae.encode(video).mean)
        assert len(seen) > 60 and set(seen) == {(channels_last, not channels_last, True)}
    for a, b in zip(out[True], out[False]):
        assert (a - b).abs().max().item() <= 1e-4
    seen.clear()
    vae.decode(z[:1, :, :1])
    assert not seen


def test_streaming_decode_is_causal():
    """Decoded frames of the first latent frames do not change when later latent frames do."""
    vae = tiny(seed=2)
    z = torch.randn(1, 16, 4, 2, 2, device=DEVICE)
    z2 = z.clone()
    z2[:, :, 2:] = torch.randn_like(z2[:, :, 2:])
    with torch.no_grad():
        a, b = vae.decode(z), vae.decode(z2)
    torch.testing.assert_close(a[:, :, :5], b[:, :, :5], rtol=0, atol=1e-6)
    assert (a[:, :, 5:] - b[:, :, 5:]).abs().max() > 1e-3


def test_streaming_memory_is_flat_in_frames():
    """Streaming 16 latent frames (61 video frames) peaks at most 1.1x streaming 4 (13 video
    frames), frames consumed as they come; the full decode of the same latents grows with T
    (what shows the measurement sees the difference)."""
    vae = tiny(seed=3)
    z4, z16 = (torch.randn(1, 16, t, 2, 2, device=DEVICE) for t in (4, 16))

    def stream(z):
        with torch.no_grad():
            for chunk in vae.decode_stream(z, chunk_frames=2):
                to_uint8_frames(chunk)

    def full(z):
        with torch.no_grad():
            to_uint8_frames(vae.decode(z))
    short, long = peak_bytes(lambda: stream(z4), DEVICE), peak_bytes(lambda: stream(z16), DEVICE)
    assert short > 0 and long <= 1.1 * short, (short, long)
    assert peak_bytes(lambda: full(z16), DEVICE) > 2 * peak_bytes(lambda: full(z4), DEVICE)


def test_uint8_frames():
    video = torch.tensor([-2.0, -1.0, 0.0, 1.0, 3.0]).view(1, 1, 5, 1, 1).expand(1, 3, 5, 1, 1)
    frames = to_uint8_frames(video)
    assert frames.shape == (5, 1, 1, 3) and frames.dtype == torch.uint8
    assert frames[:, 0, 0, 0].tolist() == [0, 0, 128, 255, 255]


ERRORS = [
    (torch.zeros(1, 3, 4, 16, 16), r"video: expected T = 1 \+ 4k frames, got T=4"),
    (torch.zeros(1, 3, 5, 12, 16), "video: expected H and W positive multiples of 8, got H=12, W=16"),
    (torch.zeros(1, 3, 5, 0, 16), "video: expected H and W positive multiples of 8, got H=0, W=16"),
    (torch.zeros(1, 3, 5, 16, 16, dtype=torch.float16),
     "video: expected dtype torch.float32 on .*, like the autoencoder's parameters, got torch.float16"),
    (torch.zeros(1, 4, 5, 16, 16), "video: expected 3 channels, got 4"),
    (torch.zeros(3, 5, 16, 16), r"video: expected \[B, 3, T, H, W\]"),
]


@pytest.mark.parametrize("video, message", ERRORS, ids=[e[1][:30] for e in ERRORS])
def test_encode_errors(video, message):
    with pytest.raises(ValueError, match=message):
        tiny().encode(video.to(DEVICE))


def test_torch_compile_fullgraph_forward_backward(monkeypatch):
    """Encode and decode (a VAE training step's forward and backward) under
    torch.compile(fullgraph=True): the same gradients bit for bit (aot_eager runs the same
    kernels; on a GPU with cuDNN's deterministic algorithms). The latent's NaN scan cannot be
    read while tracing: on CPU the graph asserts it instead (RuntimeError, without the frames;
    eager names them: test_decode_errors)."""
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    vae = tiny(seed=4).train()
    video = torch.rand(1, 3, 5, 16, 16, generator=torch.Generator().manual_seed(4)).to(DEVICE) * 2 - 1
    params = [p for p in vae.parameters() if p.requires_grad]

    def loss(x):
        return vae.decode(vae.encode(x).mode()).square().mean()
    expected = torch.autograd.grad(loss(video), params, allow_unused=True)
    torch._dynamo.reset()
    got = torch.autograd.grad(torch.compile(loss, fullgraph=True, backend="aot_eager")(video), params,
                              allow_unused=True)
    assert sum(g is not None for g in got) == sum(g is not None for g in expected) > 0
    for a, b in zip(got, expected):
        if b is not None:
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    if DEVICE.type == "cpu":    # on a GPU the check is left out under compile (vae.py)
        z = torch.zeros(1, 16, 2, 2, 2, device=DEVICE)
        z[0, 1, 1, 0, 0] = float("nan")
        torch._dynamo.reset()
        with pytest.raises(RuntimeError, match="latent: contains NaN or Inf"):
            torch.compile(vae.decode, fullgraph=True, backend="aot_eager")(z)


def test_torch_compile_fullgraph_inference_decode():
    """The decode as sampling runs it (no autograd) under torch.compile(fullgraph=True): on CPU
    eager calls oneDNN directly (torch.mkldnn_convolution, which tracing cannot take) and
    compiled code F.conv3d, so the two agree to fp32 rounding, not bits."""
    vae = tiny(seed=6)
    z = torch.randn(1, 16, 3, 2, 3, generator=torch.Generator().manual_seed(6)).to(DEVICE)
    with torch.no_grad():
        expected = vae.decode(z)
        torch._dynamo.reset()
        got = torch.compile(vae.decode, fullgraph=True, backend="aot_eager")(z)
    assert got.shape == expected.shape == (1, 3, 9, 16, 24)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_decode_errors():
    vae = tiny()
    z = torch.zeros(1, 16, 3, 2, 2, device=DEVICE)
    z[0, 3, 1, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"latent: contains NaN or Inf \(1 elements, in latent frames \[1\]\)"):
        vae.decode(z)
    z[0, 3, 1, 0, 0] = 0.0
    z[0, 5, 2, 1, 1] = -float("inf")
    with pytest.raises(ValueError, match=r"latent: contains NaN or Inf \(1 elements, in latent frames \[2\]\)"):
        vae.decode(z)
    with pytest.raises(ValueError, match=r"latent: expected \[B, 16, t, h, w\], got \(1, 8, 3, 2, 2\)"):
        vae.decode(torch.zeros(1, 8, 3, 2, 2, device=DEVICE))
    with pytest.raises(ValueError, match=r"latent: expected at least 1 frame and h, w >= 1, got \(1, 16, 3, 0, 2\)"):
        vae.decode(torch.zeros(1, 16, 3, 0, 2, device=DEVICE))
    with pytest.raises(ValueError, match="latent: expected dtype torch.float32 on .*, like the autoencoder's "
                                         "parameters, got torch.bfloat16"):
        vae.decode(torch.zeros(1, 16, 3, 2, 2, device=DEVICE, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="chunk_frames: expected a positive int, got 0"):
        vae.decode(torch.zeros(1, 16, 3, 2, 2, device=DEVICE), chunk_frames=0)
    with pytest.raises(ValueError, match="chunk_frames: expected a positive int, None or 'auto', got 0"):
        list(vae.decode_stream(torch.zeros(1, 16, 3, 2, 2, device=DEVICE), chunk_frames=0))
    with pytest.raises(ValueError, match="chunk_frames: expected a positive int, None or 'auto', got 'all'"):
        list(vae.decode_stream(torch.zeros(1, 16, 3, 2, 2, device=DEVICE), chunk_frames="all"))
    with pytest.raises(ValueError, match="temporal_down: expected 3 flags"):
        VideoAutoencoder(vae_config("tiny", temporal_down=(True,)))


def test_decode_stream_budget_picks_the_chunk():
    """decode_stream's default chunk: one latent frame without a budget; with max_memory_gb the
    largest the budget fits: a roomy one, the whole latent in one chunk; one between the
    estimates of chunks of 2 and 3 latent frames, chunks of 2 (5 frames, then 4)."""
    vae = tiny(seed=5)
    z = torch.randn(1, 16, 3, 2, 2, device=DEVICE)
    two, three = (vae.plan_decode(z, c, None, 4, keep_output=False).estimate_bytes for c in (2, 3))
    assert two < three
    with torch.no_grad():
        one = [c.shape[2] for c in vae.decode_stream(z)]
        roomy = list(vae.decode_stream(z, max_memory_gb=4))
        between = list(vae.decode_stream(z, max_memory_gb=(two + three) / 2 / 2 ** 30))
        assert one == [1, 4, 4] and [c.shape[2] for c in roomy] == [9] and [c.shape[2] for c in between] == [5, 4]
        torch.testing.assert_close(roomy[0], vae.decode(z), rtol=0, atol=1e-4)
        torch.testing.assert_close(torch.cat(between, 2), roomy[0], rtol=0, atol=1e-4)


def test_float64_decode():
    """A float64 autoencoder decodes float64 latents in float64 (the reference backends of the
    sora_kernels ops), and agrees with the same weights in float32."""
    vae = tiny()
    z = torch.randn(1, 16, 2, 2, 3, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    with torch.no_grad():
        out32 = vae.decode(z)
        vae64 = vae.double()
        out64 = vae64.decode(z.double())
    assert out64.dtype == torch.float64
    torch.testing.assert_close(out64.float(), out32, rtol=0, atol=1e-4)
