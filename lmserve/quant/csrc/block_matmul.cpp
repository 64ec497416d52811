// The Python bindings of the block-quantized matmul and dequantization (layout in
// block_kernels.h, kernels in isa_kernels.h), and the choice of instruction-set variant.
#include "block_kernels.h"

#include <torch/extension.h>

#include <algorithm>
#include <string>
#include <tuple>

namespace lmserve {

BlockMatrix block_matrix(const torch::Tensor& q, const torch::Tensor& scale, const torch::Tensor& bias,
                         int64_t group, int64_t bits, int64_t rows) {
  TORCH_CHECK(bits == 4 || bits == 8, "bits must be 4 or 8");
  TORCH_CHECK(bits == 8 ? (group == 16 || group == 32) : group == 32, "unsupported group size");
  const bool half = scale.scalar_type() == torch::kFloat16;
  TORCH_CHECK(q.is_contiguous() && scale.is_contiguous() && (half || scale.scalar_type() == torch::kFloat32),
              "scales must be contiguous fp32 or fp16");
  TORCH_CHECK(scale.dim() == 3 && scale.size(2) == 8 && scale.size(0) == (rows + 7) / 8,
              "scales must be [row blocks, groups, 8]");
  const bool has_bias = bias.defined() && bias.numel() > 0;
  TORCH_CHECK(!has_bias || (bias.is_contiguous() && bias.sizes() == scale.sizes() &&
                            bias.scalar_type() == scale.scalar_type()),
              "offsets must have the scales' shape and type");
  const int64_t K = scale.size(1) * group;
  TORCH_CHECK(q.numel() == scale.size(0) * 8 * K * bits / 8, "packed values do not match the scales' shape");
  return BlockMatrix{reinterpret_cast<const uint8_t*>(q.data_ptr()), scale.data_ptr(),
                     has_bias ? bias.data_ptr() : nullptr, rows, K, group, static_cast<int>(bits), half};
}

namespace {

// Every variant built, best first, and the one in use.
const IsaKernels* const kVariants[] = {&avx512::kernels, &avx2::kernels};
std::atomic<const IsaKernels*> active{&avx2::kernels};

// (name, label, whether this CPU runs it) of every variant, best first.
std::vector<std::tuple<std::string, std::string, bool>> isa_variants() {
  std::vector<std::tuple<std::string, std::string, bool>> variants;
  for (const IsaKernels* v : kVariants) variants.emplace_back(v->name, v->label, v->runs_here());
  return variants;
}

// Makes the named variant the one every later call runs (refused where the CPU lacks it).
void use_isa(const std::string& name) {
  for (const IsaKernels* v : kVariants) {
    if (name != v->name) continue;
    TORCH_CHECK(v->runs_here(), "this CPU cannot run the ", v->label, " kernels");
    active.store(v);
    return;
  }
  TORCH_CHECK(false, "no kernel variant named ", name);
}

}  // namespace

const IsaKernels& kernels() { return *active.load(std::memory_order_relaxed); }

void slab_gemm(const BlockMatrix& w, const float* x, int64_t M, bool bf16, float* out) {
  constexpr int64_t kScratchFloats = int64_t{1} << 19;
  static thread_local torch::Tensor scratch;
  const int64_t slab = std::max<int64_t>(8, kScratchFloats / w.K / 8 * 8);  // whole blocks of 8 rows
  if (!scratch.defined() || scratch.numel() < slab * w.K) scratch = torch::empty({slab * w.K}, torch::kFloat32);
  const auto dtype = bf16 ? torch::kBFloat16 : torch::kFloat32;
  const torch::Tensor x_d = torch::from_blob(const_cast<float*>(x), {M, w.K}).to(dtype);
  // Each slab's products land straight in their columns of [M, N] (a GEMM with a leading
  // dimension of N): no transposed copy of the result, which cost as much as a bf16 GEMM.
  const torch::Tensor out_f = torch::from_blob(out, {M, w.N});
  torch::Tensor out_d = bf16 ? torch::empty({M, w.N}, dtype) : out_f;
  float* buffer = scratch.data_ptr<float>();
  for (int64_t start = 0; start < w.N; start += slab) {
    const int64_t count = std::min(slab, w.N - start);
    at::parallel_for(start / 8, (start + count + 7) / 8, 4, [&](int64_t begin, int64_t end) {
      avx2::dequantize_blocks(w, start, buffer, begin, end);
    });
    const torch::Tensor weight = scratch.narrow(0, 0, count * w.K).view({count, w.K});
    torch::Tensor target = out_d.narrow(1, start, count);
    torch::mm_out(target, x_d, weight.to(dtype).t());
  }
  if (bf16) out_f.copy_(out_d);
}

}  // namespace lmserve

namespace {

// x [M, K] fp32, returns [M, rows] fp32.
torch::Tensor block_matmul(torch::Tensor x, torch::Tensor q, torch::Tensor scale, torch::Tensor bias,
                           int64_t group, int64_t bits, int64_t rows) {
  const lmserve::BlockMatrix w = lmserve::block_matrix(q, scale, bias, group, bits, rows);
  x = x.contiguous();
  TORCH_CHECK(x.scalar_type() == torch::kFloat32, "activations must be fp32");
  TORCH_CHECK(x.dim() == 2 && x.size(1) == w.K, "weight has ", w.K, " columns, input has ", x.size(-1));
  auto out = torch::empty({x.size(0), w.N}, x.options());
  lmserve::kernels().matmul(x.data_ptr<float>(), x.size(0), w, out.data_ptr<float>());
  return out;
}

// x [M, K] fp32 through slab_gemm (the many-rows path), returns [M, rows] fp32.
torch::Tensor block_slab_gemm(torch::Tensor x, torch::Tensor q, torch::Tensor scale, torch::Tensor bias,
                              int64_t group, int64_t bits, int64_t rows, bool bf16) {
  const lmserve::BlockMatrix w = lmserve::block_matrix(q, scale, bias, group, bits, rows);
  x = x.contiguous();
  TORCH_CHECK(x.scalar_type() == torch::kFloat32, "activations must be fp32");
  TORCH_CHECK(x.dim() == 2 && x.size(1) == w.K, "weight has ", w.K, " columns, input has ", x.size(-1));
  auto out = torch::empty({x.size(0), w.N}, x.options());
  lmserve::slab_gemm(w, x.data_ptr<float>(), x.size(0), bf16, out.data_ptr<float>());
  return out;
}

// Writes the dense fp32 rows [first_row, first_row + out rows) of the weight into `out` (a reused
// buffer: fresh large allocations would page-fault on every call). first_row is a multiple of 8.
void block_dequantize(torch::Tensor q, torch::Tensor scale, torch::Tensor bias, int64_t group, int64_t bits,
                      int64_t rows, int64_t first_row, torch::Tensor out) {
  const lmserve::BlockMatrix w = lmserve::block_matrix(q, scale, bias, group, bits, rows);
  TORCH_CHECK(out.is_contiguous() && out.scalar_type() == torch::kFloat32 && out.dim() == 2 && out.size(1) == w.K);
  const int64_t count = out.size(0);
  TORCH_CHECK(first_row % 8 == 0 && first_row >= 0 && first_row + count <= w.N && (count % 8 == 0 || first_row + count == w.N),
              "dequantized rows must be whole blocks of 8 (or end at the last row)");
  float* op = out.data_ptr<float>();
  at::parallel_for(first_row / 8, (first_row + count + 7) / 8, 4, [&](int64_t begin, int64_t end) {
    lmserve::avx2::dequantize_blocks(w, first_row, op, begin, end);
  });
}

// Dense fp32 rows `ids` [n] of the weight, [n, K] (embedding lookups in a packed token table).
torch::Tensor block_gather_rows(torch::Tensor q, torch::Tensor scale, torch::Tensor bias, int64_t group, int64_t bits,
                                int64_t rows, torch::Tensor ids) {
  const lmserve::BlockMatrix w = lmserve::block_matrix(q, scale, bias, group, bits, rows);
  ids = ids.contiguous();
  TORCH_CHECK(ids.scalar_type() == torch::kInt64 && ids.dim() == 1, "ids must be int64 [n]");
  auto out = torch::empty({ids.size(0), w.K}, torch::kFloat32);
  lmserve::avx2::gather_rows(w, ids.data_ptr<int64_t>(), ids.size(0), out.data_ptr<float>());
  return out;
}

}  // namespace

namespace lmserve {
void bind_fused_decoder(pybind11::module& m);  // fused_decoder.cpp
void bind_row_stats(pybind11::module& m);     // row_stats.cpp
void bind_moe_ffn(pybind11::module& m);       // moe_ffn.cpp
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  lmserve::bind_fused_decoder(m);
  lmserve::bind_row_stats(m);
  lmserve::bind_moe_ffn(m);
  // Both release the GIL (as PyTorch's own ops do), so a server's event loop runs meanwhile.
  m.def("block_matmul", &block_matmul, "x @ W^T for a block-quantized W (fp32 activations)",
        pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("block_slab_gemm", &block_slab_gemm, "x @ W^T for many rows: W dequantized by slabs, then GEMM",
        pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("block_dequantize", &block_dequantize, "dense fp32 rows of a block-quantized weight, into out",
        pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("isa_variants", &lmserve::isa_variants, "(name, label, runs on this CPU) of each kernel variant, best first");
  m.def("use_isa", &lmserve::use_isa, "run the named kernel variant from now on");
  m.def("isa", [] { return std::string(lmserve::kernels().name); }, "the name of the kernel variant in use");
  m.def("kernel_max_rows", [] { return lmserve::kernels().kernel_max_rows; },
        "the most rows the variant in use multiplies faster than a dequantize-then-fp32-GEMM");
  m.def("block_gather_rows", &block_gather_rows, "dense fp32 copies of the given rows of a block-quantized weight",
        pybind11::call_guard<pybind11::gil_scoped_release>());
}
