"""The Packed record: many videos of different sizes as one token sequence."""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch


@dataclass(frozen=True)
class Packed:
    """Videos of different sizes packed into one sequence, with no padding.

    tokens      [N, D]     every video's tokens, one video after another
    cu_seqlens  [n+1]      int32, token offset of each video (cu_seqlens[-1] == N)
    positions   [N, 3]     int32, (t, h, w) grid index of each token in its video
    grid_sizes  [n, 3]     int32, (T/pt, H/ph, W/pw) of each video
    max_seqlen  int        the longest video's token count
    grids       host copy of grid_sizes, so unpacking needs no device sync
    patch_size  (pt, ph, pw) the videos were cut with (None: not known); unpacking checks it
    embedded    True when tokens are patch_embed3d's projections rather than the patches
                themselves (pack_patchify's): patch_embed3d refuses to project them again
    """

    tokens: torch.Tensor
    cu_seqlens: torch.Tensor
    positions: torch.Tensor
    grid_sizes: torch.Tensor
    max_seqlen: int
    grids: tuple[tuple[int, int, int], ...]
    patch_size: tuple[int, int, int] | None = None
    embedded: bool = False

    @property
    def num_videos(self) -> int:
        return len(self.grids)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None, *,
           non_blocking: bool = False) -> "Packed":
        """This record with every tensor on `device` and the tokens cast to `dtype` (each when
        given; the int32 index tensors keep their dtype), e.g. packed in a DataLoader worker on
        the CPU, then moved to the GPU. Segment ids already computed move with it."""
        def move(t: torch.Tensor, cast: torch.dtype | None = None) -> torch.Tensor:
            return t.to(device=device, dtype=cast, non_blocking=non_blocking)
        return self._with(move, lambda t: move(t, dtype))

    def pin_memory(self) -> "Packed":
        """This record with every tensor in pinned host memory: torch.utils.data.DataLoader's
        pin_memory=True calls it on batches that are Packed records."""
        return self._with(torch.Tensor.pin_memory, torch.Tensor.pin_memory)

    def _with(self, index_fn, tokens_fn) -> "Packed":
        out = replace(self, tokens=tokens_fn(self.tokens), cu_seqlens=index_fn(self.cu_seqlens),
                      positions=index_fn(self.positions), grid_sizes=index_fn(self.grid_sizes))
        ids = self.__dict__.get("_segment_ids")
        if ids is not None:
            object.__setattr__(out, "_segment_ids", index_fn(ids))
        return out

    @property
    def segment_ids(self) -> torch.Tensor:
        """int32 [N]: the video of each token, computed once per batch (on first use) and reused
        by every layer's segment-aware ops (adaln_norm, gated_residual).

        Cached in the instance dict by hand rather than with functools.cached_property: on
        Python < 3.12 that takes an RLock, which torch.compile (Dynamo) cannot trace, so a
        compiled function that builds a Packed and reads segment_ids would fail to compile.
        Not cached while torch.export traces without Dynamo (its default): it runs this code on
        fake tensors, and a cached fake would outlive the trace in a record the caller keeps
        using. Dynamo (torch.compile) replays the cache's write with the real ids. (Under Dynamo,
        torch 2.11 says is_exporting() too, hence both tests.) The ids need no device sync
        (reference.dit_ops.segment_ids)."""
        ids = self.__dict__.get("_segment_ids")
        if ids is None:
            from sora_kernels.reference.dit_ops import segment_ids
            ids = segment_ids(self.cu_seqlens, self.tokens.shape[0])
            if torch.compiler.is_dynamo_compiling() or not torch.compiler.is_exporting():
                object.__setattr__(self, "_segment_ids", ids)  # a frozen dataclass: a cache, not a field
        return ids


# A pytree node (its fields the children): torch.export takes a Packed argument (a DiT block's
# forward), and torch.utils._pytree.tree_map reaches its tensors. The index tensors and ints
# keep their meaning only together, so map the tensors alone (Packed.to does).
torch.export.register_dataclass(Packed, serialized_type_name="sora_kernels.Packed")


def packed_metadata(grids, device: torch.device):
    """cu_seqlens [n+1] and grid_sizes [n, 3] (int32, on `device`, from one host-to-device copy)
    and max_seqlen for videos with patch grids `grids`. Positions come from the packing kernel."""
    lengths = [t * h * w for t, h, w in grids]
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    meta = torch.tensor(cu + [x for g in grids for x in g], dtype=torch.int32).to(device, non_blocking=True)
    n = len(grids)
    return meta[: n + 1], meta[n + 1:].view(n, 3), max(lengths)


def check_packed(packed, patch: tuple[int, int, int]) -> None:
    """ValueError unless `packed` is a Packed record cut with patch `patch` (when it knows its
    patch): unpacking with another patch of the same volume would give videos of other sizes."""
    if not isinstance(packed, Packed):
        raise ValueError(f"packed: expected a Packed record (from pack_patchify or patch_embed3d), "
                         f"got {type(packed).__name__}")
    if packed.patch_size is not None and tuple(patch) != tuple(packed.patch_size):
        raise ValueError(f"patch_size: expected {tuple(packed.patch_size)}, the patch the videos were packed with, "
                         f"got {tuple(patch)}")


def check_offsets(name: str, values: list[int], n: int) -> list[int]:
    """ValueError naming `name` unless the offsets `values` (cu_seqlens read on the host) start
    at 0, never decrease and end at the token count n; returns the segment lengths."""
    if values[0] != 0:
        raise ValueError(f"{name}: expected cu_seqlens[0] == 0, got {values[0]}")
    lengths = [b - a for a, b in zip(values, values[1:])]
    bad = next((i for i, length in enumerate(lengths) if length < 0), None)
    if bad is not None:
        raise ValueError(f"{name}: expected non-decreasing offsets, got {values[bad]} then {values[bad + 1]} "
                         f"at index {bad}")
    if values[-1] != n:
        raise ValueError(f"{name}: expected the last entry to equal the token count {n}, got {values[-1]}")
    return lengths


def assert_offsets(name: str, cu: torch.Tensor, n) -> None:
    """check_offsets for a traced function (torch.compile), which cannot read cu's values: the
    same conditions as asserts in the graph, which raise RuntimeError when it runs. For CPU
    tensors only: on a GPU a failed assert is a device-side assert, fatal to the CUDA context."""
    # Neither a slice of cu (cu[1:] >= cu[:-1]) nor n in the message: under dynamic shapes the
    # first specialises the segment count to at least 2, the second the token count to this
    # call's (a recompilation for every batch size; traced code cannot tell whether n is
    # symbolic without the same effect).
    torch._assert_async(cu[0] == 0, f"{name}: expected cu_seqlens[0] == 0")
    torch._assert_async((cu.cummax(0).values == cu).all(), f"{name}: expected non-decreasing offsets")
    torch._assert_async(cu[-1] == n, f"{name}: expected the last entry to equal the token count")


def check_cu_seqlens(name: str, cu: torch.Tensor, device: torch.device, min_entries: int = 1) -> None:
    """ValueError naming `name` unless cu is a 1-dim int32 tensor of at least `min_entries`
    entries on `device` (its values are checked where they are read)."""
    if not isinstance(cu, torch.Tensor) or cu.dim() != 1 or cu.shape[0] < min_entries:
        got = tuple(cu.shape) if isinstance(cu, torch.Tensor) else type(cu).__name__
        raise ValueError(f"{name}: expected a 1-dim int32 tensor [segments + 1], got {got}")
    if cu.dtype != torch.int32:
        raise ValueError(f"{name}: expected dtype torch.int32, got {cu.dtype}")
    if cu.device != device:
        raise ValueError(f"{name}: expected device {device} like the tokens, got {cu.device}")
