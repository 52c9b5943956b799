// Paged prefill attention: one prefill chunk's query tokens against the KV of its sequence,
// read from the paged pool (the chunk's own K/V included: the cache is written before
// attention), causal, with an optional sliding window. fp32 on any AVX2 or AVX-512 build;
// bf16 on CPUs with AVX512-BF16.
//
// Why: torch's CPU flash attention takes an explicit mask for a chunk that does not start
// at 0, so a later chunk of a long prompt computes every masked score too, after a gather
// copy of the earlier chunks' KV; and it runs bf16 at about the rate of fp32 (110-160
// GFLOP/s on the AVX-512 host, where a bf16 GEMM reaches 800). Here blocks above the
// diagonal are skipped, KV is read in place, and bf16 products run on VDPBF16PS (32 bf16
// multiply-adds per instruction, fp32 sums).
//
// Two phases per call:
// 1. K and V of every block the chunk reads are repacked once per KV head, into the layouts
//    the products take (`Path::pack`): fp32 K transposed to [dim][block], V as is; bf16 K as
//    [dim/2][block][2] (a query pair times 16 tokens), V as [block/2][dim][2] (a pair of
//    weights times 16 columns). Slots past the sequence's end are zeroed.
// 2. Work items are (tile of kTile query tokens, KV head); an item holds the tile's rows of
//    the query heads that share the KV head (row = token * group + head) and walks the
//    blocks once with an online softmax, as the decode kernel does. Items are spread over
//    torch's threads longest first.
// Numerics: scores and the softmax in fp32. In bf16 the weights are rounded to bf16 for the
// PV product, as torch's bf16 flash kernel does, and each row's sum uses the rounded values.
#include "common.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#if defined(CPU_CAPABILITY_AVX512) && defined(__AVX512BF16__)
#include <immintrin.h>
#define HAVE_BF16_PREFILL 1
#endif

namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kL = Vec::size();  // floats per vector
constexpr int64_t kTile = 32;        // query tokens per work item
constexpr int64_t kRowPad = 8;       // an item's rows, padded to a multiple of this
#if defined(CPU_CAPABILITY_AVX512)
constexpr int kAcc = 16;  // accumulators of a micro-kernel, of 32 vector registers
#else
constexpr int kAcc = 8;  // of 16
#endif

template <typename T>
struct Chunk {
  const T* k;  // k_cache base [blocks, bs, kv_heads, dim], block stride kb
  const T* v;
  int64_t kb, vb, bs, kv_heads, dim, heads, group;
  const int64_t* table;  // block ids covering positions [0, start + len)
  int64_t start, len, window;
};

// Keys [a, b) of a block count for a row (a < b); its scores there are scaled, the online
// softmax state (m, l) and the row's output o updated; exp(score - m) is left in s[a, b).
// The weights go to w through `store` (which returns their sum as the PV product sees them).
inline void softmax_range(float* s, int64_t a, int64_t b, float sc, float& m, float& l,
                           float* o, int64_t dim, float (*store)(const float*, int64_t, int64_t,
                                                                 int64_t, void*), void* w,
                           int64_t bs) {
  at::vec::map([sc](Vec x) { return x * Vec(sc); }, s + a, s + a, b - a);
  const float bmax = at::vec::reduce_all<float>(
      [](Vec& x, Vec& y) { return at::vec::maximum(x, y); }, s + a, b - a);
  const float mnew = std::max(m, bmax);
  const float alpha = std::exp(m - mnew);  // 0 on the row's first block (m = -inf)
  at::vec::map([mnew](Vec x) { return (x - Vec(mnew)).exp_u20(); }, s + a, s + a, b - a);
  const float bsum = store(s, a, b, bs, w);
  l = l * alpha + bsum;
  m = mnew;
  if (alpha != 1.f) at::vec::map([alpha](Vec x) { return x * Vec(alpha); }, o, o, dim);
}

// ---------------------------------------------------------------- fp32 (any build)
struct F32Path {
  using T = float;
  using W = float;  // softmax weights as the PV product reads them

  static void pack(const Chunk<float>& c, int64_t i, int64_t g, float* kp, float* vp) {
    const int64_t bs = c.bs, dim = c.dim, row = c.kv_heads * dim;
    const int64_t valid = std::min(bs, c.start + c.len - i * bs);
    const float* kblk = c.k + c.table[i] * c.kb + g * dim;
    const float* vblk = c.v + c.table[i] * c.vb + g * dim;
    for (int64_t t = 0; t < bs; ++t)
      for (int64_t d = 0; d < dim; ++d) kp[d * bs + t] = t < valid ? kblk[t * row + d] : 0.f;
    for (int64_t t = 0; t < bs; ++t) {
      if (t < valid) std::memcpy(vp + t * dim, vblk + t * row, dim * sizeof(float));
      else std::fill(vp + t * dim, vp + (t + 1) * dim, 0.f);
    }
  }

  static void load_q(const float* src, float* dst, int64_t n) { std::memcpy(dst, src, n * 4); }

  // S[r][t] = q[r] . k[t] for R rows and NB vectors of keys; kp: K^T [dim][bs].
  template <int R, int NB>
  static void scores_tile(const float* q, int64_t dim, const float* kp, int64_t bs, float* s) {
    Vec acc[R][NB];
    for (int r = 0; r < R; ++r)
      for (int x = 0; x < NB; ++x) acc[r][x] = Vec(0.f);
    for (int64_t d = 0; d < dim; ++d) {
      Vec kv[NB];
      for (int x = 0; x < NB; ++x) kv[x] = Vec::loadu(kp + d * bs + x * kL);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const Vec qd(q[r * dim + d]);
        for (int x = 0; x < NB; ++x) acc[r][x] = at::vec::fmadd(qd, kv[x], acc[r][x]);
      }
    }
    for (int r = 0; r < R; ++r)
      for (int x = 0; x < NB; ++x) acc[r][x].store(s + r * bs + x * kL);
  }

  template <int NB>
  static void scores_nb(const float* q, int64_t dim, const float* kp, int64_t bs, float* s,
                        int64_t rows) {
    constexpr int R = std::min(8, kAcc / NB);
    for (int64_t r = 0; r < rows; r += R) scores_tile<R, NB>(q + r * dim, dim, kp, bs, s + r * bs);
  }

  static void scores(const float* q, int64_t dim, const float* kp, int64_t bs, float* s,
                     int64_t rows) {
    switch (bs / kL) {
      case 1: return scores_nb<1>(q, dim, kp, bs, s, rows);
      case 2: return scores_nb<2>(q, dim, kp, bs, s, rows);
      default: return scores_nb<4>(q, dim, kp, bs, s, rows);
    }
  }

  // O[r][cols] += sum over t of w[r][t] * v[t][cols], for R rows and 2 vectors of columns.
  template <int R>
  static void pv_tile(const float* w, int64_t bs, const float* vp, float* o, int64_t dim,
                      int64_t c0) {
    Vec acc[R][2];
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < 2; ++c) acc[r][c] = Vec::loadu(o + r * dim + c0 + c * kL);
    for (int64_t t = 0; t < bs; ++t) {
      const Vec v0 = Vec::loadu(vp + t * dim + c0), v1 = Vec::loadu(vp + t * dim + c0 + kL);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const Vec wt(w[r * bs + t]);
        acc[r][0] = at::vec::fmadd(wt, v0, acc[r][0]);
        acc[r][1] = at::vec::fmadd(wt, v1, acc[r][1]);
      }
    }
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < 2; ++c) acc[r][c].store(o + r * dim + c0 + c * kL);
  }

  static void pv(const float* w, int64_t bs, const float* vp, float* o, int64_t dim,
                 int64_t rows) {
    constexpr int R = kAcc / 2;
    for (int64_t r = 0; r < rows; r += R)
      for (int64_t c0 = 0; c0 < dim; c0 += 2 * kL) pv_tile<R>(w + r * bs, bs, vp, o + r * dim, dim, c0);
  }

  // Weights of keys [a, b) from s, zeros elsewhere; returns their sum.
  static float store(const float* s, int64_t a, int64_t b, int64_t bs, void* wv) {
    auto* w = static_cast<float*>(wv);
    std::fill(w, w + a, 0.f);
    std::memcpy(w + a, s + a, (b - a) * sizeof(float));
    std::fill(w + b, w + bs, 0.f);
    return at::vec::reduce_all<float>([](Vec& x, Vec& y) { return x + y; }, s + a, b - a);
  }
};

#if defined(HAVE_BF16_PREFILL)
// ---------------------------------------------------------------- bf16 (AVX512-BF16)
inline __m512bh as_bh(__m512i x) { return (__m512bh)x; }

struct Bf16Path {
  using T = c10::BFloat16;
  using W = uint16_t;

  static void pack(const Chunk<c10::BFloat16>& c, int64_t i, int64_t g, uint16_t* kp,
                   uint16_t* vp) {
    const int64_t bs = c.bs, dim = c.dim, row = c.kv_heads * dim;
    const int64_t valid = std::min(bs, c.start + c.len - i * bs);
    const auto* kblk = reinterpret_cast<const uint16_t*>(c.k + c.table[i] * c.kb + g * dim);
    const auto* vblk = reinterpret_cast<const uint16_t*>(c.v + c.table[i] * c.vb + g * dim);
    // K: [dim/2][bs][2]: the 32-bit pairs of each row, transposed.
    auto* kp32 = reinterpret_cast<uint32_t*>(kp);
    for (int64_t t = 0; t < bs; ++t) {
      const auto* src = reinterpret_cast<const uint32_t*>(kblk + t * row);
      for (int64_t p = 0; p < dim / 2; ++p) kp32[p * bs + t] = t < valid ? src[p] : 0u;
    }
    // V: [bs/2][dim][2]: rows 2s and 2s+1 interleaved.
    for (int64_t sp = 0; sp < bs / 2; ++sp) {
      const int64_t t0 = 2 * sp, t1 = 2 * sp + 1;
      uint16_t* dst = vp + sp * dim * 2;
      for (int64_t d = 0; d < dim; ++d) {
        dst[2 * d] = t0 < valid ? vblk[t0 * row + d] : 0;
        dst[2 * d + 1] = t1 < valid ? vblk[t1 * row + d] : 0;
      }
    }
  }

  static void load_q(const c10::BFloat16* src, uint16_t* dst, int64_t n) {
    std::memcpy(dst, src, n * 2);
  }

  // S[r][t] for 8 rows and NB vectors of 16 keys; kp: [dim/2][16*NB][2].
  template <int NB>
  static void scores_tile(const uint16_t* q, int64_t dim, const uint16_t* kp, float* s,
                          int64_t bs) {
    __m512 acc[8][NB];
    for (int r = 0; r < 8; ++r)
      for (int x = 0; x < NB; ++x) acc[r][x] = _mm512_setzero_ps();
    for (int64_t p = 0; p < dim / 2; ++p) {
      __m512i kz[NB];
      for (int x = 0; x < NB; ++x) kz[x] = _mm512_loadu_si512(kp + (p * bs + 16 * x) * 2);
#pragma GCC unroll 8
      for (int r = 0; r < 8; ++r) {
        uint32_t pair;
        std::memcpy(&pair, q + r * dim + 2 * p, 4);
        const __m512i qz = _mm512_set1_epi32(static_cast<int>(pair));
        for (int x = 0; x < NB; ++x) acc[r][x] = _mm512_dpbf16_ps(acc[r][x], as_bh(qz), as_bh(kz[x]));
      }
    }
    for (int r = 0; r < 8; ++r)
      for (int x = 0; x < NB; ++x) _mm512_storeu_ps(s + r * bs + 16 * x, acc[r][x]);
  }

  static void scores(const uint16_t* q, int64_t dim, const uint16_t* kp, int64_t bs, float* s,
                     int64_t rows) {
    for (int64_t r = 0; r < rows; r += 8) {
      if (bs == 32) scores_tile<2>(q + r * dim, dim, kp, s + r * bs, bs);
      else scores_tile<1>(q + r * dim, dim, kp, s + r * bs, bs);
    }
  }

  // O[r][cols] += sum over t of w[r][t] * v[t][cols] for R rows, 2 vectors of 16 columns.
  template <int R>
  static void pv_tile(const uint16_t* w, int64_t bs, const uint16_t* vp, float* o, int64_t dim,
                      int64_t c0) {
    __m512 acc[R][2];
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < 2; ++c) acc[r][c] = _mm512_loadu_ps(o + r * dim + c0 + 16 * c);
    for (int64_t sp = 0; sp < bs / 2; ++sp) {
      const __m512i v0 = _mm512_loadu_si512(vp + (sp * dim + c0) * 2);
      const __m512i v1 = _mm512_loadu_si512(vp + (sp * dim + c0 + 16) * 2);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        uint32_t pair;
        std::memcpy(&pair, w + r * bs + 2 * sp, 4);
        const __m512i pz = _mm512_set1_epi32(static_cast<int>(pair));
        acc[r][0] = _mm512_dpbf16_ps(acc[r][0], as_bh(pz), as_bh(v0));
        acc[r][1] = _mm512_dpbf16_ps(acc[r][1], as_bh(pz), as_bh(v1));
      }
    }
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < 2; ++c) _mm512_storeu_ps(o + r * dim + c0 + 16 * c, acc[r][c]);
  }

  static void pv(const uint16_t* w, int64_t bs, const uint16_t* vp, float* o, int64_t dim,
                 int64_t rows) {
    for (int64_t r = 0; r < rows; r += 8)
      for (int64_t c0 = 0; c0 < dim; c0 += 32) pv_tile<8>(w + r * bs, bs, vp, o + r * dim, dim, c0);
  }

  // Weights of keys [a, b) rounded to bf16, zeros elsewhere; returns the sum of the rounded
  // weights (what the PV product multiplies by).
  static float store(const float* s, int64_t a, int64_t b, int64_t bs, void* wv) {
    auto* w = static_cast<uint16_t*>(wv);
    const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    float sum = 0.f;
    for (int64_t x = 0; x < bs; x += 16) {
      const __m512i idx = _mm512_add_epi32(iota, _mm512_set1_epi32(static_cast<int>(x)));
      const __mmask16 keep = _mm512_cmpge_epi32_mask(idx, _mm512_set1_epi32(static_cast<int>(a))) &
                             _mm512_cmplt_epi32_mask(idx, _mm512_set1_epi32(static_cast<int>(b)));
      const __m512 e = _mm512_maskz_loadu_ps(keep, s + x);
      const __m256i eb = (__m256i)_mm512_cvtneps_pbh(e);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(w + x), eb);
      sum += _mm512_reduce_add_ps(_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(eb), 16)));
    }
    return sum;
  }
};
#endif

// K and V packs of one call, kept per calling thread and grown when a longer context needs
// more: each call rewrites every block it reads, so the buffer needs no zero fill and the
// 30-odd calls of a chunk (one per layer) allocate nothing. It holds the longest context
// prefilled so far on the thread (K and V of all KV heads of one layer).
template <typename PK>
PK* pack_buffer(size_t elems) {
  thread_local std::unique_ptr<PK[]> buf;
  thread_local size_t cap = 0;
  if (cap < elems) {
    buf.reset();
    buf.reset(new PK[elems]);
    cap = elems;
  }
  return buf.get();
}

template <typename Path>
void prefill_kernel(const Chunk<typename Path::T>& c, const typename Path::T* q, double scale,
                    typename Path::T* out) {
  using T = typename Path::T;
  using W = typename Path::W;
  using QS = std::conditional_t<std::is_same_v<T, float>, float, uint16_t>;  // query storage
  const int64_t bs = c.bs, dim = c.dim, G = c.group;
  const int64_t total = c.start + c.len;
  const int64_t nblocks = (total + bs - 1) / bs;
  const int64_t first_pos = c.window > 0 ? std::max<int64_t>(0, c.start - c.window + 1) : 0;
  const int64_t first_block = first_pos / bs;
  const int64_t blk_elems = bs * dim;  // one packed K (or V) block of one KV head
  using PK = std::conditional_t<std::is_same_v<T, float>, float, uint16_t>;
  const size_t pack_elems = static_cast<size_t>(c.kv_heads * nblocks * blk_elems);
  PK* const kpack = pack_buffer<PK>(2 * pack_elems);
  PK* const vpack = kpack + pack_elems;
  at::parallel_for(0, (nblocks - first_block) * c.kv_heads, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t w = b0; w < b1; ++w) {
      const int64_t i = first_block + w / c.kv_heads, g = w % c.kv_heads;
      const int64_t off = (g * nblocks + i) * blk_elems;
      Path::pack(c, i, g, kpack + off, vpack + off);
    }
  });

  const int64_t ntiles = (c.len + kTile - 1) / kTile;
  const int64_t rows_p = (kTile * G + kRowPad - 1) / kRowPad * kRowPad;
  // Items longest first, onto the least-loaded thread.
  const int64_t nitems = ntiles * c.kv_heads;
  std::vector<int64_t> cost(nitems), order(nitems);
  for (int64_t it = 0; it < nitems; ++it) {
    const int64_t tile = it / c.kv_heads;
    const int64_t hi = c.start + std::min(c.len, (tile + 1) * kTile);
    const int64_t lo = c.window > 0 ? std::max<int64_t>(0, c.start + tile * kTile - c.window + 1) : 0;
    cost[it] = hi - lo;
    order[it] = it;
  }
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return cost[a] > cost[b]; });
  const int nbins = std::max(1, std::min<int>(at::get_num_threads(), static_cast<int>(nitems)));
  std::vector<std::vector<int64_t>> bins(nbins);
  std::vector<int64_t> load(nbins, 0);
  for (int64_t it : order) {
    const int b = static_cast<int>(std::min_element(load.begin(), load.end()) - load.begin());
    bins[b].push_back(it);
    load[b] += cost[it] + 16;
  }
  const float sc = static_cast<float>(scale);

  at::parallel_for(0, nbins, 1, [&](int64_t bin_begin, int64_t bin_end) {
    std::vector<QS> qs(rows_p * dim);
    std::vector<W> w(rows_p * bs);
    std::vector<float> s(rows_p * bs), o(rows_p * dim), m(rows_p), l(rows_p);
    std::vector<int64_t> pos(rows_p), lo_r(rows_p);
    for (int64_t bin = bin_begin; bin < bin_end; ++bin) {
      for (const int64_t it : bins[bin]) {
        const int64_t tile = it / c.kv_heads, g = it % c.kv_heads;
        const int64_t t0 = tile * kTile, tn = std::min(kTile, c.len - t0);
        std::fill(qs.begin(), qs.end(), QS(0));
        for (int64_t i = 0; i < tn; ++i)  // row i*G + j: token i of the tile, head j of the group
          Path::load_q(q + ((t0 + i) * c.heads + g * G) * dim, qs.data() + i * G * dim, G * dim);
        for (int64_t r = 0; r < rows_p; ++r) {
          const int64_t i = std::min(r / G, tn - 1);  // padding rows: the last token's limits
          pos[r] = c.start + t0 + i;
          lo_r[r] = c.window > 0 ? std::max<int64_t>(0, pos[r] - c.window + 1) : 0;
        }
        std::fill(o.begin(), o.end(), 0.f);
        std::fill(m.begin(), m.end(), -std::numeric_limits<float>::infinity());
        std::fill(l.begin(), l.end(), 0.f);
        const int64_t hi = c.start + t0 + tn;  // keys at positions < hi may be read
        for (int64_t i = lo_r[0] / bs; i * bs < hi; ++i) {
          const int64_t off = (g * nblocks + i) * blk_elems;
          Path::scores(qs.data(), dim, kpack + off, bs, s.data(), rows_p);
          for (int64_t r = 0; r < rows_p; ++r) {
            const int64_t a = std::max<int64_t>(0, lo_r[r] - i * bs);
            const int64_t b = std::min<int64_t>(bs, pos[r] - i * bs + 1);
            if (a >= b) {  // no key of this row in this block
              std::fill(w.data() + r * bs, w.data() + (r + 1) * bs, W(0));
              continue;
            }
            softmax_range(s.data() + r * bs, a, b, sc, m[r], l[r], o.data() + r * dim, dim,
                          Path::store, w.data() + r * bs, bs);
          }
          Path::pv(w.data(), bs, vpack + off, o.data(), dim, rows_p);
        }
        for (int64_t i = 0; i < tn; ++i)
          for (int64_t j = 0; j < G; ++j) {
            const int64_t r = i * G + j;
            const float inv = 1.f / l[r];
            T* dst = out + ((t0 + i) * c.heads + g * G + j) * dim;
            for (int64_t d = 0; d < dim; ++d) dst[d] = static_cast<T>(o[r * dim + d] * inv);
          }
      }
    }
  });
}

}  // namespace

namespace {
bool supported(const at::ScalarType dtype) {
  if (dtype == at::kFloat) return true;
#if defined(HAVE_BF16_PREFILL)
  if (dtype == at::kBFloat16) return true;
#endif
  return false;
}
}  // namespace

std::vector<std::string> paged_prefill_dtypes() {
  std::vector<std::string> out{"float32"};
  if (supported(at::kBFloat16)) out.push_back("bfloat16");
  return out;
}

// q [len, heads, dim] (positions start .. start+len-1); k_cache, v_cache [blocks,
// block_size, kv_heads, dim] views of the pool (block stride free), q's dtype; table
// [blocks] int64 covering positions [0, start + len); window <= 0: none.
// Returns [len, heads, dim].
at::Tensor paged_prefill(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                         const at::Tensor& table, int64_t start, int64_t window, double scale) {
  check_paged_views(q, k_cache, v_cache, "len");
  TORCH_CHECK(supported(q.scalar_type()),
              "paged_prefill takes float32, and bfloat16 where the CPU has AVX512-BF16");
  TORCH_CHECK(q.size(2) % 32 == 0 && q.size(2) <= 256,
              "paged_prefill needs a head dim that is a multiple of 32, up to 256");
  TORCH_CHECK(k_cache.size(1) == 16 || k_cache.size(1) == 32, "block size must be 16 or 32");
  TORCH_CHECK(start >= 0 && q.size(0) >= 1, "start must be >= 0 and the chunk non-empty");
  auto t = table.contiguous();
  TORCH_CHECK(t.scalar_type() == at::kLong, "table must be int64");
  TORCH_CHECK(t.numel() * k_cache.size(1) >= start + q.size(0),
              "the block table does not cover the chunk");
  const int64_t kv_heads = k_cache.size(2);
  at::Tensor out = at::empty_like(q);
  if (q.scalar_type() == at::kFloat) {
    const Chunk<float> c{k_cache.data_ptr<float>(), v_cache.data_ptr<float>(), k_cache.stride(0),
                         v_cache.stride(0), k_cache.size(1), kv_heads, q.size(2), q.size(1),
                         q.size(1) / kv_heads, t.data_ptr<int64_t>(), start, q.size(0), window};
    prefill_kernel<F32Path>(c, q.data_ptr<float>(), scale, out.data_ptr<float>());
  }
#if defined(HAVE_BF16_PREFILL)
  else {
    using B = c10::BFloat16;
    const Chunk<B> c{k_cache.data_ptr<B>(), v_cache.data_ptr<B>(), k_cache.stride(0),
                     v_cache.stride(0), k_cache.size(1), kv_heads, q.size(2), q.size(1),
                     q.size(1) / kv_heads, t.data_ptr<int64_t>(), start, q.size(0), window};
    prefill_kernel<Bf16Path>(c, q.data_ptr<B>(), scale, out.data_ptr<B>());
  }
#endif
  return out;
}
