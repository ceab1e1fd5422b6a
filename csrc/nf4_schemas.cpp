// Schemas of the extension's NF4 kernels, in the private namespace `qlora_kernels_C`.
// The public ops (torch.ops.qlora_kernels.*, qlora_kernels/ops/nf4.py) validate arguments and
// decide when these run; argument meanings are documented there.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(qlora_kernels_C, m) {
  m.def("quantize_nf4(Tensor w, int blocksize) -> (Tensor, Tensor)");
  m.def(
      "dequantize_nf4(Tensor packed, Tensor absmax, Tensor code, Tensor? nested_absmax, "
      "Tensor? nested_code, float nested_offset, int blocksize, int numel, ScalarType dtype) -> Tensor");
  m.def(
      "dequantize_nf4_into(Tensor packed, Tensor absmax, Tensor code, Tensor? nested_absmax, "
      "Tensor? nested_code, float nested_offset, int blocksize, int numel, Tensor(a!) out) -> ()");
  // CUDA only: y = x @ deq(W)^T for 1..4 rows of x (decode), K % 32 == 0 and K % blocksize == 0.
  m.def(
      "nf4_gemv(Tensor x, Tensor packed, Tensor absmax, Tensor code, Tensor? nested_absmax, "
      "Tensor? nested_code, float nested_offset, int blocksize, int n, int k) -> Tensor");
  m.def(
      "nf4_matmul(Tensor x, Tensor packed, Tensor absmax, Tensor code, Tensor? nested_absmax, "
      "Tensor? nested_code, float nested_offset, int blocksize, int n, int k, bool transposed) -> Tensor");
  // CPU with avx512_bf16 only: W in the decode layout (tiles of 16 rows, codes and decoded block scales; see
  // nf4_cpu.cpp), and y = x @ deq(W)^T for bf16 x from that layout and the code table.
  m.def(
      "nf4_tile(Tensor packed, Tensor absmax, Tensor? nested_absmax, Tensor? nested_code, float nested_offset, "
      "int blocksize, int n, int k) -> Tensor");
  m.def("nf4_matmul_tiled(Tensor x, Tensor tiled, Tensor code, int blocksize, int n, int k) -> Tensor");
}
