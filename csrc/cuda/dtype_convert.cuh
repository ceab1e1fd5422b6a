// Device helpers shared by the kernel-only .cu files: fp32 <-> storage dtype conversions
// (round to nearest even, as torch's .to()), and the NF4 block scale with the double-quant decode.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "nf4_kernels.h"

namespace qk_cuda {

template <typename T>
__device__ __forceinline__ float to_float(T v);
template <>
__device__ __forceinline__ float to_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// absmax of NF4 block `block`: fp32 as stored, or with double quantization
// nested_code[q] * nested_absmax[block / 256] + offset, rounded after the multiply and after the
// add (__fmul_rn / __fadd_rn forbid FMA contraction), as bitsandbytes and the reference compute it.
__device__ __forceinline__ float nf4_block_scale(const NF4Scales& s, int64_t block) {
  if (s.absmax_q == nullptr) return __ldg(s.absmax + block);
  const float scaled = __fmul_rn(__ldg(s.nested_code + s.absmax_q[block]), __ldg(s.nested_absmax + (block >> 8)));
  return __fadd_rn(scaled, s.offset);
}

}  // namespace qk_cuda
