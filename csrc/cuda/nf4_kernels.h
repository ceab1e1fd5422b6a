// Launchers of the NF4 CUDA kernels. Plain C++ types only: the .cu files that define them do not
// include torch's headers (fast to compile); the torch-facing glue is in nf4_cuda.cpp.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace qk_cuda {

enum class OutDtype : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// The absmax of an NF4 weight: fp32 per block, or (double quantization) uint8 codes with their
// fp32 nested absmax per 256 blocks, the 256-entry nested code table and the offset.
struct NF4Scales {
  const float* absmax = nullptr;        // fp32 [nb] when not nested
  const uint8_t* absmax_q = nullptr;    // uint8 [nb] when nested
  const float* nested_absmax = nullptr;  // fp32 [ceil(nb / 256)]
  const float* nested_code = nullptr;    // fp32 [256]
  float offset = 0.0f;
};

// out[e] = code[q(e)] * absmax[e / blocksize] for e < numel, written as out_dtype.
// Returns the launch's cudaError_t.
cudaError_t launch_dequantize_nf4(const uint8_t* packed, NF4Scales scales, const float* code, int64_t numel,
                                  int blocksize, OutDtype out_dtype, void* out, cudaStream_t stream);

// GEMV for M = 1..4 rows of x: y[m, n] = sum_k x[m, k] * deq(W)[n, k], W [N, K].
// x: [M, K] contiguous in x_dtype (same enum as the output dtypes); requires a power-of-two
// blocksize >= 32 with K % blocksize == 0, and a 16-byte aligned x. The algorithm (one warp's work)
// is nf4_gemv_core.cuh. With splits == 1, y is [M, N] in x_dtype; with
// splits > 1, y is an fp32 workspace [splits, M, N] of partial sums over K / splits each (the
// caller sums over the first dim): split-K for when N alone cannot fill the GPU.
cudaError_t launch_nf4_gemv(const void* x, OutDtype x_dtype, int m, const uint8_t* packed, NF4Scales scales,
                            const float* code, int64_t n, int64_t k, int blocksize, int splits, void* y,
                            cudaStream_t stream);

}  // namespace qk_cuda
