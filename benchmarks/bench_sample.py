"""Benchmarks of sampling: the time of one guided Euler step over a batch of videos of several
sizes (sora_model.diffusion.sample: the noise, one DiT forward over the conditional and
unconditional branches, the update).

Providers:
  packed  every video in one packed sequence, both guidance branches in it too (ours);
  loop    one video at a time, each with its two branches packed: a sampler that cannot pack
          different sizes together.
Rows: median ms per step, TFLOP/s of the step's DiT forward (sora_model.dit.forward_flops on
both branches: the same count for every provider) and, on GPUs with a known bf16 peak, MFU;
extra: tokens (per branch), s_per_step.
Workloads:
  e2e-sizes  CPU: the mini DiT on the latents of the end-to-end run's four sample sizes (three
             aspect ratios and an image: 1104 tokens);
  mixed-32k  GPU: the "1B" size in bf16 autocast on bench_dit_train's five latents (31,984
             tokens, so 63,968 per forward with guidance).
"""
import pytest
import torch

from benchmarks import harness
from benchmarks.bench_dit_train import SIZES_32K, random_text, sub_text
from sora_model.diffusion import sample
from sora_model.dit import DiT, dit_config, forward_flops

PROVIDERS = ["packed", "loop"]
E2E_SIZES = [(3, 8, 12), (3, 12, 8), (3, 8, 16), (1, 12, 12)]    # latents of 9x32x48, 9x48x32, 9x32x64, 1x48x48
TEXT_TOKENS = 8
GUIDANCE = 4.0


@pytest.mark.parametrize("workload", ["e2e-sizes", "mixed-32k"])
@pytest.mark.parametrize("provider", PROVIDERS)
def test_sample(suite, benchmark, provider, workload):
    device = suite.device
    if (workload == "mixed-32k") != (device.type == "cuda"):
        pytest.skip(f"{workload} is a {'GPU' if workload == 'mixed-32k' else 'CPU'} workload")
    cfg = dit_config("1B", text_dim=64) if workload == "mixed-32k" else dit_config("mini")
    sizes = SIZES_32K if workload == "mixed-32k" else E2E_SIZES
    torch.manual_seed(0)
    dit = DiT(cfg).to(device).eval()
    with torch.no_grad():   # adaLN-Zero starts at zero: random modulations make every path run
        for block in dit.blocks:
            block.modulation.weight.normal_(0.0, 0.02)
    g = torch.Generator().manual_seed(0)
    n = len(sizes)
    text, null = random_text(n, TEXT_TOKENS, cfg.text_dim, g, device), random_text(n, 1, cfg.text_dim, g, device)
    shapes = [(cfg.in_channels, *s) for s in sizes]
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step():
        with autocast:
            if provider == "packed":
                sample(dit, shapes, text, cfg.patch_size, null=null, guidance=GUIDANCE, steps=1,
                       generator=torch.Generator().manual_seed(1), device=device)
            else:
                for i, shape in enumerate(shapes):
                    sample(dit, [shape], sub_text(text, [i], device), cfg.patch_size,
                           null=sub_text(null, [i], device), guidance=GUIDANCE, steps=1,
                           generator=torch.Generator().manual_seed(1), device=device)

    p = cfg.patch_size
    tokens = [(T // p[0]) * (H // p[1]) * (W // p[2]) for T, H, W in sizes]
    flops = forward_flops(cfg, tokens + tokens, [TEXT_TOKENS] * n + [1] * n)
    try:
        row = suite.run("sample", "step", provider, f"{workload}-{n}-videos-{sum(tokens)}-tokens", step, 0,
                        torch.float32, benchmark, flops=flops,
                        rounds=5 if device.type == "cpu" and not suite.quick else None,
                        tokens=sum(tokens), config=f"{cfg.hidden}x{cfg.depth}")
    except torch.cuda.OutOfMemoryError as e:
        torch.cuda.empty_cache()
        pytest.skip(f"{provider} ran out of GPU memory at {workload}: {str(e).splitlines()[0]}")
    row.extra["s_per_step"] = round(row.median_ms * 1e-3, 4)
    peak = harness.peak_bf16_tflops(device)
    row.extra["mfu"] = None if peak is None else round(row.tflops / peak, 4)
    suite.write()
