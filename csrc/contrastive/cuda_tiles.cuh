// Shared pieces of the CUDA contrastive kernels: device helpers (exp, warp reductions, log-sum-exp
// merging) and the tile main loops that leave a BM x BN tile of dot products in shared memory: tensor
// cores through WMMA for float16 / bfloat16 (fp32 accumulation), FMA for float32 / float64.
#pragma once

#include "contrastive/contrastive.h"

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <cstdint>
#include <cstring>
#include <limits>

namespace famevil_fast::contrastive::gpu {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

template <typename acc_t>
__device__ __forceinline__ acc_t dev_exp(acc_t x);
template <>
__device__ __forceinline__ float dev_exp<float>(float x) {
  return __expf(x);
}
template <>
__device__ __forceinline__ double dev_exp<double>(double x) {
  return exp(x);
}

template <typename acc_t>
__device__ __forceinline__ acc_t neg_inf() {
  return -std::numeric_limits<acc_t>::infinity();
}

// fmax ignores NaN; a NaN still reaches the sum of exponentials.
template <typename acc_t>
__device__ __forceinline__ acc_t warp_max(acc_t v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmax(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Merges a block's (max, sum of exp(x - max)) into a running pair; an empty block (-inf, 0) is skipped.
template <typename acc_t>
__device__ __forceinline__ void merge_lse(acc_t& m, acc_t& z, acc_t bm, acc_t bz) {
  if (bm == neg_inf<acc_t>() && bz == acc_t(0)) return;
  const acc_t nm = fmax(m, bm);
  z = z * dev_exp(m - nm) + bz * dev_exp(bm - nm);
  m = nm;
}

template <typename acc_t>
__device__ __forceinline__ void merge_weighted(acc_t& m, acc_t& z, acc_t& w, acc_t bm, acc_t bz, acc_t bw) {
  if (bm == neg_inf<acc_t>() && bz == acc_t(0)) return;
  const acc_t nm = fmax(m, bm);
  const acc_t f_old = dev_exp(m - nm), f_new = dev_exp(bm - nm);
  z = z * f_old + bz * f_new;
  w = w * f_old + bw * f_new;
  m = nm;
}

template <typename T, typename acc_t>
__device__ __forceinline__ T from_acc(acc_t v);
template <>
__device__ __forceinline__ __half from_acc<__half, float>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16, float>(float v) {
  return __float2bfloat16_rn(v);
}
template <>
__device__ __forceinline__ float from_acc<float, float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ double from_acc<double, double>(double v) {
  return v;
}

__host__ __device__ constexpr inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ---------------------------------------------------------------------------------------------------
// Tile main loops: dot products of rows [m0, m0 + BM) of A with rows [n0, n0 + BN) of B (zero outside)
// into shared memory C[r * LDC + c] (accumulation dtype). Every thread of the block must call run().

// float16 / bfloat16 on tensor cores. 8 warps as 2 x 4, each computing 64 x 32 with 4 x 2 WMMA tiles.
template <typename T>
struct WmmaTile {
  using acc_t = float;
  static constexpr int BM = 128, BN = 128, BK = 32;
  static constexpr int LDS = BK + 8;  // staging row stride in elements: rows 80 bytes apart, no bank conflicts
  static constexpr int LDC = BN + 4;
  static constexpr int WARP_M = 64, WARP_N = 32;
  static constexpr int FRAG_M = WARP_M / 16, FRAG_N = WARP_N / 16;
  static constexpr int VEC = 8;  // elements per 16-byte chunk
  static constexpr int CHUNKS = BM * BK / VEC / kThreads;  // per thread, per operand (BM == BN)
  static constexpr size_t kStageElems = size_t(BM + BN) * LDS;
  static constexpr size_t kStagingBytes = 2 * kStageElems * sizeof(T);
  static constexpr size_t kResultBytes = size_t(BM) * LDC * sizeof(float);
  static constexpr size_t kBytes = kStagingBytes > kResultBytes ? kStagingBytes : kResultBytes;
  static_assert(BM == BN && CHUNKS * VEC * kThreads == BM * BK, "tile shape");

  __device__ static uint4 load_chunk(const T* src, int rows, int row, int d, int k, bool vec) {
    uint4 out = make_uint4(0u, 0u, 0u, 0u);
    if (row >= rows || k >= d) return out;
    const T* p = src + static_cast<size_t>(row) * d + k;
    if (vec) return *reinterpret_cast<const uint4*>(p);
    const unsigned short* raw = reinterpret_cast<const unsigned short*>(p);
    unsigned short tmp[VEC];
#pragma unroll
    for (int e = 0; e < VEC; ++e) tmp[e] = (k + e < d) ? raw[e] : static_cast<unsigned short>(0);
    memcpy(&out, tmp, sizeof(out));
    return out;
  }

  __device__ static void load(uint4 (&ra)[CHUNKS], uint4 (&rb)[CHUNKS], const T* a, const T* b, int m, int n, int d,
                              int m0, int n0, int k0, bool vec) {
#pragma unroll
    for (int c = 0; c < CHUNKS; ++c) {
      const int q = threadIdx.x + c * kThreads;
      const int row = q / (BK / VEC), kc = (q % (BK / VEC)) * VEC;
      ra[c] = load_chunk(a, m, m0 + row, d, k0 + kc, vec);
      rb[c] = load_chunk(b, n, n0 + row, d, k0 + kc, vec);
    }
  }

  __device__ static void store(const uint4 (&ra)[CHUNKS], const uint4 (&rb)[CHUNKS], T* stage) {
#pragma unroll
    for (int c = 0; c < CHUNKS; ++c) {
      const int q = threadIdx.x + c * kThreads;
      const int row = q / (BK / VEC), kc = (q % (BK / VEC)) * VEC;
      *reinterpret_cast<uint4*>(stage + row * LDS + kc) = ra[c];
      *reinterpret_cast<uint4*>(stage + (BM + row) * LDS + kc) = rb[c];
    }
  }

  __device__ static void run(const T* a, const T* b, int m, int n, int d, int m0, int n0, bool vec,
                             unsigned char* region) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
    using namespace nvcuda;
    T* staging = reinterpret_cast<T*>(region);
    const int warp = threadIdx.x / 32;
    const int wm = warp / (BN / WARP_N), wn = warp % (BN / WARP_N);
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[FRAG_M][FRAG_N];
#pragma unroll
    for (int i = 0; i < FRAG_M; ++i)
#pragma unroll
      for (int j = 0; j < FRAG_N; ++j) wmma::fill_fragment(acc[i][j], 0.0f);

    const int ktiles = static_cast<int>(ceil_div(d, BK));
    uint4 ra[CHUNKS], rb[CHUNKS];
    load(ra, rb, a, b, m, n, d, m0, n0, 0, vec);
    store(ra, rb, staging);
    __syncthreads();
    for (int kt = 0; kt < ktiles; ++kt) {
      const bool more = kt + 1 < ktiles;
      if (more) load(ra, rb, a, b, m, n, d, m0, n0, (kt + 1) * BK, vec);
      const T* as = staging + (kt & 1) * kStageElems;
      const T* bs = as + BM * LDS;
#pragma unroll
      for (int kk = 0; kk < BK; kk += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa[FRAG_M];
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb[FRAG_N];
#pragma unroll
        for (int i = 0; i < FRAG_M; ++i) wmma::load_matrix_sync(fa[i], as + (wm * WARP_M + i * 16) * LDS + kk, LDS);
#pragma unroll
        for (int j = 0; j < FRAG_N; ++j) wmma::load_matrix_sync(fb[j], bs + (wn * WARP_N + j * 16) * LDS + kk, LDS);
#pragma unroll
        for (int i = 0; i < FRAG_M; ++i)
#pragma unroll
          for (int j = 0; j < FRAG_N; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
      }
      if (more) store(ra, rb, staging + ((kt + 1) & 1) * kStageElems);
      __syncthreads();
    }
    float* c = reinterpret_cast<float*>(region);
#pragma unroll
    for (int i = 0; i < FRAG_M; ++i)
#pragma unroll
      for (int j = 0; j < FRAG_N; ++j)
        wmma::store_matrix_sync(c + (wm * WARP_M + i * 16) * LDC + wn * WARP_N + j * 16, acc[i][j], LDC,
                                wmma::mem_row_major);
    __syncthreads();
#else
    __trap();
#endif
  }
};

// float32 / float64 with FMA: 16 x 16 threads, each computing (BM / 16) x (BN / 16) outputs.
template <typename T>
struct SimtTile {
  using acc_t = T;
  static constexpr int BM = sizeof(T) == 4 ? 128 : 64, BN = BM, BK = 16;
  static constexpr int TM = BM / 16, TN = BN / 16;
  static constexpr int LDS = BM + 1;
  static constexpr int LDC = BN + 4;
  static constexpr size_t kStagingBytes = size_t(BK) * 2 * LDS * sizeof(T);
  static constexpr size_t kResultBytes = size_t(BM) * LDC * sizeof(T);
  static constexpr size_t kBytes = kStagingBytes > kResultBytes ? kStagingBytes : kResultBytes;

  __device__ static void run(const T* a, const T* b, int m, int n, int d, int m0, int n0, bool /*vec*/,
                             unsigned char* region) {
    T* as = reinterpret_cast<T*>(region);  // [BK][LDS], k-major
    T* bs = as + BK * LDS;
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
    T acc[TM][TN];
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
      for (int j = 0; j < TN; ++j) acc[i][j] = T(0);
    for (int k0 = 0; k0 < d; k0 += BK) {
      __syncthreads();
      for (int e = threadIdx.x; e < BM * BK; e += kThreads) {
        const int r = e / BK, k = e % BK;
        const bool kin = k0 + k < d;
        as[k * LDS + r] = (kin && m0 + r < m) ? a[static_cast<size_t>(m0 + r) * d + k0 + k] : T(0);
        bs[k * LDS + r] = (kin && n0 + r < n) ? b[static_cast<size_t>(n0 + r) * d + k0 + k] : T(0);
      }
      __syncthreads();
#pragma unroll
      for (int k = 0; k < BK; ++k) {
        T av[TM], bv[TN];
#pragma unroll
        for (int i = 0; i < TM; ++i) av[i] = as[k * LDS + ty + 16 * i];
#pragma unroll
        for (int j = 0; j < TN; ++j) bv[j] = bs[k * LDS + tx + 16 * j];
#pragma unroll
        for (int i = 0; i < TM; ++i)
#pragma unroll
          for (int j = 0; j < TN; ++j) acc[i][j] = fma(av[i], bv[j], acc[i][j]);
      }
    }
    __syncthreads();
    T* c = reinterpret_cast<T*>(region);
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
      for (int j = 0; j < TN; ++j) c[(ty + 16 * i) * LDC + tx + 16 * j] = acc[i][j];
    __syncthreads();
  }
};

template <typename T>
struct TileFor {
  using type = SimtTile<T>;
};
template <>
struct TileFor<__half> {
  using type = WmmaTile<__half>;
};
template <>
struct TileFor<__nv_bfloat16> {
  using type = WmmaTile<__nv_bfloat16>;
};

// Two blocks per multiprocessor where the shared memory allows it (one tile region); the distillation
// kernels hold two tile regions and run one block per multiprocessor.
template <typename T, bool DISTILL>
constexpr int min_blocks() {
  return DISTILL || sizeof(T) == 8 ? 1 : 2;
}

// ---------------------------------------------------------------------------------------------------
// Host helpers

template <typename T>
const T* ptr(const at::Tensor& t) {
  return reinterpret_cast<const T*>(t.data_ptr());
}

template <typename T>
bool vectorizable(const at::Tensor& t) {
  constexpr int vec = 16 / sizeof(T);
  return t.size(1) % vec == 0 && reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
}

inline void check_sizes(const Problem& p) {
  constexpr int64_t limit = std::numeric_limits<int>::max() / 2;
  TORCH_CHECK_VALUE(p.a.size(0) < limit && p.b.size(0) < limit && p.a.size(1) < limit,
                    "contrastive stats (cuda): sizes beyond 2^30 rows or features are not supported");
}

template <typename Kernel>
void allow_smem(Kernel kernel, size_t bytes) {
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
}

}  // namespace famevil_fast::contrastive::gpu
