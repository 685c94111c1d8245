"""Facts about the build."""

import torch


def nccl_version() -> tuple[int, int, int]:
    """(major, minor, patch) of the NCCL moe_kernels links: torch's own, so communicators interoperate."""
    code = torch.ops.moe_kernels.nccl_version()
    return code // 10000, code // 100 % 100, code % 100
