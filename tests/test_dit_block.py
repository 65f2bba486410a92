"""A mini DiT block built from the fused ops and varlen_attention trains the same as the
same block on the reference backend: 20 Adam steps, the loss curves agree."""
import torch

import sora_kernels as sk
from conftest import DEVICE, assert_trains_like_reference, train_losses


class MiniDiTBlock(torch.nn.Module):
    """adaLN-Zero DiT block on packed tokens: each segment has its own conditioning vector."""

    def __init__(self, dim: int = 64, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.ada = torch.nn.Linear(dim, 6 * dim)     # shift, scale, gate for attention and MLP
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.q_norm = torch.nn.Parameter(torch.ones(dim // heads))
        self.k_norm = torch.nn.Parameter(torch.ones(dim // heads))
        self.proj = torch.nn.Linear(dim, dim)
        self.fc1 = torch.nn.Linear(dim, 4 * dim)
        self.fc2 = torch.nn.Linear(4 * dim, dim)

    def forward(self, x, c, cu, max_len, positions):
        N, D = x.shape
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(torch.nn.functional.silu(c)).chunk(6, dim=1)
        h = sk.adaln_norm(x, shift1, scale1, cu)                                      # [N, D]
        q, k, v = self.qkv(h).view(N, 3, self.heads, D // self.heads).unbind(1)        # [N, H, Dh] each
        q, k = sk.rms_norm(q, self.q_norm), sk.rms_norm(k, self.k_norm)
        a = sk.varlen_attention(q, k, v, cu, cu, max_len, max_len, rope=positions)    # [N, H, Dh]
        x, h = sk.gated_residual_adaln(x, self.proj(a.reshape(N, D)), gate1, shift2, scale2, cu)
        m = self.fc2(sk.gelu_tanh(self.fc1(h)))                                       # [N, D]
        return sk.gated_residual(x, m, gate2, cu)


def _train(steps: int = 20) -> list[float]:
    torch.manual_seed(0)
    lengths = [1, 24, 9, 1, 30]
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32).to(DEVICE)
    positions = torch.cat([torch.stack([torch.zeros(n), torch.arange(n) // 4, torch.arange(n) % 4], 1)
                           for n in lengths]).to(torch.int32).to(DEVICE)
    block = MiniDiTBlock().to(DEVICE)
    x = torch.randn(sum(lengths), 64, device=DEVICE)
    c = torch.randn(len(lengths), 64, device=DEVICE)
    target = torch.randn_like(x)
    return train_losses(block, lambda: torch.nn.functional.mse_loss(block(x, c, cu, max(lengths), positions), target),
                        steps)


def test_loss_curve_matches_reference(monkeypatch):
    assert_trains_like_reference(_train, monkeypatch)
