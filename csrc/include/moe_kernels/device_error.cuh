// Sticky device-side error reporting (framework-free half; the host half is csrc/common/device_error.h).
//
// Some argument errors can only be seen in device data (an expert id out of range, a row count that
// does not fit). Kernels never trap or sync for them: they handle the bad element safely (drop it),
// and store an error code into one int of pinned host-mapped memory. The host reads that int
// without a sync at the next op call (or synchronises in moe_kernels.check_device_errors()).
#pragma once

namespace moe_kernels {

// Codes stored in the flag. moe_kernels/ops/device_error.py maps them to messages: keep in sync.
enum DeviceError : int {
  kNoDeviceError = 0,
  kPermuteExpertIdOutOfRange = 1,   // permute: an id outside [-1, num_experts); the pair was dropped
  kPermuteRowsOverflow = 2,         // permute: num_out_rows too small; pairs past it were dropped
  kUnpermuteRowOutOfRange = 3,      // unpermute: a row_map entry >= y's rows; the pair was skipped
  kGroupedGemmBadOffsets = 4,       // grouped_gemm: offsets not non-decreasing in [0, rows]; clamped
  kEpExpertIdOutOfRange = 5,        // dispatch: an id outside [-1, num_experts); the pair was dropped
  kEpUnpackRowsOverflow = 6,        // dispatch: more rows arrived than the output holds; dropped
  kEpBadCounts = 7,                 // dispatch: received counts or meta inconsistent; rows dropped
  kEpCapacityOverflow = 8,          // dispatch: more rows for a rank than its fixed capacity; dropped
  kEpTimeout = 9,                   // dispatch/combine: a peer's signal did not come in time
  kBalanceExpertIdOutOfRange = 10,  // balance_loss: an id outside [0, num_experts); not counted
  kBalanceBadSeqOffsets = 11,       // balance_loss: seq_offsets not non-decreasing from 0 to T
};

// A plain system-scope store: no atomics over PCIe (not every host supports them), and any
// nonzero code means "an error happened"; if several happen, one of them is kept.
__device__ __forceinline__ void report_device_error(int* flag, DeviceError code) {
  *reinterpret_cast<volatile int*>(flag) = code;
  __threadfence_system();
}

}  // namespace moe_kernels
