"""Registration helpers: the CPU implementations (the references) and fake kernels of our ops."""

import torch

_IMPL = torch.library.Library("moe_kernels", "IMPL")


def register_cpu(name: str):
    """Register fn as the CPU kernel of moe_kernels::<name> (used as a decorator)."""

    def decorator(fn):
        _IMPL.impl(name, fn, "CPU")
        return fn

    return decorator


def register_fake(name: str):
    return torch.library.register_fake(f"moe_kernels::{name}")
