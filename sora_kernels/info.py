"""`python -m sora_kernels.info`: versions, the device, and which backends are built and
usable for each op here."""
from __future__ import annotations

import os
import platform

import torch

import sora_kernels
from sora_kernels import backends as B
from sora_kernels.ops.pack_patchify import PACK_BACKENDS, UNPACK_BACKENDS
from sora_kernels.ops.activations import GELU_BACKENDS, SWIGLU_BACKENDS
from sora_kernels.ops.adaln_norm import ADALN_BACKENDS, FUSED_BACKENDS
from sora_kernels.ops.final_layer_unpatchify import FINAL_LAYER_BACKENDS
from sora_kernels.ops.frames_to_uint8 import FRAMES_BACKENDS
from sora_kernels.ops.gated_residual import GATED_RESIDUAL_BACKENDS
from sora_kernels.ops.group_norm_moments import MOMENTS_BACKENDS
from sora_kernels.ops.group_norm_silu import GROUP_NORM_BACKENDS
from sora_kernels.ops.latent_denorm import LATENT_DENORM_BACKENDS
from sora_kernels.ops.patch_embed3d import PATCH_EMBED_BACKENDS
from sora_kernels.ops.patchify3d import PATCHIFY_BACKENDS, UNPATCHIFY_BACKENDS
from sora_kernels.ops.rms_norm import RMS_NORM_BACKENDS
from sora_kernels.ops.rope3d import ROPE_BACKENDS
from sora_kernels.ops.varlen_attention import ATTENTION_BACKENDS


def _sample_calls(device: torch.device) -> dict:
    """One small, valid call per op on `device`, to ask each backend whether it can run it."""
    x = torch.zeros(1, 4, 1, 2, 2, device=device, dtype=torch.bfloat16)
    videos = [x[0]]
    tokens = torch.zeros(1, 16, device=device, dtype=torch.bfloat16)
    qkv = torch.zeros(1, 2, 64, device=device, dtype=torch.bfloat16)
    positions = torch.zeros(1, 3, device=device, dtype=torch.int32)
    rows = torch.zeros(2, 72, device=device)
    return {
        "patchify3d": (PATCHIFY_BACKENDS, (x, (1, 2, 2))),
        "unpatchify3d": (UNPATCHIFY_BACKENDS, (tokens[None], (1, 2, 2), (1, 1, 1))),
        "pack_patchify": (PACK_BACKENDS, (videos, (1, 2, 2))),
        "unpack_unpatchify": (UNPACK_BACKENDS, (tokens, (1, 2, 2), [(1, 2, 2)])),
        "patch_embed3d (bf16)": (PATCH_EMBED_BACKENDS, (videos, tokens, None, (1, 2, 2))),
        "varlen_attention (bf16, D=64)": (ATTENTION_BACKENDS, (qkv, qkv, qkv)),
        "rope3d (bf16, D=64)": (ROPE_BACKENDS, (qkv, positions, 10000.0, (20, 22, 22))),
        "adaln_norm (fp32)": (ADALN_BACKENDS, (rows,)),
        "gated_residual_adaln (fp32)": (FUSED_BACKENDS, (rows,)),
        "gated_residual (fp32)": (GATED_RESIDUAL_BACKENDS, (rows,)),
        "rms_norm (fp32)": (RMS_NORM_BACKENDS, (rows,)),
        "gelu_tanh (fp32)": (GELU_BACKENDS, (rows,)),
        "swiglu (fp32)": (SWIGLU_BACKENDS, (rows, rows)),
        "final_layer_unpatchify (fp32)": (FINAL_LAYER_BACKENDS, (rows, *[None] * 8, True)),
        "group_norm_silu (bf16, 4 groups)": (GROUP_NORM_BACKENDS, (x, 4, None, None, 1e-6, "silu", None)),
        "group_norm_moments (fp32, 4 groups)": (MOMENTS_BACKENDS, (x.float(), 4)),
        "latent_denorm (fp32)": (LATENT_DENORM_BACKENDS, (x.float(), None, None)),
        "frames_to_uint8 (fp32)": (FRAMES_BACKENDS, (x[0, :3].float(),)),
    }


def main() -> None:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    print(f"sora_kernels {sora_kernels.__version__}")
    print(f"python       {platform.python_version()}")
    print(f"torch        {torch.__version__} (CUDA {torch.version.cuda})")
    print(f"triton       {triton_version}{' (interpreter on)' if B.triton_interpreting() else ''}")
    print(f"_C           {'built' if B.COMPILED_MISSING is None else B.COMPILED_MISSING}")
    record = B.build_record()
    if record is None:
        print("_C build     no record (sora_kernels/_build.json: written by setup.py)")
    else:
        print(f"_C build     {'CUDA kernels ' if record['cuda'] else 'C++ CPU kernels only: '}{record['reason']}")
    print(f"_C kernels   {', '.join(sorted(f'{op}/{key}' for op, key in B.COMPILED_KERNELS)) or 'none'}")
    forced = os.environ.get(B.BACKEND_ENV)
    print(f"{B.BACKEND_ENV} = {forced!r}")
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices.insert(0, torch.device("cuda"))
        props = torch.cuda.get_device_properties(0)
        print(f"device       {props.name}, sm_{props.major}{props.minor}, {props.multi_processor_count} SMs, "
              f"{props.total_memory / 2**30:.0f} GiB")
    else:
        print(f"device       no CUDA device; CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    for device in devices:
        print(f"\nbackends on {device.type} (priority order; '+' usable, '-' with reasons):")
        for op, (backends, args) in _sample_calls(device).items():
            print(f"  {op}")
            for b in backends:
                reasons = b.reasons(*args)
                print(f"    {'+' if not reasons else '-'} {b.name:<10}{'; '.join(reasons)}")


if __name__ == "__main__":
    main()
