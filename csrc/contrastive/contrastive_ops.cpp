// Operator schemas (namespace famevil_fast), argument checks, the combination of partial states into
// statistics, and the registrations of the CPU and (when built with CUDA) CUDA implementations.
#include "contrastive/contrastive.h"
#include "contrastive/op_wrappers.h"

#include <torch/library.h>

#include <sstream>
#include <string>

namespace famevil_fast::contrastive {
namespace {

std::string shape_of(const at::Tensor& t) {
  std::ostringstream os;
  os << t.sizes();
  return os.str();
}

bool supported_input(at::ScalarType t) {
  return t == at::kHalf || t == at::kBFloat16 || t == at::kFloat || t == at::kDouble;
}

void check_pair(const at::Tensor& a, const at::Tensor& b, const char* op, const char* names) {
  TORCH_CHECK_VALUE(a.defined() && b.defined(), op, ": ", names, " must be tensors");
  TORCH_CHECK_VALUE(a.dim() == 2 && b.dim() == 2, op, ": ", names, " must be 2-D (M, D) and (N, D), got ",
                    shape_of(a), " and ", shape_of(b));
  TORCH_CHECK_VALUE(a.size(1) == b.size(1), op, ": ", names, " have different feature sizes: ", shape_of(a), " and ",
                    shape_of(b));
  TORCH_CHECK_VALUE(a.size(0) > 0 && b.size(0) > 0, op, ": ", names, " must not be empty, got ", shape_of(a), " and ",
                    shape_of(b));
  TORCH_CHECK_VALUE(a.device() == b.device(), op, ": ", names, " are on different devices: ", a.device(), " and ",
                    b.device());
  TORCH_CHECK_VALUE(a.scalar_type() == b.scalar_type(), op, ": ", names, " have different dtypes: ", a.scalar_type(),
                    " and ", b.scalar_type());
  TORCH_CHECK_VALUE(supported_input(a.scalar_type()), op, ": ", names,
                    " must be float16, bfloat16, float32 or float64, got ", a.scalar_type());
}

void check_scale(const at::Tensor& s, const at::Tensor& like, const char* op, const char* name) {
  TORCH_CHECK_VALUE(s.defined() && s.numel() == 1, op, ": ", name, " must be a one-element tensor");
  TORCH_CHECK_VALUE(s.device() == like.device(), op, ": ", name, " is on ", s.device(), " but the inputs are on ",
                    like.device());
}

void check_key(const at::Tensor& key, int64_t n, const at::Tensor& like, const char* op, const char* name) {
  TORCH_CHECK_VALUE(key.defined() && key.dim() == 1 && key.size(0) == n, op, ": ", name, " must have shape (", n,
                    "), got ", key.defined() ? shape_of(key) : std::string("nothing"));
  TORCH_CHECK_VALUE(key.scalar_type() == at::kInt, op, ": ", name, " must be int32, got ", key.scalar_type());
  TORCH_CHECK_VALUE(key.device() == like.device(), op, ": ", name, " is on ", key.device(), " but the inputs are on ",
                    like.device());
}

at::Tensor scale_tensor(const at::Tensor& s, const at::Tensor& like) {
  return s.reshape({}).to(accumulation_type(like.scalar_type())).contiguous();
}

}  // namespace

at::ScalarType accumulation_type(at::ScalarType input) { return input == at::kDouble ? at::kDouble : at::kFloat; }

void check_problem(const Problem& p, const char* op) {
  check_pair(p.a, p.b, op, "a and b");
  check_scale(p.scale, p.a, op, "scale");
  if (p.distill()) {
    check_pair(p.teacher_a, p.teacher_b, op, "teacher_a and teacher_b");
    TORCH_CHECK_VALUE(p.teacher_a.size(0) == p.a.size(0) && p.teacher_b.size(0) == p.b.size(0), op,
                      ": the teacher batch differs from the student batch: a ", shape_of(p.a), ", b ", shape_of(p.b),
                      ", teacher_a ", shape_of(p.teacher_a), ", teacher_b ", shape_of(p.teacher_b));
    TORCH_CHECK_VALUE(p.teacher_a.device() == p.a.device(), op, ": the teacher is on ", p.teacher_a.device(),
                      " but the student is on ", p.a.device());
    TORCH_CHECK_VALUE(p.teacher_a.scalar_type() == p.a.scalar_type(), op, ": the teacher has dtype ",
                      p.teacher_a.scalar_type(), " but the student has ", p.a.scalar_type());
    check_scale(p.teacher_scale, p.a, op, "teacher_scale");
  } else {
    check_key(p.row_key, p.a.size(0), p.a, op, "row_key");
    check_key(p.col_key, p.b.size(0), p.a, op, "col_key");
  }
}

void check_stats_tensor(const at::Tensor& t, int64_t n, const Problem& p, const char* op, const char* name) {
  const at::ScalarType acc = accumulation_type(p.a.scalar_type());
  TORCH_CHECK_VALUE(t.defined() && t.dim() == 2 && t.size(0) == 3 && t.size(1) == n, op, ": ", name,
                    " must have shape (3, ", n, "), got ", t.defined() ? shape_of(t) : std::string("nothing"));
  TORCH_CHECK_VALUE(t.scalar_type() == acc, op, ": ", name, " must be ", acc, ", got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == p.a.device(), op, ": ", name, " is on ", t.device(), " but the inputs are on ",
                    p.a.device());
}

std::tuple<Stats, at::Tensor, at::Tensor> checked_backward_inputs(const Problem& p, const at::Tensor& rows,
                                                                  const at::Tensor& col_stats,
                                                                  const at::Tensor& grad_rows,
                                                                  const at::Tensor& grad_cols, const char* op) {
  const int64_t m = p.a.size(0), n = p.b.size(0);
  check_stats_tensor(rows, m, p, op, "rows");
  check_stats_tensor(grad_rows, m, p, op, "grad_rows");
  if (!p.cols) return {Stats{rows.contiguous(), col_stats}, grad_rows.contiguous(), grad_cols};
  check_stats_tensor(col_stats, n, p, op, "col_stats");
  check_stats_tensor(grad_cols, n, p, op, "grad_cols");
  return {Stats{rows.contiguous(), col_stats.contiguous()}, grad_rows.contiguous(), grad_cols.contiguous()};
}

Problem infonce_problem(const at::Tensor& a, const at::Tensor& b, const at::Tensor& scale, const at::Tensor& row_key,
                        const at::Tensor& col_key, bool cols) {
  const char* op = "famevil_fast::contrastive_stats";
  check_pair(a, b, op, "a and b");
  check_scale(scale, a, op, "scale");
  Problem p;
  p.a = a.contiguous();
  p.b = b.contiguous();
  p.scale = scale_tensor(scale, a);
  p.row_key = row_key.contiguous();
  p.col_key = col_key.contiguous();
  p.cols = cols;
  check_problem(p, op);
  return p;
}

Problem distill_problem(const at::Tensor& a, const at::Tensor& b, const at::Tensor& scale, const at::Tensor& teacher_a,
                        const at::Tensor& teacher_b, const at::Tensor& teacher_scale, bool cols) {
  const char* op = "famevil_fast::contrastive_distill_stats";
  check_pair(a, b, op, "a and b");
  check_scale(scale, a, op, "scale");
  check_scale(teacher_scale, a, op, "teacher_scale");
  Problem p;
  p.a = a.contiguous();
  p.b = b.contiguous();
  p.scale = scale_tensor(scale, a);
  p.teacher_a = teacher_a.contiguous();
  p.teacher_b = teacher_b.contiguous();
  p.teacher_scale = scale_tensor(teacher_scale, a);
  p.cols = cols;
  check_problem(p, op);
  return p;
}

at::Tensor finalize(const at::Tensor& partial, bool distill) {
  const at::Tensor lse = at::logsumexp(partial.select(1, 0) + partial.select(1, 1).log(), 0);
  if (!distill) return at::stack({lse, partial.select(1, 2).sum(0), partial.select(1, 3).sum(0)});
  const at::Tensor teacher_max = partial.select(1, 2);
  const at::Tensor teacher_lse = at::logsumexp(teacher_max + partial.select(1, 3).log(), 0);
  const at::Tensor weighted = (partial.select(1, 4) * (teacher_max - teacher_lse).exp()).sum(0);
  return at::stack({lse, teacher_lse, weighted});
}

}  // namespace famevil_fast::contrastive

TORCH_LIBRARY_FRAGMENT(famevil_fast, m) {
  // the fake (meta) implementations and the autograd wrappers live in this Python module
  m.set_python_module("famevil_fast.ops.contrastive");
  m.def("contrastive_stats(Tensor a, Tensor b, Tensor scale, Tensor row_key, Tensor col_key, bool cols) "
        "-> (Tensor, Tensor)");
  m.def("contrastive_stats_backward(Tensor grad_rows, Tensor grad_cols, Tensor a, Tensor b, Tensor scale, "
        "Tensor row_key, Tensor col_key, Tensor rows, Tensor col_stats, bool cols) -> (Tensor, Tensor, Tensor)");
  m.def("contrastive_distill_stats(Tensor a, Tensor b, Tensor scale, Tensor teacher_a, Tensor teacher_b, "
        "Tensor teacher_scale, bool cols) -> (Tensor, Tensor)");
  m.def("contrastive_distill_stats_backward(Tensor grad_rows, Tensor grad_cols, Tensor a, Tensor b, Tensor scale, "
        "Tensor teacher_a, Tensor teacher_b, Tensor teacher_scale, Tensor rows, Tensor col_stats, bool cols) "
        "-> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(famevil_fast, CPU, m) {
  namespace fc = famevil_fast::contrastive;
  m.impl("contrastive_stats", &fc::infonce_stats<&fc::forward_cpu>);
  m.impl("contrastive_stats_backward", &fc::infonce_stats_backward<&fc::backward_cpu>);
  m.impl("contrastive_distill_stats", &fc::distill_stats<&fc::forward_cpu>);
  m.impl("contrastive_distill_stats_backward", &fc::distill_stats_backward<&fc::backward_cpu>);
}

#ifdef FAMEVIL_FAST_WITH_CUDA
TORCH_LIBRARY_IMPL(famevil_fast, CUDA, m) {
  namespace fc = famevil_fast::contrastive;
  m.impl("contrastive_stats", &fc::infonce_stats<&fc::forward_cuda>);
  m.impl("contrastive_stats_backward", &fc::infonce_stats_backward<&fc::backward_cuda>);
  m.impl("contrastive_distill_stats", &fc::distill_stats<&fc::forward_cuda>);
  m.impl("contrastive_distill_stats_backward", &fc::distill_stats_backward<&fc::backward_cuda>);
}
#endif
