"""moe_kernels: fast Mixture-of-Experts kernels for NVIDIA Hopper, registered as PyTorch ops.

Ops live under ``torch.ops.moe_kernels``; the typed front doors are re-exported here, with the
``MoE`` layer. The transformers adapter (``moe_kernels.integrations.transformers``) is imported only
when asked for: ``import moe_kernels`` never needs transformers.
Every op also has a CPU implementation (the pure-PyTorch reference of ``moe_kernels.reference``).
"""

import torch  # noqa: F401  (loads libtorch before our extension links against it)

from moe_kernels import _C  # noqa: F401, E402  (registers the op schemas and CUDA kernels)
from moe_kernels.distributed import ExpertParallel, all_reduce_counts  # noqa: E402
from moe_kernels.layers import BalanceLoss, MoE, expert_mlp  # noqa: E402
from moe_kernels.ops import *  # noqa: E402, F403  (the typed front doors; names in ops.__all__)
from moe_kernels.ops import __all__ as _ops_all  # noqa: E402
from moe_kernels.presets import MODEL_PRESETS, PRESETS, ModelPreset, RouterPreset  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    *_ops_all,
    "MODEL_PRESETS",
    "PRESETS",
    "BalanceLoss",
    "ExpertParallel",
    "MoE",
    "ModelPreset",
    "RouterPreset",
    "all_reduce_counts",
    "expert_mlp",
]
