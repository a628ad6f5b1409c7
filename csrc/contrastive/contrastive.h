// Tiled contrastive-loss statistics over the logits L = s * A B^T, shared by the CPU and CUDA kernels.
//
// The kernels never store L. One forward sweep produces, for every row i and (optionally) every column j,
// three statistics; the losses are cheap functions of them (assembled in famevil_fast/ops/contrastive.py):
//
//   InfoNCE mode (a positive key per row and per column; L_ij is a positive when the keys match):
//     0: log-sum-exp of the row (column)      1: sum of L over the positives      2: sum of L
//   Distillation mode (teacher logits T = t * A' B'^T computed tile by tile beside L):
//     0: log-sum-exp of L                     1: log-sum-exp of T                 2: sum_j softmax(T)_ij L_ij
//
// The backward sweep recomputes each tile once and turns the gradients of those statistics into
// dL_ij, then into dA, dB and ds.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace famevil_fast::contrastive {

constexpr int64_t kStatRows = 3;
constexpr int64_t kLseRow = 0;
constexpr int64_t kTeacherLseRow = 1;  // distillation mode
constexpr int64_t kWeightedRow = 2;    // distillation mode

// Channels of the running partial state that one tile sweep keeps per row or column (see finalize()).
constexpr int64_t kInfoNceChannels = 4;  // max, sum exp, positive sum, plain sum
constexpr int64_t kDistillChannels = 5;  // max, sum exp, teacher max, teacher sum exp, teacher-weighted sum

// One problem: the student pair and either positive keys (InfoNCE) or a teacher pair (distillation).
struct Problem {
  at::Tensor a;        // (M, D) float16 / bfloat16 / float32 / float64, contiguous
  at::Tensor b;        // (N, D) same dtype and device
  at::Tensor scale;    // 0-d, accumulation dtype (float32, float64 for float64 inputs)
  at::Tensor row_key;  // (M,) int32, InfoNCE mode
  at::Tensor col_key;  // (N,) int32, InfoNCE mode
  at::Tensor teacher_a;      // (M, Dt), distillation mode
  at::Tensor teacher_b;      // (N, Dt)
  at::Tensor teacher_scale;  // 0-d
  bool cols = true;          // also compute the column statistics

  bool distill() const { return teacher_a.defined(); }
  int64_t channels() const { return distill() ? kDistillChannels : kInfoNceChannels; }
};

struct Stats {
  at::Tensor rows;  // (3, M), accumulation dtype
  at::Tensor cols;  // (3, N), or (3, 0) without column statistics
};

struct Grads {
  at::Tensor a, b, scale;
};

at::ScalarType accumulation_type(at::ScalarType input);

// Validates shapes, dtypes and devices; throws c10::ValueError (Python ValueError) naming the problem.
void check_problem(const Problem& p, const char* op);

// The statistics and their gradients that a backward pass receives: (3, M) rows, and (3, N) columns when
// p.cols, in the accumulation dtype on the inputs' device. Returns them contiguous; throws c10::ValueError.
std::tuple<Stats, at::Tensor, at::Tensor> checked_backward_inputs(const Problem& p, const at::Tensor& rows,
                                                                  const at::Tensor& col_stats,
                                                                  const at::Tensor& grad_rows,
                                                                  const at::Tensor& grad_cols, const char* op);

// Combines per-group partial states (P, channels, L) into the (3, L) statistics.
at::Tensor finalize(const at::Tensor& partial, bool distill);

Stats forward_cpu(const Problem& p);
Grads backward_cpu(const Problem& p, const Stats& stats, const at::Tensor& grad_rows, const at::Tensor& grad_cols);

#ifdef FAMEVIL_FAST_WITH_CUDA
Stats forward_cuda(const Problem& p);
Grads backward_cuda(const Problem& p, const Stats& stats, const at::Tensor& grad_rows, const at::Tensor& grad_cols);
#endif

}  // namespace famevil_fast::contrastive
