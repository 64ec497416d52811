// The sparse mixture-of-experts feed-forward block (Mixtral, Qwen2-MoE, Qwen3-MoE) in native code,
// over experts held in the block kernel's layout (block_kernels.h). It computes what
// lmserve/layers/moe.py's SparseMoeBlock computes: a dense fp32 router, softmax over all experts,
// the top-k per row (ties to the lower index, as torch.topk), optionally renormalised; each expert
// that received rows runs once per call over all of them (gate_up, silu * up, down), and every
// row's output is the routing-weighted sum of its experts in rank order, plus an optional shared
// expert scaled by sigmoid(shared_gate . x). A row's result does not depend on the other rows.
//
// Built from Python (lmserve/layers/moe.py, `SparseMoeBlock.native_ffn`) and shared with other
// native code through std::shared_ptr (the binding's holder type), so a fused decoder can hold
// one per MoE layer and call `apply` from its own loop.
#pragma once

#include "block_kernels.h"

#include <vector>

namespace lmserve {

class MoeFeedForward {
 public:
  // router: the routing weight, dense fp32 [E, H].
  // experts: per expert e, in order, the (q, scale, offset) tensors of its gate_up [2I, H] (gate
  //   rows first) and then of its down [H, I] (6 tensors per expert; an empty offset for formats
  //   without one), with expert_formats the (group, bits, rows) of those two matrices (6 values per
  //   expert), as lmserve/quant/packed.py's BlockWeight holds them.
  // shared, shared_formats: the shared expert's 6 tensors and 6 values the same way, or both
  //   empty; shared_gate: its gate [1, H] dense fp32 (empty without a shared expert).
  MoeFeedForward(at::Tensor router, std::vector<at::Tensor> experts, std::vector<int64_t> expert_formats,
                 int64_t top_k, bool renormalize, std::vector<at::Tensor> shared,
                 std::vector<int64_t> shared_formats, at::Tensor shared_gate);

  // out [rows, H] (overwritten; must not overlap x) = the block's output for x [rows, H], both
  // fp32 and contiguous.
  // Scratch space is per calling thread, so calls from different threads do not interfere;
  // the matmuls use PyTorch's intra-op threads.
  void apply(const IsaKernels& k, const float* x, int64_t rows, float* out) const;

  int64_t hidden_size() const { return hidden_; }
  int64_t num_experts() const { return static_cast<int64_t>(experts_.size()); }
  int64_t top_k() const { return top_k_; }
  bool has_shared_expert() const { return shared_gate_.numel() > 0; }

 private:
  struct SwiGlu {  // down(silu(gate) * up), gate and up as one matrix
    BlockMatrix gate_up, down;
  };

  // The views of the 6 tensors and formats from `first`, shapes checked against hidden_.
  SwiGlu checked_swiglu(const std::vector<at::Tensor>& t, const std::vector<int64_t>& f, int64_t first) const;

  std::vector<at::Tensor> tensors_;  // the packed weights' storage, kept alive for the views below
  at::Tensor router_, shared_gate_;
  std::vector<SwiGlu> experts_;
  SwiGlu shared_{};  // valid when has_shared_expert()
  int64_t hidden_, top_k_;
  bool renormalize_;
};

}  // namespace lmserve
