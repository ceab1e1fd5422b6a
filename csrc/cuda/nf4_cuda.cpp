// Torch-facing glue of the NF4 CUDA kernels: tensors in, raw pointers and the current stream to
// the launchers in nf4_kernels.h. Argument checking is done once, by the public op
// (qlora_kernels/ops/nf4.py); here only what the kernels need to be safe.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "nf4_kernels.h"

namespace qk_cuda {
namespace {

OutDtype out_dtype_of(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat:
      return OutDtype::kFloat32;
    case at::kHalf:
      return OutDtype::kFloat16;
    case at::kBFloat16:
      return OutDtype::kBFloat16;
    default:
      TORCH_CHECK(false, "dequantize_nf4 (cuda): dtype must be float32, float16 or bfloat16; got ", dtype);
  }
}

at::Tensor dequantize_nf4_cuda(const at::Tensor& packed, const at::Tensor& absmax, const at::Tensor& code,
                               const std::optional<at::Tensor>& nested_absmax,
                               const std::optional<at::Tensor>& nested_code, double nested_offset, int64_t blocksize,
                               int64_t numel, at::ScalarType dtype) {
  TORCH_CHECK(blocksize % 32 == 0, "dequantize_nf4 (cuda): blocksize must be a multiple of 32; got ", blocksize);
  const c10::cuda::CUDAGuard guard(packed.device());
  const at::Tensor p = packed.contiguous();
  const at::Tensor a = absmax.contiguous();
  const at::Tensor c = code.contiguous();
  at::Tensor na, nc;
  NF4Scales scales;
  if (nested_absmax.has_value()) {
    na = nested_absmax->contiguous();
    nc = nested_code->contiguous();
    scales.absmax_q = a.data_ptr<uint8_t>();
    scales.nested_absmax = na.data_ptr<float>();
    scales.nested_code = nc.data_ptr<float>();
    scales.offset = static_cast<float>(nested_offset);
  } else {
    scales.absmax = a.data_ptr<float>();
  }
  at::Tensor out = at::empty({numel}, packed.options().dtype(dtype));
  const cudaError_t err =
      launch_dequantize_nf4(p.data_ptr<uint8_t>(), scales, c.data_ptr<float>(), numel, static_cast<int>(blocksize),
                            out_dtype_of(dtype), out.data_ptr(), c10::cuda::getCurrentCUDAStream());
  C10_CUDA_CHECK(err);
  return out;
}

}  // namespace
}  // namespace qk_cuda

TORCH_LIBRARY_IMPL(qlora_kernels_C, CUDA, m) { m.impl("dequantize_nf4", &qk_cuda::dequantize_nf4_cuda); }
