// Torch-facing glue of the multi-tensor AdamW CUDA kernels: params, grads and the chunk table in,
// one work table (AdamWChunk rows, adamw_kernels.h) built on the host in pinned memory, copied
// to the device with a non-blocking copy on the current stream, then ONE launch. No host
// synchronization: the pinned block is recycled by torch's caching host allocator only after the
// copy's event has completed, and the device copy of the table is freed into the caching
// allocator on the same stream as the kernel that reads it.
//
// The public ops (qlora_kernels/ops/adamw.py) validate every argument once; the checks here are
// the ones that keep the kernels' memory accesses in bounds.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <vector>

#include "adamw_kernels.h"

namespace qk_cuda {
namespace {

// As reference/adamw.py::step_constants: double on the host, rounded once to fp32.
AdamWConsts make_consts(double lr, double beta1, double beta2, double eps, double weight_decay) {
  return {static_cast<float>(1.0 - lr * weight_decay), static_cast<float>(beta1), static_cast<float>(1.0 - beta1),
          static_cast<float>(beta2), static_cast<float>(1.0 - beta2), static_cast<float>(eps)};
}

ParamDtype dtype_of(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return ParamDtype::kFloat32;
    case at::kHalf:
      return ParamDtype::kFloat16;
    case at::kBFloat16:
      return ParamDtype::kBFloat16;
    default:
      TORCH_CHECK(false, "adamw (cuda): params must be float32, float16 or bfloat16; got ", t);
  }
}

void check_state(const at::Tensor& t, at::ScalarType dtype, const at::Device& dev, const char* name) {
  TORCH_CHECK(t.device() == dev && t.is_contiguous() && t.scalar_type() == dtype, "adamw (cuda): ", name,
              " must be a contiguous ", dtype, " tensor on ", dev);
}

// The device-side work table of one launch; n_work receives the number of work units.
at::Tensor build_table(at::TensorList params, at::TensorList grads, const at::Tensor& chunks, at::IntArrayRef steps,
                       double lr, double beta1, double beta2, int64_t state_len, int64_t unit, bool blockwise,
                       const at::Device& dev, int64_t& n_work) {
  TORCH_CHECK(params.size() == grads.size() && params.size() == steps.size(),
              "adamw (cuda): params, grads and steps must have one entry per tensor");
  TORCH_CHECK(chunks.device().is_cpu() && chunks.scalar_type() == at::kLong && chunks.dim() == 2 &&
                  chunks.size(1) == 4,
              "adamw (cuda): chunks must be a CPU int64 tensor [n, 4]");
  std::vector<ParamDtype> dtypes(params.size());
  std::vector<float> nss(params.size()), ibc2(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    TORCH_CHECK(params[i].device() == dev && grads[i].device() == dev, "adamw (cuda): params and grads must be on ",
                dev);
    TORCH_CHECK(params[i].is_contiguous() && grads[i].is_contiguous(), "adamw (cuda): params and grads must be contiguous");
    TORCH_CHECK(grads[i].scalar_type() == params[i].scalar_type() && grads[i].numel() == params[i].numel(),
                "adamw (cuda): grad ", i, " must match its param in dtype and size");
    TORCH_CHECK(steps[i] >= 1, "adamw (cuda): steps must be >= 1");
    dtypes[i] = dtype_of(params[i].scalar_type());
    const double bc1 = 1.0 - std::pow(beta1, static_cast<double>(steps[i]));
    const double bc2 = 1.0 - std::pow(beta2, static_cast<double>(steps[i]));
    nss[i] = static_cast<float>(-(lr / bc1));
    ibc2[i] = static_cast<float>(1.0 / std::sqrt(bc2));
  }

  const at::Tensor ct = chunks.contiguous();
  const int64_t* c = ct.data_ptr<int64_t>();
  const int64_t n = ct.size(0);
  at::Tensor host = at::empty({static_cast<int64_t>(std::max<int64_t>(n, 1) * sizeof(AdamWChunk))},
                              at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  auto* rows = reinterpret_cast<AdamWChunk*>(host.data_ptr<uint8_t>());
  n_work = 0;
  for (int64_t r = 0; r < n; ++r) {
    const int64_t i = c[4 * r], start = c[4 * r + 1], length = c[4 * r + 2], offset = c[4 * r + 3];
    TORCH_CHECK(i >= 0 && i < static_cast<int64_t>(params.size()), "adamw (cuda): chunk ", r, " names tensor ", i);
    TORCH_CHECK(start >= 0 && length > 0 && start + length <= params[i].numel() && offset >= 0 &&
                    offset + length <= state_len,
                "adamw (cuda): chunk ", r, " is out of bounds");
    TORCH_CHECK(!blockwise || (start % kAdamWBlock == 0 && offset % kAdamWBlock == 0),
                "adamw (cuda): 8-bit chunks must start on a block of 256");
    const int64_t elem = params[i].element_size();
    AdamWChunk row;
    std::memset(&row, 0, sizeof(row));
    row.param = static_cast<char*>(params[i].data_ptr()) + start * elem;
    row.grad = static_cast<const char*>(grads[i].data_ptr()) + start * elem;
    row.length = length;
    row.state_offset = offset;
    row.work_begin = n_work;
    row.neg_step_size = nss[i];
    row.inv_bc2 = ibc2[i];
    row.dtype = static_cast<int32_t>(dtypes[i]);
    rows[r] = row;
    n_work += (length + unit - 1) / unit;
  }
  at::Tensor table = at::empty(host.sizes(), at::TensorOptions().dtype(at::kByte).device(dev));
  table.copy_(host, /*non_blocking=*/true);
  return table;
}

void adamw_step_cuda(at::TensorList params, at::TensorList grads, const at::Tensor& exp_avg,
                     const at::Tensor& exp_avg_sq, const std::optional<at::Tensor>& master,
                     const at::Tensor& found_inf, const at::Tensor& chunks, at::IntArrayRef steps, double lr,
                     double beta1, double beta2, double eps, double weight_decay) {
  const at::Device dev = exp_avg.device();
  const c10::cuda::CUDAGuard guard(dev);
  check_state(exp_avg, at::kFloat, dev, "exp_avg");
  check_state(exp_avg_sq, at::kFloat, dev, "exp_avg_sq");
  check_state(found_inf, at::kFloat, dev, "found_inf");
  TORCH_CHECK(exp_avg_sq.numel() == exp_avg.numel(), "adamw (cuda): exp_avg and exp_avg_sq must have one size");
  AdamWStates s;
  s.exp_avg = exp_avg.data_ptr<float>();
  s.exp_avg_sq = exp_avg_sq.data_ptr<float>();
  if (master.has_value()) {
    check_state(*master, at::kFloat, dev, "master");
    TORCH_CHECK(master->numel() == exp_avg.numel(), "adamw (cuda): master must be as long as exp_avg");
    s.master = master->data_ptr<float>();
  }
  if (chunks.size(0) == 0) return;
  int64_t n_work = 0;
  const at::Tensor table =
      build_table(params, grads, chunks, steps, lr, beta1, beta2, exp_avg.numel(), kAdamWTile, false, dev, n_work);
  C10_CUDA_CHECK(launch_adamw_step(reinterpret_cast<const AdamWChunk*>(table.data_ptr()), chunks.size(0), n_work, s,
                                   make_consts(lr, beta1, beta2, eps, weight_decay), found_inf.data_ptr<float>(),
                                   at::cuda::getCurrentDeviceProperties()->multiProcessorCount,
                                   c10::cuda::getCurrentCUDAStream()));
}

void adamw8bit_step_cuda(at::TensorList params, at::TensorList grads, const at::Tensor& exp_avg,
                         const at::Tensor& exp_avg_sq, const at::Tensor& absmax_m, const at::Tensor& absmax_v,
                         const at::Tensor& qmap_m, const at::Tensor& qmap_v, const std::optional<at::Tensor>& master,
                         const at::Tensor& found_inf, const at::Tensor& chunks, at::IntArrayRef steps, double lr,
                         double beta1, double beta2, double eps, double weight_decay) {
  const at::Device dev = exp_avg.device();
  const c10::cuda::CUDAGuard guard(dev);
  check_state(exp_avg, at::kByte, dev, "exp_avg");
  check_state(exp_avg_sq, at::kByte, dev, "exp_avg_sq");
  check_state(absmax_m, at::kFloat, dev, "absmax_m");
  check_state(absmax_v, at::kFloat, dev, "absmax_v");
  check_state(qmap_m, at::kFloat, dev, "qmap_m");
  check_state(qmap_v, at::kFloat, dev, "qmap_v");
  check_state(found_inf, at::kFloat, dev, "found_inf");
  const int64_t nblocks = (exp_avg.numel() + kAdamWBlock - 1) / kAdamWBlock;
  TORCH_CHECK(exp_avg_sq.numel() == exp_avg.numel() && absmax_m.numel() == nblocks && absmax_v.numel() == nblocks,
              "adamw8bit (cuda): state buffers must have one size and one absmax per 256 elements");
  TORCH_CHECK(qmap_m.numel() == 256 && qmap_v.numel() == 256, "adamw8bit (cuda): maps must have 256 values");
  AdamWStates s;
  s.exp_avg_q = exp_avg.data_ptr<uint8_t>();
  s.exp_avg_sq_q = exp_avg_sq.data_ptr<uint8_t>();
  s.absmax_m = absmax_m.data_ptr<float>();
  s.absmax_v = absmax_v.data_ptr<float>();
  s.qmap_m = qmap_m.data_ptr<float>();
  s.qmap_v = qmap_v.data_ptr<float>();
  if (master.has_value()) {
    check_state(*master, at::kFloat, dev, "master");
    TORCH_CHECK(master->numel() == exp_avg.numel(), "adamw8bit (cuda): master must be as long as exp_avg");
    s.master = master->data_ptr<float>();
  }
  if (chunks.size(0) == 0) return;
  int64_t n_work = 0;
  const at::Tensor table =
      build_table(params, grads, chunks, steps, lr, beta1, beta2, exp_avg.numel(), kAdamWBlock, true, dev, n_work);
  C10_CUDA_CHECK(launch_adamw8bit_step(reinterpret_cast<const AdamWChunk*>(table.data_ptr()), chunks.size(0), n_work,
                                       s, make_consts(lr, beta1, beta2, eps, weight_decay),
                                       found_inf.data_ptr<float>(),
                                       at::cuda::getCurrentDeviceProperties()->multiProcessorCount,
                                       c10::cuda::getCurrentCUDAStream()));
}

}  // namespace
}  // namespace qk_cuda

TORCH_LIBRARY_IMPL(qlora_kernels_C, CUDA, m) {
  m.impl("adamw_step", &qk_cuda::adamw_step_cuda);
  m.impl("adamw8bit_step", &qk_cuda::adamw8bit_step_cuda);
}
