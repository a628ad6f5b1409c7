// Forward sweep of the CUDA contrastive statistics.
//
// Block (r, c) of a P_r x P_c grid walks the row blocks of row group r against the column blocks of column
// group c. The row state (max, sum of exponentials, ...) stays in shared memory across the column blocks
// and is written once per row block to the row partials of column group c; the column state of each tile
// is merged into the column partials of row group r, which only this block touches. The partials are
// (P, channels, L), linear in M + N; finalize() combines them into the statistics.
#include "contrastive/cuda_tiles.cuh"

#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <cmath>
#include <utility>

namespace famevil_fast::contrastive {
namespace gpu {
namespace {

template <typename T, typename acc_t>
struct ForwardParams {
  const T *a, *b, *ta, *tb;
  const acc_t *scale, *teacher_scale;
  const int32_t *row_key, *col_key;
  int m, n, d, dt;
  bool vec, teacher_vec, cols;
  int row_blocks, col_blocks, row_groups, col_groups;
  acc_t* row_part;  // (col_groups, CH, m)
  acc_t* col_part;  // (row_groups, CH, n)
};

template <bool DISTILL>
constexpr int channels() {
  return DISTILL ? static_cast<int>(kDistillChannels) : static_cast<int>(kInfoNceChannels);
}

// Shared memory beside the tile regions: row state, column scratch and keys.
template <typename Tile, bool DISTILL>
struct ForwardSmem {
  using acc_t = typename Tile::acc_t;
  static constexpr int CH = channels<DISTILL>();
  static constexpr int PARTS = kThreads / Tile::BN;  // threads per column in the column pass
  static constexpr size_t kTiles = (DISTILL ? 2 : 1) * Tile::kBytes;
  static constexpr size_t kRowState = size_t(Tile::BM) * CH * sizeof(acc_t);
  static constexpr size_t kColScratch = size_t(PARTS) * Tile::BN * CH * sizeof(acc_t);
  static constexpr size_t kKeys = size_t(Tile::BM + Tile::BN) * sizeof(int32_t);
  static constexpr size_t kBytes = kTiles + kRowState + kColScratch + kKeys;
  static_assert(Tile::kBytes % 128 == 0, "tile regions keep the alignment WMMA needs");
};

// Row statistics of one tile: a warp per row, lanes over the columns.
template <typename Tile, bool DISTILL, typename acc_t>
__device__ void rows_update(const acc_t* c, const acc_t* ct, acc_t* state, const int32_t* row_keys,
                            const int32_t* col_keys, int rows, int cols, acc_t s, acc_t t) {
  constexpr int CH = channels<DISTILL>();
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int r = warp; r < rows; r += kWarps) {
    const acc_t* cr = c + r * Tile::LDC;
    acc_t mx = neg_inf<acc_t>();
    for (int j = lane; j < cols; j += 32) mx = fmax(mx, s * cr[j]);
    mx = warp_max(mx);
    acc_t z = 0, pos = 0, plain = 0;
    const int32_t key = DISTILL ? 0 : row_keys[r];
    for (int j = lane; j < cols; j += 32) {
      const acc_t x = s * cr[j];
      z += dev_exp(x - mx);
      if (!DISTILL) {
        plain += x;
        if (col_keys[j] == key) pos += x;
      }
    }
    z = warp_sum(z);
    acc_t* st = state + r * CH;
    if (!DISTILL) {
      pos = warp_sum(pos);
      plain = warp_sum(plain);
      if (lane == 0) {
        merge_lse(st[0], st[1], mx, z);
        st[2] += pos;
        st[3] += plain;
      }
    } else {
      const acc_t* tr = ct + r * Tile::LDC;
      acc_t tmx = neg_inf<acc_t>();
      for (int j = lane; j < cols; j += 32) tmx = fmax(tmx, t * tr[j]);
      tmx = warp_max(tmx);
      acc_t tz = 0, tw = 0;
      for (int j = lane; j < cols; j += 32) {
        const acc_t e = dev_exp(t * tr[j] - tmx);
        tz += e;
        tw += e * (s * cr[j]);
      }
      tz = warp_sum(tz);
      tw = warp_sum(tw);
      if (lane == 0) {
        merge_lse(st[0], st[1], mx, z);
        merge_weighted(st[2], st[3], st[4], tmx, tz, tw);
      }
    }
  }
}

// Column statistics of one tile: PARTS threads per column over slices of the rows, combined through
// shared memory, then merged into this block's column partials (global, owned by this block).
template <typename Tile, bool DISTILL, typename acc_t>
__device__ void cols_update(const acc_t* c, const acc_t* ct, acc_t* scratch, const int32_t* row_keys,
                            const int32_t* col_keys, int rows, int cols, acc_t s, acc_t t, acc_t* col_part,
                            int64_t part_stride, int n0) {
  using Smem = ForwardSmem<Tile, DISTILL>;
  constexpr int CH = channels<DISTILL>(), PARTS = Smem::PARTS, BN = Tile::BN;
  const int j = threadIdx.x % BN, part = threadIdx.x / BN;
  const int r0 = part * Tile::BM / PARTS, r1 = min(rows, (part + 1) * Tile::BM / PARTS);
  if (j < cols) {
    acc_t mx = neg_inf<acc_t>();
    for (int r = r0; r < r1; ++r) mx = fmax(mx, s * c[r * Tile::LDC + j]);
    acc_t z = 0, v2 = 0, v3 = 0, v4 = 0;
    if (!DISTILL) {
      const int32_t key = col_keys[j];
      for (int r = r0; r < r1; ++r) {
        const acc_t x = s * c[r * Tile::LDC + j];
        z += dev_exp(x - mx);
        v3 += x;
        if (row_keys[r] == key) v2 += x;
      }
    } else {
      for (int r = r0; r < r1; ++r) z += dev_exp(s * c[r * Tile::LDC + j] - mx);
      v2 = neg_inf<acc_t>();
      for (int r = r0; r < r1; ++r) v2 = fmax(v2, t * ct[r * Tile::LDC + j]);
      for (int r = r0; r < r1; ++r) {
        const acc_t e = dev_exp(t * ct[r * Tile::LDC + j] - v2);
        v3 += e;
        v4 += e * (s * c[r * Tile::LDC + j]);
      }
    }
    acc_t* out = scratch + part * CH * BN;
    out[0 * BN + j] = mx;
    out[1 * BN + j] = z;
    out[2 * BN + j] = v2;
    out[3 * BN + j] = v3;
    if (DISTILL) out[4 * BN + j] = v4;
  }
  __syncthreads();
  if (part == 0 && j < cols) {
    acc_t* g = col_part + n0 + j;
    acc_t st[CH];
#pragma unroll
    for (int ch = 0; ch < CH; ++ch) st[ch] = g[ch * part_stride];
#pragma unroll
    for (int p = 0; p < PARTS; ++p) {
      const acc_t* in = scratch + p * CH * BN;
      merge_lse(st[0], st[1], in[0 * BN + j], in[1 * BN + j]);
      if (!DISTILL) {
        st[2] += in[2 * BN + j];
        st[3] += in[3 * BN + j];
      } else {
        merge_weighted(st[2], st[3], st[4], in[2 * BN + j], in[3 * BN + j], in[4 * BN + j]);
      }
    }
#pragma unroll
    for (int ch = 0; ch < CH; ++ch) g[ch * part_stride] = st[ch];
  }
}

__device__ __forceinline__ int split_point(int n, int parts, int k) {
  return static_cast<int>(static_cast<int64_t>(n) * k / parts);
}

template <typename T, bool DISTILL>
__global__ void __launch_bounds__(kThreads, min_blocks<T, DISTILL>()) forward_kernel(const ForwardParams<T, typename TileFor<T>::type::acc_t> p) {
  using Tile = typename TileFor<T>::type;
  using acc_t = typename Tile::acc_t;
  using Smem = ForwardSmem<Tile, DISTILL>;
  constexpr int CH = Smem::CH, BM = Tile::BM, BN = Tile::BN;
  extern __shared__ __align__(128) unsigned char smem[];
  unsigned char* teacher_region = smem;
  unsigned char* student_region = smem + (DISTILL ? Tile::kBytes : 0);
  acc_t* row_state = reinterpret_cast<acc_t*>(smem + Smem::kTiles);
  acc_t* col_scratch = reinterpret_cast<acc_t*>(smem + Smem::kTiles + Smem::kRowState);
  int32_t* row_keys = reinterpret_cast<int32_t*>(smem + Smem::kTiles + Smem::kRowState + Smem::kColScratch);
  int32_t* col_keys = row_keys + BM;
  const acc_t* c = reinterpret_cast<const acc_t*>(student_region);
  const acc_t* ct = reinterpret_cast<const acc_t*>(teacher_region);

  const int rg = blockIdx.x / p.col_groups, cg = blockIdx.x % p.col_groups;
  const int rb0 = split_point(p.row_blocks, p.row_groups, rg), rb1 = split_point(p.row_blocks, p.row_groups, rg + 1);
  const int cb0 = split_point(p.col_blocks, p.col_groups, cg), cb1 = split_point(p.col_blocks, p.col_groups, cg + 1);
  const acc_t s = *p.scale;
  const acc_t t = DISTILL ? *p.teacher_scale : acc_t(0);
  acc_t* col_part = p.col_part + static_cast<int64_t>(rg) * CH * p.n;
  acc_t* row_part = p.row_part + static_cast<int64_t>(cg) * CH * p.m;

  for (int rb = rb0; rb < rb1; ++rb) {
    const int m0 = rb * BM, rows = min(BM, p.m - m0);
    for (int i = threadIdx.x; i < BM; i += kThreads) {
      acc_t* st = row_state + i * CH;
      st[0] = neg_inf<acc_t>();
      st[1] = 0;
      st[2] = DISTILL ? neg_inf<acc_t>() : acc_t(0);
      st[3] = 0;
      if (DISTILL) st[CH - 1] = 0;
      if (!DISTILL) row_keys[i] = i < rows ? p.row_key[m0 + i] : 0;
    }
    for (int cb = cb0; cb < cb1; ++cb) {
      const int n0 = cb * BN, cols = min(BN, p.n - n0);
      if (!DISTILL)
        for (int j = threadIdx.x; j < BN; j += kThreads) col_keys[j] = j < cols ? p.col_key[n0 + j] : 0;
      if (DISTILL) Tile::run(p.ta, p.tb, p.m, p.n, p.dt, m0, n0, p.teacher_vec, teacher_region);
      Tile::run(p.a, p.b, p.m, p.n, p.d, m0, n0, p.vec, student_region);
      rows_update<Tile, DISTILL>(c, ct, row_state, row_keys, col_keys, rows, cols, s, t);
      if (p.cols) cols_update<Tile, DISTILL>(c, ct, col_scratch, row_keys, col_keys, rows, cols, s, t, col_part, p.n, n0);
      __syncthreads();
    }
    for (int i = threadIdx.x; i < rows; i += kThreads)
#pragma unroll
      for (int ch = 0; ch < CH; ++ch) row_part[static_cast<int64_t>(ch) * p.m + m0 + i] = row_state[i * CH + ch];
    __syncthreads();
  }
}

// Column partials start empty: max channels at -inf, sums at 0.
at::Tensor empty_partial(int64_t groups, int64_t ch, int64_t n, bool distill, const at::TensorOptions& opts) {
  at::Tensor part = at::zeros({groups, ch, n}, opts);
  if (groups > 0) {
    part.select(1, 0).fill_(-std::numeric_limits<double>::infinity());
    if (distill) part.select(1, 2).fill_(-std::numeric_limits<double>::infinity());
  }
  return part;
}

// Grid of P_r x P_c blocks: about four blocks per multiprocessor, split in proportion to the block counts.
std::pair<int, int> forward_groups(int64_t row_blocks, int64_t col_blocks) {
  const int64_t target = 4 * int64_t(at::cuda::getCurrentDeviceProperties()->multiProcessorCount);
  if (row_blocks * col_blocks <= target) return {static_cast<int>(row_blocks), static_cast<int>(col_blocks)};
  const double ratio = static_cast<double>(col_blocks) / static_cast<double>(row_blocks);
  int64_t pc = std::llround(std::sqrt(static_cast<double>(target) * ratio));
  pc = std::clamp<int64_t>(pc, 1, col_blocks);
  const int64_t pr = std::clamp<int64_t>(target / pc, 1, row_blocks);
  return {static_cast<int>(pr), static_cast<int>(pc)};
}

template <typename T, bool DISTILL>
Stats launch_forward(const Problem& p) {
  using Tile = typename TileFor<T>::type;
  using acc_t = typename Tile::acc_t;
  using Smem = ForwardSmem<Tile, DISTILL>;
  const int64_t m = p.a.size(0), n = p.b.size(0), ch = Smem::CH;
  const int64_t row_blocks = ceil_div(m, Tile::BM), col_blocks = ceil_div(n, Tile::BN);
  const auto [pr, pc] = forward_groups(row_blocks, col_blocks);
  const auto opts = p.a.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  at::Tensor row_part = at::empty({pc, ch, m}, opts);
  at::Tensor col_part = empty_partial(p.cols ? pr : 0, ch, n, DISTILL, opts);

  ForwardParams<T, acc_t> fp{};
  fp.a = ptr<T>(p.a);
  fp.b = ptr<T>(p.b);
  fp.scale = p.scale.data_ptr<acc_t>();
  if (DISTILL) {
    fp.ta = ptr<T>(p.teacher_a);
    fp.tb = ptr<T>(p.teacher_b);
    fp.teacher_scale = p.teacher_scale.data_ptr<acc_t>();
    fp.dt = static_cast<int>(p.teacher_a.size(1));
    fp.teacher_vec = vectorizable<T>(p.teacher_a) && vectorizable<T>(p.teacher_b);
  } else {
    fp.row_key = p.row_key.data_ptr<int32_t>();
    fp.col_key = p.col_key.data_ptr<int32_t>();
  }
  fp.m = static_cast<int>(m);
  fp.n = static_cast<int>(n);
  fp.d = static_cast<int>(p.a.size(1));
  fp.vec = vectorizable<T>(p.a) && vectorizable<T>(p.b);
  fp.cols = p.cols;
  fp.row_blocks = static_cast<int>(row_blocks);
  fp.col_blocks = static_cast<int>(col_blocks);
  fp.row_groups = pr;
  fp.col_groups = pc;
  fp.row_part = row_part.data_ptr<acc_t>();
  fp.col_part = p.cols ? col_part.data_ptr<acc_t>() : nullptr;

  auto kernel = forward_kernel<T, DISTILL>;
  allow_smem(kernel, Smem::kBytes);
  kernel<<<pr * pc, kThreads, Smem::kBytes, at::cuda::getCurrentCUDAStream()>>>(fp);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  Stats out;
  out.rows = finalize(row_part, DISTILL);
  out.cols = p.cols ? finalize(col_part, DISTILL) : at::empty({kStatRows, 0}, opts);
  return out;
}

template <bool DISTILL>
Stats forward_dispatch(const Problem& p) {
  switch (p.a.scalar_type()) {
    case at::kHalf:
      return launch_forward<__half, DISTILL>(p);
    case at::kBFloat16:
      return launch_forward<__nv_bfloat16, DISTILL>(p);
    case at::kFloat:
      return launch_forward<float, DISTILL>(p);
    case at::kDouble:
      return launch_forward<double, DISTILL>(p);
    default:
      break;
  }
  TORCH_CHECK_VALUE(false, "contrastive stats (cuda): unsupported dtype ", p.a.scalar_type());
  return Stats{};
}

}  // namespace
}  // namespace gpu

Stats forward_cuda(const Problem& p) {
  check_problem(p, "contrastive stats (cuda)");
  gpu::check_sizes(p);
  const c10::cuda::CUDAGuard guard(p.a.device());
  return p.distill() ? gpu::forward_dispatch<true>(p) : gpu::forward_dispatch<false>(p);
}

}  // namespace famevil_fast::contrastive
