// Schemas of the extension's AdamW kernels, in the private namespace `qlora_kernels_C`.
// The public ops (torch.ops.qlora_kernels.adamw_step_ / adamw8bit_step_, qlora_kernels/ops/adamw.py)
// validate the arguments and decide when these run; the arguments are documented there and the
// math in qlora_kernels/reference/adamw.py.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(qlora_kernels_C, m) {
  m.def(
      "adamw_step(Tensor(a!)[] params, Tensor[] grads, Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, "
      "Tensor(d!)? master, Tensor(e!) found_inf, Tensor chunks, int[] steps, float lr, float beta1, "
      "float beta2, float eps, float weight_decay) -> ()");
  m.def(
      "adamw8bit_step(Tensor(a!)[] params, Tensor[] grads, Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, "
      "Tensor(d!) absmax_m, Tensor(e!) absmax_v, Tensor qmap_m, Tensor qmap_v, Tensor(f!)? master, "
      "Tensor(g!) found_inf, Tensor chunks, int[] steps, float lr, float beta1, float beta2, float eps, "
      "float weight_decay) -> ()");
}
