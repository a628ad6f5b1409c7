// Adapters between the registered operator signatures (famevil_fast::contrastive_*) and the device
// implementations, which take a Problem. Each device's translation unit instantiates them with its own
// forward and backward functions.
#pragma once

#include "contrastive/contrastive.h"

#include <tuple>

namespace famevil_fast::contrastive {

using StatsPair = std::tuple<at::Tensor, at::Tensor>;
using GradTriple = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using ForwardFn = Stats (*)(const Problem&);
using BackwardFn = Grads (*)(const Problem&, const Stats&, const at::Tensor&, const at::Tensor&);

Problem infonce_problem(const at::Tensor& a, const at::Tensor& b, const at::Tensor& scale, const at::Tensor& row_key,
                        const at::Tensor& col_key, bool cols);
Problem distill_problem(const at::Tensor& a, const at::Tensor& b, const at::Tensor& scale, const at::Tensor& teacher_a,
                        const at::Tensor& teacher_b, const at::Tensor& teacher_scale, bool cols);

template <ForwardFn Forward>
StatsPair infonce_stats(const at::Tensor& a, const at::Tensor& b, const at::Tensor& scale, const at::Tensor& row_key,
                        const at::Tensor& col_key, bool cols) {
  Stats st = Forward(infonce_problem(a, b, scale, row_key, col_key, cols));
  return {st.rows, st.cols};
}

template <BackwardFn Backward>
GradTriple infonce_stats_backward(const at::Tensor& grad_rows, const at::Tensor& grad_cols, const at::Tensor& a,
                                  const at::Tensor& b, const at::Tensor& scale, const at::Tensor& row_key,
                                  const at::Tensor& col_key, const at::Tensor& rows, const at::Tensor& col_stats,
                                  bool cols) {
  const Problem p = infonce_problem(a, b, scale, row_key, col_key, cols);
  const auto [stats, g_rows, g_cols] =
      checked_backward_inputs(p, rows, col_stats, grad_rows, grad_cols, "famevil_fast::contrastive_stats_backward");
  Grads g = Backward(p, stats, g_rows, g_cols);
  return {g.a, g.b, g.scale};
}

template <ForwardFn Forward>
StatsPair distill_stats(const at::Tensor& a, const at::Tensor& b, const at::Tensor& scale, const at::Tensor& teacher_a,
                        const at::Tensor& teacher_b, const at::Tensor& teacher_scale, bool cols) {
  Stats st = Forward(distill_problem(a, b, scale, teacher_a, teacher_b, teacher_scale, cols));
  return {st.rows, st.cols};
}

template <BackwardFn Backward>
GradTriple distill_stats_backward(const at::Tensor& grad_rows, const at::Tensor& grad_cols, const at::Tensor& a,
                                  const at::Tensor& b, const at::Tensor& scale, const at::Tensor& teacher_a,
                                  const at::Tensor& teacher_b, const at::Tensor& teacher_scale, const at::Tensor& rows,
                                  const at::Tensor& col_stats, bool cols) {
  const Problem p = distill_problem(a, b, scale, teacher_a, teacher_b, teacher_scale, cols);
  const auto [stats, g_rows, g_cols] = checked_backward_inputs(p, rows, col_stats, grad_rows, grad_cols,
                                                               "famevil_fast::contrastive_distill_stats_backward");
  Grads g = Backward(p, stats, g_rows, g_cols);
  return {g.a, g.b, g.scale};
}

}  // namespace famevil_fast::contrastive
