// C++ tests of the CPU contrastive kernels against a naive computation that materialises the logits in
// float64. Run one case by name (infonce, distill, dispatcher, errors); exits non-zero on failure.
#include "contrastive/contrastive.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>

#include <cstdio>
#include <functional>
#include <map>
#include <string>
#include <tuple>

namespace fc = famevil_fast::contrastive;

namespace {

int failures = 0;

void expect_close(const at::Tensor& got, const at::Tensor& want, double tol, const std::string& what) {
  const double scale = std::max(1.0, want.abs().max().item<double>());
  const double err = (got.to(at::kDouble) - want).abs().max().item<double>();
  if (!(err <= tol * scale)) {
    std::printf("FAIL %s: max error %.3e (tolerance %.3e)\n", what.c_str(), err, tol * scale);
    ++failures;
  }
}

void expect(bool ok, const std::string& what) {
  if (!ok) {
    std::printf("FAIL %s\n", what.c_str());
    ++failures;
  }
}

struct Naive {
  at::Tensor rows, cols, grad_a, grad_b, grad_scale;
};

// Statistics and gradients from the full (M, N) logits in float64.
Naive naive(const fc::Problem& p, const at::Tensor& grad_rows, const at::Tensor& grad_cols) {
  const at::Tensor a = p.a.to(at::kDouble), b = p.b.to(at::kDouble);
  const double s = p.scale.item<double>();
  const at::Tensor dot = at::mm(a, b.t()), x = dot * s;
  const at::Tensor gr = grad_rows.to(at::kDouble), gc = grad_cols.to(at::kDouble);
  const at::Tensor lse_r = x.logsumexp(1, true), lse_c = x.logsumexp(0, true);
  at::Tensor g = gr[0].unsqueeze(1) * (x - lse_r).exp() + gc[0].unsqueeze(0) * (x - lse_c).exp();
  Naive out;
  if (p.distill()) {
    const at::Tensor y = at::mm(p.teacher_a.to(at::kDouble), p.teacher_b.to(at::kDouble).t()) * p.teacher_scale.item<double>();
    const at::Tensor pr = (y - y.logsumexp(1, true)).exp(), pc = (y - y.logsumexp(0, true)).exp();
    out.rows = at::stack({lse_r.squeeze(1), y.logsumexp(1), (pr * x).sum(1)});
    out.cols = at::stack({lse_c.squeeze(0), y.logsumexp(0), (pc * x).sum(0)});
    g = g + gr[2].unsqueeze(1) * pr + gc[2].unsqueeze(0) * pc;
  } else {
    const at::Tensor pos = p.row_key.unsqueeze(1).eq(p.col_key.unsqueeze(0)).to(at::kDouble);
    out.rows = at::stack({lse_r.squeeze(1), (x * pos).sum(1), x.sum(1)});
    out.cols = at::stack({lse_c.squeeze(0), (x * pos).sum(0), x.sum(0)});
    g = g + (gr[1].unsqueeze(1) + gc[1].unsqueeze(0)) * pos + gr[2].unsqueeze(1) + gc[2].unsqueeze(0);
  }
  out.grad_a = at::mm(g, b) * s;
  out.grad_b = at::mm(g.t(), a) * s;
  out.grad_scale = (g * dot).sum();
  return out;
}

fc::Problem random_problem(int64_t m, int64_t n, int64_t d, bool distill, at::ScalarType dtype, double scale) {
  fc::Problem p;
  p.a = at::randn({m, d}).to(dtype);
  p.b = at::randn({n, d}).to(dtype);
  p.scale = at::full({}, scale, at::TensorOptions().dtype(fc::accumulation_type(dtype)));
  if (distill) {
    p.teacher_a = at::randn({m, d + 3}).to(dtype);
    p.teacher_b = at::randn({n, d + 3}).to(dtype);
    p.teacher_scale = at::full({}, 1.7, p.scale.options());
  } else {
    p.row_key = at::randint(0, 5, {m}, at::kInt);
    p.col_key = at::randint(0, 5, {n}, at::kInt);
  }
  return p;
}

void check_problem_against_naive(int64_t m, int64_t n, int64_t d, bool distill, at::ScalarType dtype, bool cols) {
  const std::string name = std::string(distill ? "distill" : "infonce") + " " + std::to_string(m) + "x" +
                           std::to_string(n) + "x" + std::to_string(d) + " " + c10::toString(dtype) +
                           (cols ? " two-way" : " one-way");
  fc::Problem p = random_problem(m, n, d, distill, dtype, 3.0);
  p.cols = cols;
  const fc::Stats st = fc::forward_cpu(p);
  const auto acc = fc::accumulation_type(dtype);
  const at::Tensor grad_rows = at::randn({3, m}).to(acc);
  const at::Tensor grad_cols = cols ? at::randn({3, n}).to(acc) : at::zeros({3, n}, acc);
  const Naive want = naive(p, grad_rows, grad_cols);
  const double tol = dtype == at::kDouble ? 1e-10 : 1e-4;
  // gradients come back in the input dtype: bfloat16 keeps 8 significant bits
  const double grad_tol = dtype == at::kBFloat16 ? 8e-3 : tol;
  expect_close(st.rows, want.rows, tol, name + " row statistics");
  if (cols) {
    expect_close(st.cols, want.cols, tol, name + " column statistics");
  } else {
    expect(st.cols.size(1) == 0, name + " has no column statistics");
  }
  const fc::Grads g = fc::backward_cpu(p, st, grad_rows, cols ? grad_cols : at::zeros({3, 0}, acc));
  expect(g.a.scalar_type() == dtype && g.b.scalar_type() == dtype, name + " gradient dtypes");
  expect_close(g.a, want.grad_a, grad_tol, name + " grad a");
  expect_close(g.b, want.grad_b, grad_tol, name + " grad b");
  expect_close(g.scale, want.grad_scale, tol * 10, name + " grad scale");
}

void run_shapes(bool distill) {
  for (int threads : {1, 3}) {
    at::set_num_threads(threads);
    for (auto [m, n, d] : {std::tuple<int64_t, int64_t, int64_t>{1, 1, 1}, {37, 53, 19}, {300, 270, 40}, {2, 600, 8}}) {
      check_problem_against_naive(m, n, d, distill, at::kFloat, true);
      check_problem_against_naive(m, n, d, distill, at::kFloat, false);
    }
  }
  check_problem_against_naive(130, 140, 12, distill, at::kDouble, true);
  check_problem_against_naive(130, 140, 12, distill, at::kBFloat16, true);
}

void test_dispatcher() {
  using Fn = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                const at::Tensor&, const at::Tensor&, bool);
  const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("famevil_fast::contrastive_stats", "").typed<Fn>();
  fc::Problem p = random_problem(20, 30, 6, false, at::kFloat, 2.0);
  const auto [rows, cols] = op.call(p.a, p.b, p.scale, p.row_key, p.col_key, true);
  const Naive want = naive(p, at::zeros({3, 20}), at::zeros({3, 30}));
  expect_close(rows, want.rows, 1e-4, "dispatcher row statistics");
  expect_close(cols, want.cols, 1e-4, "dispatcher column statistics");
}

void expect_value_error(const std::function<void()>& fn, const std::string& what) {
  try {
    fn();
  } catch (const c10::ValueError&) {
    return;
  } catch (const std::exception& e) {
    std::printf("FAIL %s: wrong exception: %s\n", what.c_str(), e.what());
    ++failures;
    return;
  }
  std::printf("FAIL %s: no exception\n", what.c_str());
  ++failures;
}

void test_errors() {
  fc::Problem p = random_problem(4, 5, 3, false, at::kFloat, 1.0);
  fc::Problem bad = p;
  bad.b = at::randn({5, 4});
  expect_value_error([&] { fc::forward_cpu(bad); }, "feature size mismatch");
  bad = p;
  bad.b = p.b.to(at::kDouble);
  expect_value_error([&] { fc::forward_cpu(bad); }, "dtype mismatch");
  bad = p;
  bad.a = at::randn({0, 3});
  expect_value_error([&] { fc::forward_cpu(bad); }, "empty input");
  bad = p;
  bad.row_key = at::zeros({3}, at::kInt);
  expect_value_error([&] { fc::forward_cpu(bad); }, "key length");
  bad = p;
  bad.col_key = at::zeros({5}, at::kLong);
  expect_value_error([&] { fc::forward_cpu(bad); }, "key dtype");
  bad = p;
  bad.a = at::randint(0, 3, {4, 3}, at::kInt);
  bad.b = at::randint(0, 3, {5, 3}, at::kInt);
  expect_value_error([&] { fc::forward_cpu(bad); }, "integer inputs");
}

}  // namespace

int main(int argc, char** argv) {
  const std::map<std::string, std::function<void()>> cases = {
      {"infonce", [] { run_shapes(false); }},
      {"distill", [] { run_shapes(true); }},
      {"dispatcher", test_dispatcher},
      {"errors", test_errors},
  };
  at::manual_seed(0);
  int ran = 0;
  for (const auto& [name, fn] : cases) {
    if (argc > 1 && name != argv[1]) continue;
    fn();
    ++ran;
    std::printf("%s: %s\n", name.c_str(), failures ? "failures so far" : "ok");
  }
  if (ran == 0) {
    std::printf("unknown case %s\n", argc > 1 ? argv[1] : "");
    return 2;
  }
  return failures == 0 ? 0 : 1;
}
