"""Rectified flow (sora_model/diffusion.py): the objective's target, timestep sampling and the
token shift, Euler and Heun samplers exact on a straight-line flow, guidance, and the tiny DiT
sampling three aspect ratios and an image in one packed batch."""
import pytest
import torch

from conftest import DEVICE
from sora_model.diffusion import (FlowConfig, flow_loss, sample, sample_timesteps, schedule, shift_timesteps,
                                  time_shift, token_counts)
from sora_model.dit import DiT, TextBatch, dit_config

pytestmark = pytest.mark.usefixtures("native_kernels")

PATCH = (1, 2, 2)
SHAPES = [(16, 3, 8, 12), (16, 1, 6, 6), (16, 2, 4, 16), (16, 5, 12, 8)]   # clips of three aspects, an image


def text_batch(n, dim=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    cu = torch.arange(0, 2 * n + 1, 2, dtype=torch.int32)
    return TextBatch(torch.randn(2 * n, dim, generator=g).to(DEVICE), cu.to(DEVICE), 2,
                     torch.randn(n, dim, generator=g).to(DEVICE))


def point_mass(targets):
    """The exact velocity of a flow to one point x0 per video: v(x, t) = (x - x0) / t."""
    def model(x, t, text):
        return [(xi - x0) / t[i] for i, (xi, x0) in enumerate(zip(x, targets))]
    return model


def test_objective_target_is_noise_minus_data():
    g = torch.Generator().manual_seed(0)
    latents = [torch.randn(s, generator=g).to(DEVICE) for s in SHAPES]
    loss, t = flow_loss(point_mass(latents), latents, text_batch(4), PATCH, generator=torch.Generator().manual_seed(1))
    assert t.shape == (4,) and loss.item() < 1e-10
    zero, _ = flow_loss(lambda x, t, text: [torch.zeros_like(xi) for xi in x], latents, text_batch(4), PATCH,
                        generator=torch.Generator().manual_seed(1))
    assert 1.5 < zero.item() < 2.5     # E|eps - x0|^2 = 2 per element for unit Gaussians


def test_timesteps_and_shift():
    cfg = FlowConfig(base_tokens=256)
    tokens = token_counts(SHAPES, PATCH)
    assert tokens.tolist() == [72, 9, 32, 120]
    torch.testing.assert_close(time_shift(torch.tensor([256.0, 1024.0]), cfg), torch.tensor([1.0, 2.0]))
    t = torch.linspace(0, 1, 5)
    torch.testing.assert_close(shift_timesteps(t, torch.tensor(1.0)), t)
    assert shift_timesteps(torch.tensor([0.0, 1.0]), torch.tensor(3.0)).tolist() == [0.0, 1.0]
    g = torch.Generator().manual_seed(0)
    small = sample_timesteps(torch.full((4000,), 64.0), cfg, g)
    big = sample_timesteps(torch.full((4000,), 4096.0), cfg, g)
    assert 0 < small.min() and big.max() < 1
    assert small.mean() < 0.4 < 0.6 < big.mean()          # more tokens, more noise
    s = schedule(10, torch.tensor([1.0, 4.0]))
    assert s.shape == (2, 11) and s[:, 0].tolist() == [1.0, 1.0] and s[:, -1].tolist() == [0.0, 0.0]
    assert (s.diff(dim=1) < 0).all()


@pytest.mark.parametrize("method", ["euler", "heun"])
def test_samplers_exact_on_straight_flow(method):
    g = torch.Generator().manual_seed(2)
    targets = [torch.randn(s, generator=g).to(DEVICE) for s in SHAPES]
    out = sample(point_mass(targets), SHAPES, text_batch(4), PATCH, steps=7, method=method,
                 generator=torch.Generator().manual_seed(3))
    for o, x0 in zip(out, targets):
        assert o.shape == x0.shape
        torch.testing.assert_close(o, x0, rtol=1e-4, atol=1e-4)


def test_guidance_extrapolates_from_null():
    """Point masses c (with the caption) and u (null): guided flow lands on u + w (c - u)."""
    g = torch.Generator().manual_seed(4)
    c = [torch.randn(s, generator=g).to(DEVICE) for s in SHAPES[:2]]
    u = [torch.randn(s, generator=g).to(DEVICE) for s in SHAPES[:2]]
    cond, null = text_batch(2, seed=1), text_batch(2, seed=2)

    def model(x, t, text):
        assert len(x) == 4 and torch.equal(text.pooled[:2], cond.pooled) and torch.equal(text.pooled[2:], null.pooled)
        return [(xi - x0) / t[i] for i, (xi, x0) in enumerate(zip(x, c + u))]
    out = sample(model, SHAPES[:2], cond, PATCH, null=null, guidance=3.0, steps=5)
    for o, ci, ui in zip(out, c, u):
        torch.testing.assert_close(o, ui + 3.0 * (ci - ui), rtol=1e-4, atol=1e-4)


def test_dit_samples_mixed_sizes_in_one_batch():
    torch.manual_seed(0)
    dit = DiT(dit_config("tiny")).to(DEVICE).eval()
    with torch.no_grad():
        for p in dit.final.parameters():
            p.normal_(0, 0.05)
    calls = []

    def model(x, t, text):
        calls.append([tuple(xi.shape) for xi in x])
        return dit(x, t, text)
    out = sample(model, SHAPES, text_batch(4), PATCH, null=text_batch(4, seed=5), guidance=2.0, steps=3,
                 method="heun", generator=torch.Generator().manual_seed(0))
    again = sample(dit, SHAPES, text_batch(4), PATCH, null=text_batch(4, seed=5), guidance=2.0, steps=3,
                   method="heun", generator=torch.Generator().manual_seed(0))
    assert [tuple(o.shape) for o in out] == [tuple(s) for s in SHAPES]
    assert all(torch.isfinite(o).all() for o in out)
    assert all(torch.equal(a, b) for a, b in zip(out, again))
    assert len(calls) == 5 and calls[0] == [tuple(s) for s in SHAPES] * 2   # heun: 2 calls a step, Euler last


def test_errors():
    m = point_mass([torch.zeros(s) for s in SHAPES])
    with pytest.raises(ValueError, match="steps: expected a positive int, got 0"):
        sample(m, SHAPES, text_batch(4), PATCH, steps=0)
    with pytest.raises(ValueError, match="method: expected 'euler' or 'heun', got 'ddim'"):
        sample(m, SHAPES, text_batch(4), PATCH, method="ddim")
    with pytest.raises(ValueError, match=r"null: guidance=4.0 needs the unconditional captions"):
        sample(m, SHAPES, text_batch(4), PATCH, guidance=4.0)
    with pytest.raises(ValueError, match=r"text: expected 4 captions \(one per shape\), got 2"):
        sample(m, SHAPES, text_batch(2), PATCH)
    with pytest.raises(ValueError, match=r"null: expected 4 unconditional captions \(one per shape\), got 1"):
        sample(m, SHAPES, text_batch(4), PATCH, null=text_batch(1), guidance=4.0)
    with pytest.raises(ValueError, match="steps: expected a positive int, got True"):
        sample(m, SHAPES, text_batch(4), PATCH, steps=True)
    for bad in (float("nan"), float("inf"), "2"):        # NaN or inf: every guided velocity NaN
        with pytest.raises(ValueError, match=f"guidance: expected a finite number, got {bad!r}"):
            sample(m, SHAPES, text_batch(4), PATCH, null=text_batch(4), guidance=bad)
