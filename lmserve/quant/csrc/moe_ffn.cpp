// MoeFeedForward (moe_ffn.h): routing, the experts grouped by expert over the block kernel, the
// shared expert, and the Python binding that lets tests and lmserve/layers/moe.py build and run it.
#include "moe_ffn.h"

#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <numeric>

namespace lmserve {
namespace {

// Per-thread buffers, reused from call to call and shared by every MoE layer a thread runs.
struct Scratch {
  std::vector<float> probs, weights, grouped_in, grouped_out, gate_up, act, shared_out;
  std::vector<int64_t> chosen, slot, starts, experts_order;
};

Scratch& scratch() {
  static thread_local Scratch buffers;
  return buffers;
}

// out [n, H] = down(silu(gate) * up) of x [n, H].
void run_swiglu(const IsaKernels& k, const BlockMatrix& gate_up, const BlockMatrix& down, const float* x, int64_t n,
                Scratch& s, float* out) {
  const int64_t inter = down.K;
  s.gate_up.resize(n * 2 * inter);
  s.act.resize(n * inter);
  float* gu = s.gate_up.data();
  float* act = s.act.data();
  k.matmul(x, n, gate_up, gu);
  parallel_chunks(n, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r)
      k.silu_mul(gu + r * 2 * inter, gu + (r * 2 + 1) * inter, inter, act + r * inter);
  });
  k.matmul(act, n, down, out);
}

}  // namespace

MoeFeedForward::MoeFeedForward(at::Tensor router, std::vector<at::Tensor> experts, std::vector<int64_t> expert_formats,
                               int64_t top_k, bool renormalize, std::vector<at::Tensor> shared,
                               std::vector<int64_t> shared_formats, at::Tensor shared_gate)
    : router_(router.contiguous()), top_k_(top_k), renormalize_(renormalize) {
  TORCH_CHECK(router_.dim() == 2 && router_.scalar_type() == torch::kFloat32, "the router must be dense fp32 [E, H]");
  const int64_t E = router_.size(0);
  hidden_ = router_.size(1);
  TORCH_CHECK(top_k >= 1 && top_k <= E, "top_k must be in [1, ", E, "], got ", top_k);
  TORCH_CHECK(experts.size() == static_cast<size_t>(6 * E) && expert_formats.size() == experts.size(),
              "each of the ", E, " experts needs 6 tensors (gate_up and down: q, scale, offset) and 6 formats");
  for (int64_t e = 0; e < E; ++e) experts_.push_back(checked_swiglu(experts, expert_formats, 6 * e));
  tensors_ = std::move(experts);
  TORCH_CHECK(shared.size() == shared_formats.size() && (shared.empty() || shared.size() == 6),
              "a shared expert is 6 tensors (gate_up and down: q, scale, offset) and 6 formats");
  if (!shared.empty()) {
    shared_gate_ = shared_gate.contiguous();
    TORCH_CHECK(shared_gate_.scalar_type() == torch::kFloat32 && shared_gate_.numel() == hidden_,
                "the shared expert's gate must be dense fp32 [1, H]");
    shared_ = checked_swiglu(shared, shared_formats, 0);
    tensors_.insert(tensors_.end(), shared.begin(), shared.end());
  } else {
    TORCH_CHECK(!shared_gate.defined() || shared_gate.numel() == 0, "a shared expert gate without a shared expert");
    shared_gate_ = torch::empty({0}, torch::kFloat32);
  }
}

MoeFeedForward::SwiGlu MoeFeedForward::checked_swiglu(const std::vector<at::Tensor>& t,
                                                      const std::vector<int64_t>& f, int64_t first) const {
  const SwiGlu m{block_matrix(t[first], t[first + 1], t[first + 2], f[first], f[first + 1], f[first + 2]),
                 block_matrix(t[first + 3], t[first + 4], t[first + 5], f[first + 3], f[first + 4], f[first + 5])};
  TORCH_CHECK(m.gate_up.K == hidden_ && m.down.N == hidden_ && m.gate_up.N == 2 * m.down.K,
              "an expert's gate_up must be [2I, ", hidden_, "] and its down [", hidden_, ", I]; got [", m.gate_up.N,
              ", ", m.gate_up.K, "] and [", m.down.N, ", ", m.down.K, "]");
  return m;
}

void MoeFeedForward::apply(const IsaKernels& k, const float* x, int64_t rows, float* out) const {
  const int64_t H = hidden_, E = num_experts(), K = top_k_, assignments = rows * K;
  Scratch& s = scratch();

  // Router logits [rows, E] as fp32 dot products, then per row the softmax in place.
  s.probs.resize(rows * E);
  float* probs = s.probs.data();
  const float* router = router_.data_ptr<float>();
  parallel_chunks(rows * E, std::max<int64_t>(1, 16384 / H), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) probs[i] = k.dot(x + i / E * H, router + i % E * H, H);
  });
  // Each row's top-k (largest probability first, the lower index on ties) and their weights.
  s.weights.resize(assignments);
  s.chosen.resize(assignments);
  s.experts_order.resize(E);
  for (int64_t r = 0; r < rows; ++r) {
    float* p = probs + r * E;
    const float top = *std::max_element(p, p + E);
    float total = 0.0f;
    for (int64_t e = 0; e < E; ++e) total += (p[e] = std::exp(p[e] - top));
    for (int64_t e = 0; e < E; ++e) p[e] /= total;
    std::iota(s.experts_order.begin(), s.experts_order.end(), 0);
    std::partial_sort(s.experts_order.begin(), s.experts_order.begin() + K, s.experts_order.end(),
                      [p](int64_t a, int64_t b) { return p[a] > p[b] || (p[a] == p[b] && a < b); });
    float kept = 0.0f;
    for (int64_t j = 0; j < K; ++j) {
      s.chosen[r * K + j] = s.experts_order[j];
      kept += (s.weights[r * K + j] = p[s.experts_order[j]]);
    }
    if (renormalize_)
      for (int64_t j = 0; j < K; ++j) s.weights[r * K + j] /= kept;
  }

  // Assignments (row, rank) grouped by expert, rows ascending within each: `slot` is where an
  // assignment's input and output rows sit in the grouped buffers, `starts` each expert's first.
  s.starts.assign(E + 1, 0);
  for (int64_t i = 0; i < assignments; ++i) ++s.starts[s.chosen[i] + 1];
  std::partial_sum(s.starts.begin(), s.starts.end(), s.starts.begin());
  s.slot.resize(assignments);
  s.grouped_in.resize(assignments * H);
  s.grouped_out.resize(assignments * H);
  std::vector<int64_t>& next = s.experts_order;  // reused: each expert's next free slot
  std::copy_n(s.starts.begin(), E, next.begin());
  for (int64_t i = 0; i < assignments; ++i) {
    s.slot[i] = next[s.chosen[i]]++;
    std::copy_n(x + i / K * H, H, s.grouped_in.data() + s.slot[i] * H);
  }
  // With a few rows per expert, each expert's matmuls are too small to share between threads
  // (a fork and join per matmul costs more than its work): then the threads take whole experts,
  // each running its matmuls alone with its own scratch. An expert's output does not depend on
  // which thread ran it.
  std::vector<int64_t> active;
  for (int64_t e = 0; e < E; ++e)
    if (s.starts[e + 1] > s.starts[e]) active.push_back(e);
  auto run_expert = [&](int64_t e, Scratch& own) {
    const int64_t first = s.starts[e], n = s.starts[e + 1] - first;
    run_swiglu(k, experts_[e].gate_up, experts_[e].down, s.grouped_in.data() + first * H, n, own,
               s.grouped_out.data() + first * H);
  };
  if (static_cast<int64_t>(active.size()) >= 2 * at::get_num_threads()) {
    parallel_chunks(static_cast<int64_t>(active.size()), 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) run_expert(active[i], scratch());
    });
  } else {
    for (int64_t e : active) run_expert(e, s);
  }

  // out = the weighted sum of each row's experts, rank by rank (+ the gated shared expert).
  const float* shared_out = nullptr;
  if (has_shared_expert()) {
    s.shared_out.resize(rows * H);
    run_swiglu(k, shared_.gate_up, shared_.down, x, rows, s, s.shared_out.data());
    shared_out = s.shared_out.data();
  }
  const float* gate = shared_gate_.data_ptr<float>();
  const float* grouped_out = s.grouped_out.data();
  parallel_chunks(rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      float* o = out + r * H;
      for (int64_t j = 0; j < K; ++j) {
        const float w = s.weights[r * K + j];
        const float* y = grouped_out + s.slot[r * K + j] * H;
        if (j == 0) {
          for (int64_t h = 0; h < H; ++h) o[h] = w * y[h];
        } else {
          for (int64_t h = 0; h < H; ++h) o[h] += w * y[h];
        }
      }
      if (shared_out == nullptr) continue;
      const float g = 1.0f / (1.0f + std::exp(-k.dot(x + r * H, gate, H)));
      for (int64_t h = 0; h < H; ++h) o[h] += g * shared_out[r * H + h];
    }
  });
}

void bind_moe_ffn(pybind11::module& m) {
  pybind11::class_<MoeFeedForward, std::shared_ptr<MoeFeedForward>>(m, "MoeFeedForward")
      .def(pybind11::init<torch::Tensor, std::vector<torch::Tensor>, std::vector<int64_t>, int64_t, bool,
                          std::vector<torch::Tensor>, std::vector<int64_t>, torch::Tensor>(),
           pybind11::arg("router"), pybind11::arg("experts"), pybind11::arg("expert_formats"), pybind11::arg("top_k"),
           pybind11::arg("renormalize"), pybind11::arg("shared"), pybind11::arg("shared_formats"),
           pybind11::arg("shared_gate"))
      .def(
          "forward",
          [](const MoeFeedForward& self, torch::Tensor x) {
            TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.size(1) == self.hidden_size(),
                        "x must be fp32 [rows, ", self.hidden_size(), "]");
            x = x.contiguous();
            torch::Tensor out = torch::empty_like(x);
            self.apply(kernels(), x.data_ptr<float>(), x.size(0), out.data_ptr<float>());
            return out;
          },
          "the block's output [rows, H] for x [rows, H] (fp32)", pybind11::call_guard<pybind11::gil_scoped_release>())
      .def_property_readonly("num_experts", &MoeFeedForward::num_experts)
      .def_property_readonly("top_k", &MoeFeedForward::top_k)
      .def_property_readonly("hidden_size", &MoeFeedForward::hidden_size)
      .def_property_readonly("has_shared_expert", &MoeFeedForward::has_shared_expert);
}

}  // namespace lmserve
