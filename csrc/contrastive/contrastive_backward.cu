// Backward sweep of the CUDA contrastive statistics.
//
// The rows are processed in panels. For a panel, one kernel recomputes each tile once, forms dLoss/dlogits
// (divided by a bound on its magnitude so that it fits float16, stored in the input dtype) and the tile's
// part of dLoss/ds; cuBLAS then gives dA = s G B and dB += s G^T A. Extra memory: the panel (about
// 256 MiB, at least 1024 rows) plus O((M + N) D).
#include "contrastive/cuda_tiles.cuh"

#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <cstdlib>

namespace famevil_fast::contrastive {
namespace gpu {
namespace {

constexpr int64_t kPanelBudgetBytes = int64_t(256) << 20;
constexpr int64_t kMinPanelRows = 1024;

template <typename T, typename acc_t>
struct GradParams {
  const T *a, *b, *ta, *tb;
  const acc_t *scale, *teacher_scale, *inv_gmax;
  const int32_t *row_key, *col_key;
  const acc_t *rows, *grad_rows;  // (3, m)
  const acc_t *cols, *grad_cols;  // (3, n)
  int m, n, d, dt;
  bool vec, teacher_vec, with_cols;
  int panel_begin, panel_end;
  T* panel;         // (panel rows, n)
  acc_t* ds_parts;  // one per block
};

template <typename Tile>
struct GradSmem {
  using acc_t = typename Tile::acc_t;
  static constexpr int VALUES = 5;  // lse, g0, g1, g2, teacher lse
  static constexpr size_t kRowVals = size_t(Tile::BM) * VALUES * sizeof(acc_t);
  static constexpr size_t kColVals = size_t(Tile::BN) * VALUES * sizeof(acc_t);
  static constexpr size_t kKeys = size_t(Tile::BM + Tile::BN) * sizeof(int32_t);
  static constexpr size_t kReduce = kWarps * sizeof(acc_t);
  static size_t bytes(bool distill) { return (distill ? 2 : 1) * Tile::kBytes + kRowVals + kColVals + kKeys + kReduce; }
};

template <typename T, bool DISTILL>
__global__ void __launch_bounds__(kThreads, min_blocks<T, DISTILL>()) grad_kernel(const GradParams<T, typename TileFor<T>::type::acc_t> p) {
  using Tile = typename TileFor<T>::type;
  using acc_t = typename Tile::acc_t;
  using Smem = GradSmem<Tile>;
  constexpr int BM = Tile::BM, BN = Tile::BN, V = Smem::VALUES;
  extern __shared__ __align__(128) unsigned char smem[];
  unsigned char* teacher_region = smem;
  unsigned char* student_region = smem + (DISTILL ? Tile::kBytes : 0);
  const size_t tiles = (DISTILL ? 2 : 1) * Tile::kBytes;
  acc_t* row_vals = reinterpret_cast<acc_t*>(smem + tiles);
  acc_t* col_vals = reinterpret_cast<acc_t*>(smem + tiles + Smem::kRowVals);
  int32_t* row_keys = reinterpret_cast<int32_t*>(smem + tiles + Smem::kRowVals + Smem::kColVals);
  int32_t* col_keys = row_keys + BM;
  acc_t* reduce = reinterpret_cast<acc_t*>(smem + tiles + Smem::kRowVals + Smem::kColVals + Smem::kKeys);

  const int n0 = blockIdx.x * BN;
  const int m0 = p.panel_begin + blockIdx.y * BM;
  const int rows = min(BM, p.panel_end - m0), cols = min(BN, p.n - n0);
  const int m = p.m, n = p.n;
  for (int i = threadIdx.x; i < BM; i += kThreads) {
    acc_t* v = row_vals + i * V;
    const int gi = m0 + i;
    const bool in = i < rows;
    v[0] = in ? p.rows[gi] : acc_t(0);
    v[1] = in ? p.grad_rows[gi] : acc_t(0);
    v[2] = in ? p.grad_rows[m + gi] : acc_t(0);
    v[3] = in ? p.grad_rows[2 * m + gi] : acc_t(0);
    v[4] = (in && DISTILL) ? p.rows[kTeacherLseRow * m + gi] : acc_t(0);
    row_keys[i] = (in && !DISTILL) ? p.row_key[gi] : 0;
  }
  for (int j = threadIdx.x; j < BN; j += kThreads) {
    acc_t* v = col_vals + j * V;
    const int gj = n0 + j;
    const bool in = j < cols && p.with_cols;
    v[0] = in ? p.cols[gj] : acc_t(0);
    v[1] = in ? p.grad_cols[gj] : acc_t(0);
    v[2] = in ? p.grad_cols[n + gj] : acc_t(0);
    v[3] = in ? p.grad_cols[2 * n + gj] : acc_t(0);
    v[4] = (in && DISTILL) ? p.cols[kTeacherLseRow * n + gj] : acc_t(0);
    col_keys[j] = (j < cols && !DISTILL) ? p.col_key[gj] : 0;
  }
  if (DISTILL) Tile::run(p.ta, p.tb, p.m, p.n, p.dt, m0, n0, p.teacher_vec, teacher_region);
  Tile::run(p.a, p.b, p.panel_end, p.n, p.d, m0, n0, p.vec, student_region);

  const acc_t* c = reinterpret_cast<const acc_t*>(student_region);
  const acc_t* ct = reinterpret_cast<const acc_t*>(teacher_region);
  const acc_t s = *p.scale, t = DISTILL ? *p.teacher_scale : acc_t(0), inv = *p.inv_gmax;
  acc_t ds = 0;
  for (int e = threadIdx.x; e < BM * BN; e += kThreads) {
    const int r = e / BN, j = e % BN;
    if (r >= rows || j >= cols) continue;
    const acc_t d = c[r * Tile::LDC + j], x = s * d;
    const acc_t* rv = row_vals + r * V;
    const acc_t* cv = col_vals + j * V;
    acc_t g;
    if (!DISTILL) {
      const bool pos = row_keys[r] == col_keys[j];
      g = rv[1] * dev_exp(x - rv[0]) + (pos ? rv[2] : acc_t(0)) + rv[3];
      if (p.with_cols) g += cv[1] * dev_exp(x - cv[0]) + (pos ? cv[2] : acc_t(0)) + cv[3];
    } else {
      const acc_t y = t * ct[r * Tile::LDC + j];
      g = rv[1] * dev_exp(x - rv[0]) + rv[3] * dev_exp(y - rv[4]);
      if (p.with_cols) g += cv[1] * dev_exp(x - cv[0]) + cv[3] * dev_exp(y - cv[4]);
    }
    ds += g * d;
    p.panel[static_cast<int64_t>(m0 - p.panel_begin + r) * n + n0 + j] = from_acc<T, acc_t>(g * inv);
  }
  ds = warp_sum(ds);
  if (threadIdx.x % 32 == 0) reduce[threadIdx.x / 32] = ds;
  __syncthreads();
  if (threadIdx.x == 0) {
    acc_t total = 0;
    for (int w = 0; w < kWarps; ++w) total += reduce[w];
    p.ds_parts[static_cast<int64_t>(blockIdx.y) * gridDim.x + blockIdx.x] = total;
  }
}

// Rows per panel: about kPanelBudgetBytes of dL/dlogits, at least kMinPanelRows rows (so that the dB
// products stay efficient), a multiple of the tile height. FAMEVIL_FAST_CONTRASTIVE_PANEL_ROWS overrides
// the count (tests use it to exercise several panels on small problems).
int64_t panel_rows(int64_t m, int64_t n, int64_t elem_bytes, int64_t bm) {
  int64_t rows = std::max(kPanelBudgetBytes / std::max<int64_t>(1, n * elem_bytes), kMinPanelRows);
  if (const char* forced = std::getenv("FAMEVIL_FAST_CONTRASTIVE_PANEL_ROWS")) {
    rows = std::max<int64_t>(bm, std::atoll(forced));
  }
  rows = std::min(rows, int64_t(65535) * bm);
  rows = ceil_div(rows, bm) * bm;
  return std::min(rows, m);
}

// Bound on |dL/dlogits|: the sum of the largest |gradient| of every statistic the kernel uses (the
// probabilities and indicators it multiplies are in [0, 1]).
at::Tensor gradient_bound(const at::Tensor& grad_rows, const at::Tensor& grad_cols, bool distill, bool cols) {
  auto largest = [distill](const at::Tensor& g) {
    at::Tensor b = g.select(0, 0).abs().amax() + g.select(0, 2).abs().amax();
    return distill ? b : b + g.select(0, 1).abs().amax();
  };
  at::Tensor bound = largest(grad_rows);
  if (cols && grad_cols.size(1) > 0) bound = bound + largest(grad_cols);
  return bound.clamp_min(1e-30);
}

template <typename T, bool DISTILL>
Grads launch_backward(const Problem& p, const Stats& st, const at::Tensor& grad_rows_in, const at::Tensor& grad_cols_in) {
  using Tile = typename TileFor<T>::type;
  using acc_t = typename Tile::acc_t;
  const int64_t m = p.a.size(0), n = p.b.size(0), d = p.a.size(1);
  const auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
  const at::Tensor rows = st.rows.to(acc_type).contiguous();
  const at::Tensor grad_rows = grad_rows_in.to(acc_type).contiguous();
  at::Tensor cols, grad_cols;
  if (p.cols) {
    cols = st.cols.to(acc_type).contiguous();
    grad_cols = grad_cols_in.to(acc_type).contiguous();
  }
  const at::Tensor gmax = gradient_bound(grad_rows, grad_cols, DISTILL, p.cols);
  const at::Tensor inv_gmax = gmax.reciprocal();
  const at::Tensor factor = p.scale * gmax;  // dA = factor * (G / gmax) B

  const int64_t panel = panel_rows(m, n, sizeof(T), Tile::BM);
  const int64_t col_blocks = ceil_div(n, Tile::BN), panel_blocks = ceil_div(panel, Tile::BM);
  const auto acc_opts = p.a.options().dtype(acc_type);
  at::Tensor g = at::empty({panel, n}, p.a.options());
  at::Tensor ds_parts = at::empty({panel_blocks * col_blocks}, acc_opts);
  at::Tensor ds = at::zeros({}, acc_opts);
  at::Tensor grad_a = at::empty({m, d}, p.a.options());
  const bool one_panel = panel >= m;
  at::Tensor grad_b_acc = one_panel ? at::Tensor() : at::zeros({n, d}, acc_opts);
  at::Tensor grad_b;

  GradParams<T, acc_t> gp{};
  gp.a = ptr<T>(p.a);
  gp.b = ptr<T>(p.b);
  gp.scale = p.scale.data_ptr<acc_t>();
  gp.inv_gmax = inv_gmax.data_ptr<acc_t>();
  if (DISTILL) {
    gp.ta = ptr<T>(p.teacher_a);
    gp.tb = ptr<T>(p.teacher_b);
    gp.teacher_scale = p.teacher_scale.data_ptr<acc_t>();
    gp.dt = static_cast<int>(p.teacher_a.size(1));
    gp.teacher_vec = vectorizable<T>(p.teacher_a) && vectorizable<T>(p.teacher_b);
  } else {
    gp.row_key = p.row_key.data_ptr<int32_t>();
    gp.col_key = p.col_key.data_ptr<int32_t>();
  }
  gp.rows = rows.data_ptr<acc_t>();
  gp.grad_rows = grad_rows.data_ptr<acc_t>();
  gp.cols = p.cols ? cols.data_ptr<acc_t>() : nullptr;
  gp.grad_cols = p.cols ? grad_cols.data_ptr<acc_t>() : nullptr;
  gp.m = static_cast<int>(m);
  gp.n = static_cast<int>(n);
  gp.d = static_cast<int>(d);
  gp.vec = vectorizable<T>(p.a) && vectorizable<T>(p.b);
  gp.with_cols = p.cols;
  gp.panel = reinterpret_cast<T*>(g.data_ptr());
  gp.ds_parts = ds_parts.data_ptr<acc_t>();

  auto kernel = grad_kernel<T, DISTILL>;
  const size_t smem = GradSmem<Tile>::bytes(DISTILL);
  allow_smem(kernel, smem);
  const auto stream = at::cuda::getCurrentCUDAStream();
  for (int64_t begin = 0; begin < m; begin += panel) {
    const int64_t h = std::min(panel, m - begin);
    gp.panel_begin = static_cast<int>(begin);
    gp.panel_end = static_cast<int>(begin + h);
    const dim3 grid(static_cast<unsigned>(col_blocks), static_cast<unsigned>(ceil_div(h, Tile::BM)));
    kernel<<<grid, kThreads, smem, stream>>>(gp);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    ds.add_(ds_parts.narrow(0, 0, int64_t(grid.x) * grid.y).sum());
    const at::Tensor gh = g.narrow(0, 0, h);
    const at::Tensor a_rows = p.a.narrow(0, begin, h);
    grad_a.narrow(0, begin, h).copy_(at::mm(gh, p.b).to(acc_type).mul_(factor));
    const at::Tensor part_b = at::mm(gh.t(), a_rows);
    if (one_panel) {
      grad_b = part_b.to(acc_type).mul_(factor).to(p.b.scalar_type());
    } else {
      grad_b_acc.add_(part_b);  // accumulates in the accumulation dtype, no converted copy
    }
  }
  if (!one_panel) grad_b = grad_b_acc.mul_(factor).to(p.b.scalar_type());
  return Grads{grad_a, grad_b, ds.reshape(p.scale.sizes())};
}

template <bool DISTILL>
Grads backward_dispatch(const Problem& p, const Stats& st, const at::Tensor& gr, const at::Tensor& gc) {
  switch (p.a.scalar_type()) {
    case at::kHalf:
      return launch_backward<__half, DISTILL>(p, st, gr, gc);
    case at::kBFloat16:
      return launch_backward<__nv_bfloat16, DISTILL>(p, st, gr, gc);
    case at::kFloat:
      return launch_backward<float, DISTILL>(p, st, gr, gc);
    case at::kDouble:
      return launch_backward<double, DISTILL>(p, st, gr, gc);
    default:
      break;
  }
  TORCH_CHECK_VALUE(false, "contrastive stats backward (cuda): unsupported dtype ", p.a.scalar_type());
  return Grads{};
}

}  // namespace
}  // namespace gpu

Grads backward_cuda(const Problem& p, const Stats& stats, const at::Tensor& grad_rows, const at::Tensor& grad_cols) {
  check_problem(p, "contrastive stats backward (cuda)");
  gpu::check_sizes(p);
  const c10::cuda::CUDAGuard guard(p.a.device());
  return p.distill() ? gpu::backward_dispatch<true>(p, stats, grad_rows, grad_cols)
                     : gpu::backward_dispatch<false>(p, stats, grad_rows, grad_cols);
}

}  // namespace famevil_fast::contrastive
