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

}  // namespace qk_cuda
