// CPU implementation of the tiled contrastive statistics: tiles of A B^T come from BLAS (at::mm_out on
// views), the log-sum-exp bookkeeping runs in vectorised loops, and memory stays linear in M + N.
//
// Forward: rows are split into P_r groups and columns into P_c groups; task (r, c) owns the partial state
// of its rows for column group c and of its columns for row group r, so tasks never share an output.
// Backward: P row groups and P column groups; in round k task t works on (t, (t + k) mod P), so within a
// round no two tasks touch the same rows of dA or columns of dB, and every tile is recomputed once.
#include "contrastive/contrastive.h"
#include "contrastive/fast_exp.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FAMEVIL_FAST_VEC_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define FAMEVIL_FAST_VEC_CLONES
#endif

namespace famevil_fast::contrastive {
namespace {

constexpr int64_t kTileRows = 128;
constexpr int64_t kTileCols = 256;
constexpr int64_t kMinGroup = 16;  // rows (or columns) per group below which splitting stops paying

struct Range {
  int64_t begin, end;
  int64_t size() const { return end - begin; }
};

Range split(int64_t n, int64_t parts, int64_t k) { return {n * k / parts, n * (k + 1) / parts}; }

int64_t group_count(int64_t n) {
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n / kMinGroup));
}

template <typename acc_t>
constexpr acc_t neg_inf() {
  return -std::numeric_limits<acc_t>::infinity();
}

// Merges a block's (max, sum of exp(x - max)) into a running pair.
template <typename acc_t>
inline void merge_lse(acc_t& m, acc_t& z, acc_t block_m, acc_t block_z) {
  const acc_t nm = std::max(m, block_m);
  z = z * exp_vec(m - nm) + block_z * exp_vec(block_m - nm);
  m = nm;
}

// Same, also rescaling a weighted sum that is kept relative to the same max.
template <typename acc_t>
inline void merge_weighted(acc_t& m, acc_t& z, acc_t& w, acc_t block_m, acc_t block_z, acc_t block_w) {
  const acc_t nm = std::max(m, block_m);
  const acc_t f_old = exp_vec(m - nm), f_new = exp_vec(block_m - nm);
  z = z * f_old + block_z * f_new;
  w = w * f_old + block_w * f_new;
  m = nm;
}

// NaN-ignoring max; a NaN still reaches the sum of exponentials, so it is not lost.
template <typename acc_t>
FAMEVIL_FAST_VEC_CLONES acc_t row_max(const acc_t* x, int64_t n) {
  acc_t mx = neg_inf<acc_t>();
#pragma omp simd reduction(max : mx)
  for (int64_t j = 0; j < n; ++j) mx = x[j] > mx ? x[j] : mx;
  return mx;
}

template <typename acc_t>
FAMEVIL_FAST_VEC_CLONES acc_t row_sum_exp(const acc_t* x, int64_t n, acc_t mx) {
  acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < n; ++j) sum += exp_vec(x[j] - mx);
  return sum;
}

template <typename acc_t>
FAMEVIL_FAST_VEC_CLONES acc_t row_weighted_exp(const acc_t* y, const acc_t* x, int64_t n, acc_t mx, acc_t* z) {
  acc_t sum = 0, wsum = 0;
#pragma omp simd reduction(+ : sum, wsum)
  for (int64_t j = 0; j < n; ++j) {
    const acc_t e = exp_vec(y[j] - mx);
    sum += e;
    wsum += e * x[j];
  }
  *z = sum;
  return wsum;
}

template <typename acc_t>
FAMEVIL_FAST_VEC_CLONES void col_max(const acc_t* x, int64_t h, int64_t w, acc_t* mx) {
  std::fill(mx, mx + w, neg_inf<acc_t>());
  for (int64_t i = 0; i < h; ++i) {
    const acc_t* xr = x + i * w;
#pragma omp simd
    for (int64_t j = 0; j < w; ++j) mx[j] = xr[j] > mx[j] ? xr[j] : mx[j];
  }
}

template <typename acc_t>
FAMEVIL_FAST_VEC_CLONES void col_sum_exp(const acc_t* x, int64_t h, int64_t w, const acc_t* mx, acc_t* z) {
  std::fill(z, z + w, acc_t(0));
  for (int64_t i = 0; i < h; ++i) {
    const acc_t* xr = x + i * w;
#pragma omp simd
    for (int64_t j = 0; j < w; ++j) z[j] += exp_vec(xr[j] - mx[j]);
  }
}

template <typename acc_t>
FAMEVIL_FAST_VEC_CLONES void col_weighted_exp(const acc_t* y, const acc_t* x, int64_t h, int64_t w, const acc_t* mx,
                                              acc_t* z, acc_t* wsum) {
  std::fill(z, z + w, acc_t(0));
  std::fill(wsum, wsum + w, acc_t(0));
  for (int64_t i = 0; i < h; ++i) {
    const acc_t* yr = y + i * w;
    const acc_t* xr = x + i * w;
#pragma omp simd
    for (int64_t j = 0; j < w; ++j) {
      const acc_t e = exp_vec(yr[j] - mx[j]);
      z[j] += e;
      wsum[j] += e * xr[j];
    }
  }
}

// Views of the partial state (P, channels, L): channel ch of group g, offset to the first element.
template <typename acc_t>
struct PartialView {
  acc_t* base;
  int64_t channels, length;
  acc_t* at(int64_t group, int64_t ch, int64_t offset) const { return base + (group * channels + ch) * length + offset; }
};

template <typename acc_t>
void init_partial(const PartialView<acc_t>& v, int64_t group, Range range, bool distill) {
  for (int64_t ch = 0; ch < v.channels; ++ch) {
    const bool is_max = ch == 0 || (distill && ch == 2);
    std::fill(v.at(group, ch, range.begin), v.at(group, ch, range.end), is_max ? neg_inf<acc_t>() : acc_t(0));
  }
}

// A task's scratch: one tile of logits (and of teacher logits) plus per-column temporaries.
template <typename acc_t>
struct Scratch {
  std::vector<acc_t> x, y, g, cmax, csum, cw, cpos, cplain;
  Scratch() : x(kTileRows * kTileCols), y(kTileRows * kTileCols), g(kTileRows * kTileCols),
              cmax(kTileCols), csum(kTileCols), cw(kTileCols), cpos(kTileCols), cplain(kTileCols) {}
};

at::Tensor tile_view(void* data, int64_t h, int64_t w, const at::TensorOptions& opts) {
  return at::from_blob(data, {h, w}, opts);
}

// dst (h x w) = scale * src_rows(h) @ other_rows(w)^T
template <typename acc_t>
void logits_tile(acc_t* dst, const at::Tensor& src, const at::Tensor& other, Range rows, Range cols, acc_t scale) {
  at::Tensor out = tile_view(dst, rows.size(), cols.size(), src.options());
  at::mm_out(out, src.narrow(0, rows.begin, rows.size()), other.narrow(0, cols.begin, cols.size()).t());
  if (scale != acc_t(1)) out.mul_(scale);
}

template <typename acc_t>
struct ForwardContext {
  at::Tensor a, b, ta, tb;  // accumulation dtype, contiguous
  acc_t s, t;
  const int32_t* row_key;
  const int32_t* col_key;
  bool distill, cols;
  PartialView<acc_t> row_part, col_part;
};

template <typename acc_t>
void infonce_rows(const ForwardContext<acc_t>& c, const acc_t* x, Range rows, Range cols, int64_t group) {
  const int64_t w = cols.size();
  const int32_t* ck = c.col_key + cols.begin;
  for (int64_t i = 0; i < rows.size(); ++i) {
    const int64_t gi = rows.begin + i;
    const acc_t* xr = x + i * w;
    const acc_t mx = row_max(xr, w);
    const acc_t z = row_sum_exp(xr, w, mx);
    const int32_t key = c.row_key[gi];
    acc_t pos = 0, plain = 0;
    for (int64_t j = 0; j < w; ++j) {
      plain += xr[j];
      pos += ck[j] == key ? xr[j] : acc_t(0);
    }
    merge_lse(*c.row_part.at(group, 0, gi), *c.row_part.at(group, 1, gi), mx, z);
    *c.row_part.at(group, 2, gi) += pos;
    *c.row_part.at(group, 3, gi) += plain;
  }
}

template <typename acc_t>
void infonce_cols(const ForwardContext<acc_t>& c, Scratch<acc_t>& s, const acc_t* x, Range rows, Range cols,
                  int64_t group) {
  const int64_t h = rows.size(), w = cols.size();
  col_max(x, h, w, s.cmax.data());
  col_sum_exp(x, h, w, s.cmax.data(), s.csum.data());
  std::fill(s.cpos.begin(), s.cpos.begin() + w, acc_t(0));
  std::fill(s.cplain.begin(), s.cplain.begin() + w, acc_t(0));
  const int32_t* ck = c.col_key + cols.begin;
  for (int64_t i = 0; i < h; ++i) {
    const acc_t* xr = x + i * w;
    const int32_t key = c.row_key[rows.begin + i];
    for (int64_t j = 0; j < w; ++j) {
      s.cplain[j] += xr[j];
      s.cpos[j] += ck[j] == key ? xr[j] : acc_t(0);
    }
  }
  for (int64_t j = 0; j < w; ++j) {
    const int64_t gj = cols.begin + j;
    merge_lse(*c.col_part.at(group, 0, gj), *c.col_part.at(group, 1, gj), s.cmax[j], s.csum[j]);
    *c.col_part.at(group, 2, gj) += s.cpos[j];
    *c.col_part.at(group, 3, gj) += s.cplain[j];
  }
}

template <typename acc_t>
void distill_rows(const ForwardContext<acc_t>& c, const acc_t* x, const acc_t* y, Range rows, Range cols,
                  int64_t group) {
  const int64_t w = cols.size();
  for (int64_t i = 0; i < rows.size(); ++i) {
    const int64_t gi = rows.begin + i;
    const acc_t* xr = x + i * w;
    const acc_t* yr = y + i * w;
    const acc_t mx = row_max(xr, w);
    merge_lse(*c.row_part.at(group, 0, gi), *c.row_part.at(group, 1, gi), mx, row_sum_exp(xr, w, mx));
    const acc_t tmx = row_max(yr, w);
    acc_t tz = 0;
    const acc_t tw = row_weighted_exp(yr, xr, w, tmx, &tz);
    merge_weighted(*c.row_part.at(group, 2, gi), *c.row_part.at(group, 3, gi), *c.row_part.at(group, 4, gi), tmx, tz,
                   tw);
  }
}

template <typename acc_t>
void distill_cols(const ForwardContext<acc_t>& c, Scratch<acc_t>& s, const acc_t* x, const acc_t* y, Range rows,
                  Range cols, int64_t group) {
  const int64_t h = rows.size(), w = cols.size();
  col_max(x, h, w, s.cmax.data());
  col_sum_exp(x, h, w, s.cmax.data(), s.csum.data());
  for (int64_t j = 0; j < w; ++j) {
    const int64_t gj = cols.begin + j;
    merge_lse(*c.col_part.at(group, 0, gj), *c.col_part.at(group, 1, gj), s.cmax[j], s.csum[j]);
  }
  col_max(y, h, w, s.cmax.data());
  col_weighted_exp(y, x, h, w, s.cmax.data(), s.csum.data(), s.cw.data());
  for (int64_t j = 0; j < w; ++j) {
    const int64_t gj = cols.begin + j;
    merge_weighted(*c.col_part.at(group, 2, gj), *c.col_part.at(group, 3, gj), *c.col_part.at(group, 4, gj),
                   s.cmax[j], s.csum[j], s.cw[j]);
  }
}

template <typename acc_t>
void forward_task(const ForwardContext<acc_t>& c, Range rows, Range cols, int64_t rgroup, int64_t cgroup) {
  Scratch<acc_t> s;
  init_partial(c.row_part, cgroup, rows, c.distill);
  if (c.cols) init_partial(c.col_part, rgroup, cols, c.distill);
  for (int64_t i0 = rows.begin; i0 < rows.end; i0 += kTileRows) {
    const Range tr{i0, std::min(rows.end, i0 + kTileRows)};
    for (int64_t j0 = cols.begin; j0 < cols.end; j0 += kTileCols) {
      const Range tc{j0, std::min(cols.end, j0 + kTileCols)};
      logits_tile(s.x.data(), c.a, c.b, tr, tc, c.s);
      if (c.distill) {
        logits_tile(s.y.data(), c.ta, c.tb, tr, tc, c.t);
        distill_rows(c, s.x.data(), s.y.data(), tr, tc, cgroup);
        if (c.cols) distill_cols(c, s, s.x.data(), s.y.data(), tr, tc, rgroup);
      } else {
        infonce_rows(c, s.x.data(), tr, tc, cgroup);
        if (c.cols) infonce_cols(c, s, s.x.data(), tr, tc, rgroup);
      }
    }
  }
}

// Detached: the tile products run on worker threads, which do not inherit the dispatcher's exclusion of
// autograd, so the operands must not require grad.
template <typename acc_t>
at::Tensor as_acc(const at::Tensor& t) {
  return t.detach().to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
}

template <typename acc_t>
Stats forward_impl(const Problem& p) {
  const int64_t m = p.a.size(0), n = p.b.size(0), ch = p.channels();
  ForwardContext<acc_t> c;
  c.a = as_acc<acc_t>(p.a);
  c.b = as_acc<acc_t>(p.b);
  c.s = p.scale.item<acc_t>();
  c.distill = p.distill();
  c.cols = p.cols;
  if (c.distill) {
    c.ta = as_acc<acc_t>(p.teacher_a);
    c.tb = as_acc<acc_t>(p.teacher_b);
    c.t = p.teacher_scale.item<acc_t>();
  } else {
    c.t = 0;
  }
  c.row_key = c.distill ? nullptr : p.row_key.data_ptr<int32_t>();
  c.col_key = c.distill ? nullptr : p.col_key.data_ptr<int32_t>();
  const int64_t pr = group_count(m), pc = group_count(n);
  at::Tensor row_part = at::empty({pc, ch, m}, c.a.options());
  at::Tensor col_part = at::empty({p.cols ? pr : 0, ch, n}, c.a.options());
  c.row_part = {row_part.data_ptr<acc_t>(), ch, m};
  c.col_part = {col_part.data_ptr<acc_t>(), ch, n};
  at::parallel_for(0, pr * pc, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t r = task / pc, cg = task % pc;
      forward_task(c, split(m, pr, r), split(n, pc, cg), r, cg);
    }
  });
  Stats out;
  out.rows = finalize(row_part, c.distill);
  out.cols = p.cols ? finalize(col_part, c.distill) : at::empty({kStatRows, 0}, c.a.options());
  return out;
}

// ---------------------------------------------------------------------------------------------------
// Backward

template <typename acc_t>
struct BackwardContext {
  at::Tensor a, b, ta, tb, grad_a, grad_b;  // accumulation dtype
  acc_t s, t;
  const int32_t* row_key;
  const int32_t* col_key;
  bool distill, cols;
  // per row: lse, g0, g1, g2 (and teacher lse); per column likewise (pointers into contiguous stats/grads)
  const acc_t *lse_r, *g0_r, *g1_r, *g2_r, *tlse_r;
  const acc_t *lse_c, *g0_c, *g1_c, *g2_c, *tlse_c;
};

// g (h x w) = dLoss/dL for one tile from the dot products d (logits s * d); returns sum_ij g_ij d_ij, the
// tile's contribution to dLoss/ds.
template <typename acc_t>
FAMEVIL_FAST_VEC_CLONES acc_t infonce_grad_tile(const BackwardContext<acc_t>& c, const acc_t* d, acc_t* g, Range rows,
                                                Range cols) {
  const int64_t w = cols.size();
  const acc_t s = c.s;
  const int32_t* ck = c.col_key + cols.begin;
  acc_t ds = 0;
  for (int64_t i = 0; i < rows.size(); ++i) {
    const int64_t gi = rows.begin + i;
    const acc_t lse = c.lse_r[gi], g0 = c.g0_r[gi], g1 = c.g1_r[gi], g2 = c.g2_r[gi];
    const int32_t key = c.row_key[gi];
    const acc_t* dr = d + i * w;
    acc_t* gr = g + i * w;
#pragma omp simd
    for (int64_t j = 0; j < w; ++j) gr[j] = g0 * exp_vec(s * dr[j] - lse) + (ck[j] == key ? g1 : acc_t(0)) + g2;
    if (c.cols) {
      const acc_t* lc = c.lse_c + cols.begin;
      const acc_t* h0 = c.g0_c + cols.begin;
      const acc_t* h1 = c.g1_c + cols.begin;
      const acc_t* h2 = c.g2_c + cols.begin;
#pragma omp simd
      for (int64_t j = 0; j < w; ++j) {
        gr[j] += h0[j] * exp_vec(s * dr[j] - lc[j]) + (ck[j] == key ? h1[j] : acc_t(0)) + h2[j];
      }
    }
#pragma omp simd reduction(+ : ds)
    for (int64_t j = 0; j < w; ++j) ds += gr[j] * dr[j];
  }
  return ds;
}

// Same for distillation; y holds the teacher logits of the tile.
template <typename acc_t>
FAMEVIL_FAST_VEC_CLONES acc_t distill_grad_tile(const BackwardContext<acc_t>& c, const acc_t* d, const acc_t* y,
                                                acc_t* g, Range rows, Range cols) {
  const int64_t w = cols.size();
  const acc_t s = c.s;
  acc_t ds = 0;
  for (int64_t i = 0; i < rows.size(); ++i) {
    const int64_t gi = rows.begin + i;
    const acc_t lse = c.lse_r[gi], tlse = c.tlse_r[gi], g0 = c.g0_r[gi], g2 = c.g2_r[gi];
    const acc_t* dr = d + i * w;
    const acc_t* yr = y + i * w;
    acc_t* gr = g + i * w;
#pragma omp simd
    for (int64_t j = 0; j < w; ++j) gr[j] = g0 * exp_vec(s * dr[j] - lse) + g2 * exp_vec(yr[j] - tlse);
    if (c.cols) {
      const acc_t* lc = c.lse_c + cols.begin;
      const acc_t* tlc = c.tlse_c + cols.begin;
      const acc_t* h0 = c.g0_c + cols.begin;
      const acc_t* h2 = c.g2_c + cols.begin;
#pragma omp simd
      for (int64_t j = 0; j < w; ++j) gr[j] += h0[j] * exp_vec(s * dr[j] - lc[j]) + h2[j] * exp_vec(yr[j] - tlc[j]);
    }
#pragma omp simd reduction(+ : ds)
    for (int64_t j = 0; j < w; ++j) ds += gr[j] * dr[j];
  }
  return ds;
}

// One block pair of a round: recompute each tile once, form dL, accumulate dA and dB; returns the ds part.
template <typename acc_t>
acc_t backward_task(const BackwardContext<acc_t>& c, Range rows, Range cols) {
  Scratch<acc_t> s;
  const auto opts = c.a.options();
  acc_t ds = 0;
  for (int64_t i0 = rows.begin; i0 < rows.end; i0 += kTileRows) {
    const Range tr{i0, std::min(rows.end, i0 + kTileRows)};
    for (int64_t j0 = cols.begin; j0 < cols.end; j0 += kTileCols) {
      const Range tc{j0, std::min(cols.end, j0 + kTileCols)};
      logits_tile(s.x.data(), c.a, c.b, tr, tc, acc_t(1));
      if (c.distill) {
        logits_tile(s.y.data(), c.ta, c.tb, tr, tc, c.t);
        ds += distill_grad_tile(c, s.x.data(), s.y.data(), s.g.data(), tr, tc);
      } else {
        ds += infonce_grad_tile(c, s.x.data(), s.g.data(), tr, tc);
      }
      const at::Tensor g = tile_view(s.g.data(), tr.size(), tc.size(), opts);
      c.grad_a.narrow(0, tr.begin, tr.size()).addmm_(g, c.b.narrow(0, tc.begin, tc.size()), 1, c.s);
      c.grad_b.narrow(0, tc.begin, tc.size()).addmm_(g.t(), c.a.narrow(0, tr.begin, tr.size()), 1, c.s);
    }
  }
  return ds;
}

template <typename acc_t>
Grads backward_impl(const Problem& p, const Stats& st, const at::Tensor& grad_rows, const at::Tensor& grad_cols) {
  const int64_t m = p.a.size(0), n = p.b.size(0);
  BackwardContext<acc_t> c;
  c.a = as_acc<acc_t>(p.a);
  c.b = as_acc<acc_t>(p.b);
  c.s = p.scale.item<acc_t>();
  c.distill = p.distill();
  c.cols = p.cols;
  c.t = 0;
  if (c.distill) {
    c.ta = as_acc<acc_t>(p.teacher_a);
    c.tb = as_acc<acc_t>(p.teacher_b);
    c.t = p.teacher_scale.item<acc_t>();
  }
  c.row_key = c.distill ? nullptr : p.row_key.data_ptr<int32_t>();
  c.col_key = c.distill ? nullptr : p.col_key.data_ptr<int32_t>();
  const at::Tensor rows = st.rows.contiguous(), gr = as_acc<acc_t>(grad_rows);
  c.lse_r = rows.data_ptr<acc_t>();
  c.tlse_r = c.lse_r + kTeacherLseRow * m;
  c.g0_r = gr.data_ptr<acc_t>();
  c.g1_r = c.g0_r + m;
  c.g2_r = c.g0_r + 2 * m;
  at::Tensor cols, gc;
  if (p.cols) {
    cols = st.cols.contiguous();
    gc = as_acc<acc_t>(grad_cols);
    c.lse_c = cols.data_ptr<acc_t>();
    c.tlse_c = c.lse_c + kTeacherLseRow * n;
    c.g0_c = gc.data_ptr<acc_t>();
    c.g1_c = c.g0_c + n;
    c.g2_c = c.g0_c + 2 * n;
  }
  c.grad_a = at::zeros_like(c.a);
  c.grad_b = at::zeros_like(c.b);
  const int64_t groups = std::min(group_count(m), group_count(n));
  std::vector<acc_t> ds_parts(groups, acc_t(0));
  for (int64_t round = 0; round < groups; ++round) {
    at::parallel_for(0, groups, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t cg = (t + round) % groups;
        ds_parts[t] += backward_task(c, split(m, groups, t), split(n, groups, cg));
      }
    });
  }
  acc_t ds = 0;
  for (acc_t v : ds_parts) ds += v;
  Grads out;
  out.a = c.grad_a.to(p.a.scalar_type());
  out.b = c.grad_b.to(p.b.scalar_type());
  out.scale = at::full({}, ds, p.scale.options());
  return out;
}

}  // namespace

Stats forward_cpu(const Problem& p) {
  check_problem(p, "contrastive stats (cpu)");
  if (p.a.scalar_type() == at::kDouble) return forward_impl<double>(p);
  return forward_impl<float>(p);
}

Grads backward_cpu(const Problem& p, const Stats& stats, const at::Tensor& grad_rows, const at::Tensor& grad_cols) {
  check_problem(p, "contrastive stats backward (cpu)");
  if (p.a.scalar_type() == at::kDouble) return backward_impl<double>(p, stats, grad_rows, grad_cols);
  return backward_impl<float>(p, stats, grad_rows, grad_cols);
}

}  // namespace famevil_fast::contrastive
