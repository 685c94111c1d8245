"""Diagnosis only: does initcheck report torch's silu on a cuBLAS output, with no moe_kernels code?"""

import torch
import torch.nn.functional as F

for t in (1, 37, 300):
    for grad in (False, True):
        x = torch.randn(t, 256, device="cuda", dtype=torch.bfloat16, requires_grad=grad)
        lin = torch.nn.Linear(256, 256, bias=False, device="cuda", dtype=torch.bfloat16)
        y = F.silu(lin(x))
        torch.cuda.synchronize()
        print(f"probe t={t} grad={grad} forward done", flush=True)
        if grad:
            y.float().sum().backward()
            torch.cuda.synchronize()
print("probe done", flush=True)
