// Launchers of the multi-tensor AdamW CUDA kernels. Plain C++ types only: adamw.cu, which defines
// them, does not include torch's headers (fast to compile); the torch-facing glue that builds the
// work table is in adamw_cuda.cpp. The math is the one of qlora_kernels/reference/adamw.py.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace qk_cuda {

enum class ParamDtype : int32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Elements of one work unit: fp32 states are processed in tiles of kAdamWTile elements, 8-bit
// states one quantization block (kAdamWBlock elements) at a time. A work unit never straddles
// two chunks.
constexpr int64_t kAdamWTile = 4096;
constexpr int64_t kAdamWBlock = 256;

// One row of the device-side work table: a slice of one param (and of its grad) and the state
// elements it maps to. Built on the host, copied to the device before the launch.
struct AdamWChunk {
  void* param;            // the slice's first element, in the param's dtype
  const void* grad;       // the slice's first grad element, same dtype
  int64_t length;         // elements in the slice
  int64_t state_offset;   // index of its first element in every state buffer (8-bit: multiple of 256)
  int64_t work_begin;     // index of the chunk's first work unit (prefix sum of the units before it)
  float neg_step_size;    // fl(-lr / (1 - beta1^step)), step of this param
  float inv_bc2;          // fl(1 / sqrt(1 - beta2^step))
  int32_t dtype;          // ParamDtype of param and grad
  int32_t reserved;
};

// The step's scalars, each rounded once from double on the host.
struct AdamWConsts {
  float decay;   // fl(1 - lr * weight_decay)
  float beta1;
  float omb1;    // fl(1 - beta1)
  float beta2;
  float omb2;    // fl(1 - beta2)
  float eps;
};

// State buffers, indexed by AdamWChunk::state_offset + element. fp32 states use exp_avg and
// exp_avg_sq; 8-bit states use the code buffers, their absmax (one per 256 elements) and the two
// 256-entry maps. master (fp32) is null unless the params keep an fp32 master copy.
struct AdamWStates {
  float* exp_avg = nullptr;
  float* exp_avg_sq = nullptr;
  uint8_t* exp_avg_q = nullptr;
  uint8_t* exp_avg_sq_q = nullptr;
  float* absmax_m = nullptr;
  float* absmax_v = nullptr;
  const float* qmap_m = nullptr;
  const float* qmap_v = nullptr;
  float* master = nullptr;
};

// One launch over every chunk of the table (chunks: device pointer, n_chunks rows, n_work units
// in all). found_inf (device, fp32 [1]) is set to 1 when a gradient element is NaN or +-Inf.
cudaError_t launch_adamw_step(const AdamWChunk* chunks, int64_t n_chunks, int64_t n_work, AdamWStates states,
                              AdamWConsts consts, float* found_inf, int sm_count, cudaStream_t stream);
cudaError_t launch_adamw8bit_step(const AdamWChunk* chunks, int64_t n_chunks, int64_t n_work, AdamWStates states,
                                  AdamWConsts consts, float* found_inf, int sm_count, cudaStream_t stream);

}  // namespace qk_cuda
