// Host half of the sticky device-error flag: allocation and the host-side read and reset.
#include "common/device_error.h"

#include <c10/util/Exception.h>
#include <cuda_runtime.h>

#include <atomic>
#include <mutex>

namespace moe_kernels {
namespace {

std::atomic<int*> g_host_flag{nullptr};
std::atomic<int*> g_device_flag{nullptr};
std::mutex g_alloc_mutex;

void check_cuda(cudaError_t status, const char* what) {
  TORCH_CHECK(status == cudaSuccess, "moe_kernels device-error flag: ", what,
              " failed: ", cudaGetErrorName(status), " (", cudaGetErrorString(status), ")");
}

}  // namespace

int* device_error_flag() {
  if (int* device = g_device_flag.load(std::memory_order_acquire)) {
    return device;
  }
  const std::lock_guard<std::mutex> lock(g_alloc_mutex);
  if (int* device = g_device_flag.load(std::memory_order_acquire)) {
    return device;
  }
  // A first call may come while a stream is captured; allocating pinned memory is not a stream
  // operation, so let it through instead of invalidating the capture.
  cudaStreamCaptureMode mode = cudaStreamCaptureModeRelaxed;
  check_cuda(cudaThreadExchangeStreamCaptureMode(&mode), "cudaThreadExchangeStreamCaptureMode");
  int* host = nullptr;
  int* device = nullptr;
  const cudaError_t alloc = cudaHostAlloc(reinterpret_cast<void**>(&host), sizeof(int),
                                          cudaHostAllocMapped | cudaHostAllocPortable);
  const cudaError_t map =
      alloc == cudaSuccess ? cudaHostGetDevicePointer(reinterpret_cast<void**>(&device), host, 0) : alloc;
  check_cuda(cudaThreadExchangeStreamCaptureMode(&mode), "cudaThreadExchangeStreamCaptureMode");
  check_cuda(alloc, "cudaHostAlloc");
  check_cuda(map, "cudaHostGetDevicePointer");
  *reinterpret_cast<volatile int*>(host) = 0;
  g_host_flag.store(host, std::memory_order_release);
  g_device_flag.store(device, std::memory_order_release);
  return device;
}

int64_t device_error_code() {
  const int* host = g_host_flag.load(std::memory_order_acquire);
  return host == nullptr ? 0 : *reinterpret_cast<const volatile int*>(host);
}

void clear_device_error() {
  if (int* host = g_host_flag.load(std::memory_order_acquire)) {
    *reinterpret_cast<volatile int*>(host) = 0;
  }
}

}  // namespace moe_kernels
