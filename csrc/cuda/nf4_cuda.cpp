// Torch-facing glue of the NF4 CUDA kernels: tensors in, raw pointers and the current stream to
// the launchers in nf4_kernels.h. Argument checking is done once, by the public op
// (qlora_kernels/ops/nf4.py); here only what the kernels need to be safe.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "nf4_gemv_core.cuh"
#include "nf4_kernels.h"

namespace qk_cuda {
namespace {

OutDtype dtype_enum(at::ScalarType dtype, const char* what) {
  switch (dtype) {
    case at::kFloat:
      return OutDtype::kFloat32;
    case at::kHalf:
      return OutDtype::kFloat16;
    case at::kBFloat16:
      return OutDtype::kBFloat16;
    default:
      TORCH_CHECK(false, what, " (cuda): dtype must be float32, float16 or bfloat16; got ", dtype);
  }
}

// The weight's constants as kernel pointers; holds contiguous copies alive while in scope.
struct Weight {
  at::Tensor packed, absmax, code, nested_absmax, nested_code;
  NF4Scales scales;

  Weight(const at::Tensor& p, const at::Tensor& a, const at::Tensor& c, const std::optional<at::Tensor>& na,
         const std::optional<at::Tensor>& nc, double offset)
      : packed(p.contiguous()), absmax(a.contiguous()), code(c.contiguous()) {
    // The kernels read the packed bytes 16 at a time: a view at an odd offset gets an aligned copy.
    if (reinterpret_cast<uintptr_t>(packed.data_ptr()) % 16 != 0) packed = packed.clone();
    if (na.has_value()) {
      nested_absmax = na->contiguous();
      nested_code = nc->contiguous();
      scales.absmax_q = absmax.data_ptr<uint8_t>();
      scales.nested_absmax = nested_absmax.data_ptr<float>();
      scales.nested_code = nested_code.data_ptr<float>();
      scales.offset = static_cast<float>(offset);
    } else {
      scales.absmax = absmax.data_ptr<float>();
    }
  }
};

void dequantize_into(const Weight& w, int64_t blocksize, int64_t numel, at::Tensor& out) {
  TORCH_CHECK(blocksize % 32 == 0, "dequantize_nf4 (cuda): blocksize must be a multiple of 32; got ", blocksize);
  TORCH_CHECK(out.is_contiguous() && out.numel() == numel && out.device() == w.packed.device(),
              "dequantize_nf4 (cuda): out must be a contiguous tensor of ", numel, " elements on ",
              w.packed.device());
  C10_CUDA_CHECK(launch_dequantize_nf4(w.packed.data_ptr<uint8_t>(), w.scales, w.code.data_ptr<float>(), numel,
                                       static_cast<int>(blocksize), dtype_enum(out.scalar_type(), "dequantize_nf4"),
                                       out.data_ptr(), c10::cuda::getCurrentCUDAStream()));
}

at::Tensor dequantize_nf4_cuda(const at::Tensor& packed, const at::Tensor& absmax, const at::Tensor& code,
                               const std::optional<at::Tensor>& nested_absmax,
                               const std::optional<at::Tensor>& nested_code, double nested_offset, int64_t blocksize,
                               int64_t numel, at::ScalarType dtype) {
  const c10::cuda::CUDAGuard guard(packed.device());
  const Weight w(packed, absmax, code, nested_absmax, nested_code, nested_offset);
  at::Tensor out = at::empty({numel}, packed.options().dtype(dtype));
  dequantize_into(w, blocksize, numel, out);
  return out;
}

void dequantize_nf4_into_cuda(const at::Tensor& packed, const at::Tensor& absmax, const at::Tensor& code,
                              const std::optional<at::Tensor>& nested_absmax,
                              const std::optional<at::Tensor>& nested_code, double nested_offset, int64_t blocksize,
                              int64_t numel, at::Tensor out) {
  const c10::cuda::CUDAGuard guard(packed.device());
  const Weight w(packed, absmax, code, nested_absmax, nested_code, nested_offset);
  dequantize_into(w, blocksize, numel, out);
}

int sm_count(int device) {
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  return count;
}

at::Tensor nf4_gemv_cuda(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                         const at::Tensor& code, const std::optional<at::Tensor>& nested_absmax,
                         const std::optional<at::Tensor>& nested_code, double nested_offset, int64_t blocksize,
                         int64_t n, int64_t k) {
  const int64_t m = x.size(0);
  TORCH_CHECK(m >= 1 && m <= 4, "nf4_gemv (cuda): x must have 1..4 rows; got ", m);
  TORCH_CHECK(k % 32 == 0 && k % blocksize == 0, "nf4_gemv (cuda): K must be a multiple of 32 and of blocksize; got K=",
              k, ", blocksize=", blocksize);
  const c10::cuda::CUDAGuard guard(x.device());
  const Weight w(packed, absmax, code, nested_absmax, nested_code, nested_offset);
  const at::Tensor xc = x.contiguous();
  TORCH_CHECK(reinterpret_cast<uintptr_t>(xc.data_ptr()) % 16 == 0, "nf4_gemv (cuda): x must be 16-byte aligned");
  const int64_t splits = gemv_splits(n, k, sm_count(x.get_device()));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const OutDtype xt = dtype_enum(x.scalar_type(), "nf4_gemv");
  if (splits == 1) {
    at::Tensor y = at::empty({m, n}, x.options());
    C10_CUDA_CHECK(launch_nf4_gemv(xc.data_ptr(), xt, static_cast<int>(m), w.packed.data_ptr<uint8_t>(), w.scales,
                                   w.code.data_ptr<float>(), n, k, static_cast<int>(blocksize), 1, y.data_ptr(),
                                   stream));
    return y;
  }
  at::Tensor partial = at::empty({splits, m, n}, x.options().dtype(at::kFloat));
  C10_CUDA_CHECK(launch_nf4_gemv(xc.data_ptr(), xt, static_cast<int>(m), w.packed.data_ptr<uint8_t>(), w.scales,
                                 w.code.data_ptr<float>(), n, k, static_cast<int>(blocksize),
                                 static_cast<int>(splits), partial.data_ptr(), stream));
  return partial.sum(0).to(x.scalar_type());
}

}  // namespace
}  // namespace qk_cuda

TORCH_LIBRARY_IMPL(qlora_kernels_C, CUDA, m) {
  m.impl("dequantize_nf4", &qk_cuda::dequantize_nf4_cuda);
  m.impl("dequantize_nf4_into", &qk_cuda::dequantize_nf4_into_cuda);
  m.impl("nf4_gemv", &qk_cuda::nf4_gemv_cuda);
}
