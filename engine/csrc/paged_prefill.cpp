// Paged prefill attention for bf16 on CPUs with AVX512-BF16: one prefill chunk's query
// tokens against the KV of its sequence, read from the paged pool (the chunk's own K/V
// included: the cache is written before attention), causal, with an optional sliding window.
//
// Why: torch's CPU flash attention runs bf16 at about the rate of fp32 (110-160 GFLOP/s on
// the AVX-512 host, where a bf16 GEMM reaches 800), and takes an explicit mask, so a later
// chunk of a long prompt computes every masked score too. Here both products run on
// VDPBF16PS (32 bf16 multiply-adds per instruction, fp32 sums), blocks above the diagonal
// are skipped, and no gather copy of earlier chunks' KV is made.
//
// Two phases per call:
// 1. K and V of every block the chunk reads are repacked once, per KV head, into the pair
//    layouts VDPBF16PS takes: K as [dim/2][block][2] (a query pair times 16 tokens), V as
//    [block/2][dim][2] (a pair of softmax weights times 16 output columns). Slots past the
//    sequence's end are zeroed.
// 2. Work items are (tile of kTile query tokens, KV head); each holds the tile's rows of the
//    group's query heads (tokens x heads sharing the KV head) and walks the blocks once with
//    an online softmax, as the decode kernel does. Items are spread over torch's threads
//    longest first.
// Numerics: scores and the softmax in fp32; the weights are rounded to bf16 for the PV
// product, as torch's bf16 flash kernel does; sums in fp32.
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && defined(__AVX512VL__)
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#endif
#include <ATen/cpu/vec/vec.h>
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#if defined(CPU_CAPABILITY_AVX512) && defined(__AVX512BF16__)
#include <immintrin.h>
#define HAVE_PREFILL_KERNEL 1
#endif

namespace {

#if defined(HAVE_PREFILL_KERNEL)
constexpr int64_t kTile = 32;  // query tokens per work item
constexpr int kRowsQK = 8;     // query rows per score micro-kernel call

inline uint16_t bits(const c10::BFloat16& x) { return x.x; }

inline __m512bh as_bh(__m512i x) { return (__m512bh)x; }

// S[r][t] (r < kRowsQK, t < 16*NB) = sum over d of q[r][d] * k[t][d], fp32.
// qb: query rows as bf16, `dim` apart; kp: one block's K as [dim/2][16*NB][2].
template <int NB>
inline void scores_tile(const uint16_t* qb, int64_t dim, const uint16_t* kp, float* s,
                        int64_t s_stride) {
  __m512 acc[kRowsQK][NB];
  for (int r = 0; r < kRowsQK; ++r)
    for (int x = 0; x < NB; ++x) acc[r][x] = _mm512_setzero_ps();
  const int64_t pairs = dim / 2, width = 16 * NB;
  for (int64_t p = 0; p < pairs; ++p) {
    __m512i kz[NB];
    for (int x = 0; x < NB; ++x) kz[x] = _mm512_loadu_si512(kp + (p * width + 16 * x) * 2);
#pragma GCC unroll 8
    for (int r = 0; r < kRowsQK; ++r) {
      uint32_t pair;
      std::memcpy(&pair, qb + r * dim + 2 * p, 4);
      const __m512i qz = _mm512_set1_epi32(static_cast<int>(pair));
      for (int x = 0; x < NB; ++x) acc[r][x] = _mm512_dpbf16_ps(acc[r][x], as_bh(qz), as_bh(kz[x]));
    }
  }
  for (int r = 0; r < kRowsQK; ++r)
    for (int x = 0; x < NB; ++x) _mm512_storeu_ps(s + r * s_stride + 16 * x, acc[r][x]);
}

// O[r][:] += sum over t of P[r][t] * v[t][:] for R rows, dim = 16*DV columns.
// pb: weights as bf16, `p_stride` apart; vp: one block's V as [bs/2][dim][2].
template <int R, int DV>
inline void pv_tile(const uint16_t* pb, int64_t p_stride, const uint16_t* vp, int64_t bs,
                    float* o, int64_t dim) {
  __m512 acc[R][DV];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < DV; ++c) acc[r][c] = _mm512_loadu_ps(o + r * dim + 16 * c);
  for (int64_t sp = 0; sp < bs / 2; ++sp) {
    __m512i vz[DV];
    for (int c = 0; c < DV; ++c) vz[c] = _mm512_loadu_si512(vp + (sp * dim + 16 * c) * 2);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      uint32_t pair;
      std::memcpy(&pair, pb + r * p_stride + 2 * sp, 4);
      const __m512i pz = _mm512_set1_epi32(static_cast<int>(pair));
      for (int c = 0; c < DV; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], as_bh(pz), as_bh(vz[c]));
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < DV; ++c) _mm512_storeu_ps(o + r * dim + 16 * c, acc[r][c]);
}

// The PV product of `rows` rows (a multiple of 8), in groups that keep 16 accumulators.
template <int DV>
void pv_rows(const uint16_t* pb, int64_t p_stride, const uint16_t* vp, int64_t bs, float* o,
             int64_t dim, int64_t rows) {
  constexpr int R = DV >= 8 ? 2 : (DV >= 4 ? 4 : 8);
  for (int64_t r = 0; r < rows; r += R)
    pv_tile<R, DV>(pb + r * p_stride, p_stride, vp, bs, o + r * dim, dim);
}

using PvFn = void (*)(const uint16_t*, int64_t, const uint16_t*, int64_t, float*, int64_t, int64_t);

PvFn pv_for(int64_t dim) {
  switch (dim / 16) {
    case 2: return pv_rows<2>;
    case 4: return pv_rows<4>;
    case 6: return pv_rows<6>;
    case 8: return pv_rows<8>;
    default: return nullptr;
  }
}

// One row's scores of one block (16*bs/16 keys from position `base`): keys at positions
// [lo, pos] count, the rest are masked; the online softmax state (m, l) and the row's output
// o are updated, and the weights written as bf16 to pb (0 for masked keys).
inline void softmax_block(float* sr, int64_t bs, int64_t base, int64_t lo, int64_t pos,
                          float sc, float& m, float& l, uint16_t* pb, float* o, int64_t dim) {
  using Vec = at::vec::Vectorized<float>;
  const float ninf = -std::numeric_limits<float>::infinity();
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i a = _mm512_set1_epi32(static_cast<int>(std::max<int64_t>(0, lo - base)));
  const __m512i b = _mm512_set1_epi32(static_cast<int>(std::min<int64_t>(bs, pos - base + 1)));
  __mmask16 keep[2];
  __m512 x[2];
  float bmax = ninf;
  for (int64_t v = 0; v < bs / 16; ++v) {
    const __m512i idx = _mm512_add_epi32(iota, _mm512_set1_epi32(static_cast<int>(16 * v)));
    keep[v] = _mm512_cmpge_epi32_mask(idx, a) & _mm512_cmplt_epi32_mask(idx, b);
    x[v] = _mm512_mask_blend_ps(keep[v], _mm512_set1_ps(ninf),
                                _mm512_mul_ps(_mm512_loadu_ps(sr + 16 * v), _mm512_set1_ps(sc)));
    bmax = std::max(bmax, _mm512_reduce_max_ps(x[v]));
  }
  const float mnew = std::max(m, bmax);
  if (mnew == ninf) {  // nothing of this row in the blocks so far
    std::fill(pb, pb + bs, 0);
    return;
  }
  const float alpha = std::exp(m - mnew);
  float bsum = 0.f;
  for (int64_t v = 0; v < bs / 16; ++v) {
    const Vec e = (Vec(x[v]) - Vec(mnew)).exp_u20();
    const __m512 ez = _mm512_maskz_mov_ps(keep[v], e);
    const __m256i eb = (__m256i)_mm512_cvtneps_pbh(ez);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(pb + 16 * v), eb);
    // The sum of the weights as the PV product sees them (rounded to bf16).
    bsum += _mm512_reduce_add_ps(_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(eb), 16)));
  }
  l = l * alpha + bsum;
  m = mnew;
  if (alpha != 1.f)
    for (int64_t d = 0; d < dim; ++d) o[d] *= alpha;
}

struct Chunk {
  const c10::BFloat16* k;  // k_cache base [blocks, bs, kv_heads, dim], block stride kb
  const c10::BFloat16* v;
  int64_t kb, vb, bs, kv_heads, dim, heads, group;
  const int64_t* table;  // block ids covering positions [0, start + len)
  int64_t start, len, window;
};

// Phase 1: block i of the sequence (positions i*bs ..), KV head g, into kp/vp.
void pack_block(const Chunk& c, int64_t i, int64_t g, uint16_t* kp, uint16_t* vp) {
  const int64_t bs = c.bs, dim = c.dim, row = c.kv_heads * dim;
  const int64_t valid = std::min(bs, c.start + c.len - i * bs);  // tokens of the sequence here
  const auto* kblk = reinterpret_cast<const uint16_t*>(c.k + c.table[i] * c.kb + g * dim);
  const auto* vblk = reinterpret_cast<const uint16_t*>(c.v + c.table[i] * c.vb + g * dim);
  // K: [dim/2][bs][2]: 32-bit pairs transposed.
  auto* kp32 = reinterpret_cast<uint32_t*>(kp);
  for (int64_t t = 0; t < bs; ++t) {
    if (t < valid) {
      const auto* src = reinterpret_cast<const uint32_t*>(kblk + t * row);
      for (int64_t p = 0; p < dim / 2; ++p) kp32[p * bs + t] = src[p];
    } else {
      for (int64_t p = 0; p < dim / 2; ++p) kp32[p * bs + t] = 0;
    }
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

void prefill_kernel(const Chunk& c, const c10::BFloat16* q, double scale, c10::BFloat16* out) {
  const int64_t bs = c.bs, dim = c.dim, G = c.group;
  const int64_t total = c.start + c.len;
  const int64_t nblocks = (total + bs - 1) / bs;
  const int64_t first_pos = c.window > 0 ? std::max<int64_t>(0, c.start - c.window + 1) : 0;
  const int64_t first_block = first_pos / bs;
  const int64_t blk_elems = bs * dim;  // one packed K (or V) block of one KV head
  std::vector<uint16_t> kpack(c.kv_heads * nblocks * blk_elems), vpack(kpack.size());
  at::parallel_for(0, (nblocks - first_block) * c.kv_heads, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t w = b0; w < b1; ++w) {
      const int64_t i = first_block + w / c.kv_heads, g = w % c.kv_heads;
      const int64_t off = (g * nblocks + i) * blk_elems;
      pack_block(c, i, g, kpack.data() + off, vpack.data() + off);
    }
  });

  const int64_t ntiles = (c.len + kTile - 1) / kTile;
  const int64_t rows = kTile * G, rows_p = (rows + 7) / 8 * 8;
  const PvFn pv = pv_for(dim);
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
  const float ninf = -std::numeric_limits<float>::infinity();
  const auto* qbits = reinterpret_cast<const uint16_t*>(q);
  auto* obits = reinterpret_cast<uint16_t*>(out);

  at::parallel_for(0, nbins, 1, [&](int64_t bin_begin, int64_t bin_end) {
    std::vector<uint16_t> qb(rows_p * dim), pb(rows_p * bs);
    std::vector<float> s(rows_p * bs), o(rows_p * dim), m(rows_p), l(rows_p);
    std::vector<int64_t> pos(rows_p), lo_r(rows_p);
    for (int64_t bin = bin_begin; bin < bin_end; ++bin) {
      for (const int64_t it : bins[bin]) {
        const int64_t tile = it / c.kv_heads, g = it % c.kv_heads;
        const int64_t t0 = tile * kTile, tn = std::min(kTile, c.len - t0);
        // Rows: token i of the tile, query head j of the group -> row i*G + j.
        std::fill(qb.begin(), qb.end(), 0);
        for (int64_t i = 0; i < tn; ++i)
          for (int64_t j = 0; j < G; ++j) {
            const int64_t r = i * G + j;
            std::memcpy(qb.data() + r * dim, qbits + ((t0 + i) * c.heads + g * G + j) * dim, dim * 2);
          }
        for (int64_t r = 0; r < rows_p; ++r) {
          const int64_t i = std::min(r / G, tn - 1);  // padding rows copy the last token's limits
          pos[r] = c.start + t0 + i;
          lo_r[r] = c.window > 0 ? std::max<int64_t>(0, pos[r] - c.window + 1) : 0;
        }
        std::fill(o.begin(), o.end(), 0.f);
        std::fill(m.begin(), m.end(), ninf);
        std::fill(l.begin(), l.end(), 0.f);
        const int64_t hi = c.start + t0 + tn;  // positions < hi may be read
        const int64_t lo = lo_r[0];
        for (int64_t i = lo / bs; i * bs < hi; ++i) {
          const int64_t off = (g * nblocks + i) * blk_elems;
          const uint16_t* kp = kpack.data() + off;
          const uint16_t* vp = vpack.data() + off;
          for (int64_t r = 0; r < rows_p; r += kRowsQK) {
            if (bs == 32) scores_tile<2>(qb.data() + r * dim, dim, kp, s.data() + r * bs, bs);
            else scores_tile<1>(qb.data() + r * dim, dim, kp, s.data() + r * bs, bs);
          }
          const int64_t base = i * bs;
          for (int64_t r = 0; r < rows_p; ++r)
            softmax_block(s.data() + r * bs, bs, i * bs, lo_r[r], pos[r], sc, m[r], l[r],
                          pb.data() + r * bs, o.data() + r * dim, dim);
          pv(pb.data(), bs, vp, bs, o.data(), dim, rows_p);
        }
        for (int64_t i = 0; i < tn; ++i)
          for (int64_t j = 0; j < G; ++j) {
            const int64_t r = i * G + j;
            const float inv = 1.f / l[r];
            uint16_t* dst = obits + ((t0 + i) * c.heads + g * G + j) * dim;
            for (int64_t d = 0; d < dim; ++d) dst[d] = bits(c10::BFloat16(o[r * dim + d] * inv));
          }
      }
    }
  });
}
#endif

}  // namespace

bool paged_prefill_supported() {
#if defined(HAVE_PREFILL_KERNEL)
  return true;
#else
  return false;
#endif
}

// q [len, heads, dim] bf16 (positions start .. start+len-1); k_cache, v_cache [blocks,
// block_size, kv_heads, dim] bf16 views of the pool (block stride free); table [blocks]
// int64 covering positions [0, start + len); window <= 0: none. Returns [len, heads, dim].
at::Tensor paged_prefill(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                         const at::Tensor& table, int64_t start, int64_t window, double scale) {
#if defined(HAVE_PREFILL_KERNEL)
  TORCH_CHECK(q.dim() == 3 && q.is_contiguous(), "q must be a contiguous [len, heads, dim]");
  TORCH_CHECK(k_cache.dim() == 4 && v_cache.dim() == 4, "caches must be 4-D");
  TORCH_CHECK(k_cache.stride(3) == 1 && k_cache.stride(2) == k_cache.size(3) &&
                  k_cache.stride(1) == k_cache.size(2) * k_cache.size(3),
              "a cache block must be contiguous [block_size, kv_heads, dim]");
  TORCH_CHECK(v_cache.strides() == k_cache.strides(), "K and V views must share strides");
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 && k_cache.scalar_type() == at::kBFloat16,
              "paged_prefill takes bfloat16 only");
  TORCH_CHECK(q.size(2) == k_cache.size(3) && q.size(1) % k_cache.size(2) == 0,
              "head shapes do not match");
  TORCH_CHECK(q.size(2) % 32 == 0 && pv_for(q.size(2)) != nullptr,
              "paged_prefill needs a head dim of 32, 64, 96 or 128");
  TORCH_CHECK(k_cache.size(1) == 16 || k_cache.size(1) == 32, "block size must be 16 or 32");
  TORCH_CHECK(start >= 0 && q.size(0) >= 1, "start must be >= 0 and the chunk non-empty");
  auto t = table.contiguous();
  TORCH_CHECK(t.scalar_type() == at::kLong, "table must be int64");
  TORCH_CHECK(t.numel() * k_cache.size(1) >= start + q.size(0),
              "the block table does not cover the chunk");
  const int64_t kv_heads = k_cache.size(2);
  const Chunk c{k_cache.data_ptr<c10::BFloat16>(), v_cache.data_ptr<c10::BFloat16>(),
                k_cache.stride(0), v_cache.stride(0), k_cache.size(1), kv_heads, q.size(2),
                q.size(1), q.size(1) / kv_heads, t.data_ptr<int64_t>(), start, q.size(0),
                window};
  at::Tensor out = at::empty_like(q);
  prefill_kernel(c, q.data_ptr<c10::BFloat16>(), scale, out.data_ptr<c10::BFloat16>());
  return out;
#else
  TORCH_CHECK(false, "paged_prefill needs AVX-512 with AVX512-BF16 (this build has neither)");
#endif
}
