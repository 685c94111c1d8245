// Host half of the sticky device-error flag (see moe_kernels/device_error.cuh): one int per process
// in pinned, host-mapped, portable memory, allocated on first use. Kernels get its device pointer;
// the host reads it with a plain load, so checking it never synchronises.
#pragma once

#include <cstdint>

namespace moe_kernels {

// Device pointer to the flag (valid on every GPU of the process). Allocates it on first use; safe to
// call while a stream is being captured into a CUDA graph.
int* device_error_flag();

// The code last stored by a kernel (0: none). A host read of what completed kernels wrote: no sync.
int64_t device_error_code();

// Resets the flag to 0.
void clear_device_error();

}  // namespace moe_kernels
