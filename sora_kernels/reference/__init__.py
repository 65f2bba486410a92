"""Pure-PyTorch references for every op: the fallback backend, the test oracle and the
benchmark baseline. Written for clarity, not speed."""
from sora_kernels.reference.patchify import (pack_patchify, packed_positions, patchify3d, unpack_unpatchify,
                                             unpatchify3d)

__all__ = ["patchify3d", "unpatchify3d", "pack_patchify", "unpack_unpatchify", "packed_positions"]
