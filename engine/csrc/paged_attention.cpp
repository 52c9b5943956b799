// Paged decode attention on the CPU: one query token per sequence against its KV blocks,
// read in place from the paged pool (no gather copy, no padding to the batch's longest).
//
// Work items are (sequence, KV heads) pairs, balanced over torch's intra-op threads (the
// same OpenMP pool as torch's own ops); the query heads that share a KV head (GQA) are
// handled together, so each K/V row is read once.
// Each item walks its blocks once with an online softmax (running max and sum per query
// head), so a block's scores stay in L1 and K and V of a block are read back to back.
// The V pass loads each V row once for all the query heads of its KV head; the next block
// is prefetched while the current one computes.
// Numerics: scores, softmax and the weighted sum run in fp32 whatever the storage dtype
// (fp32 or bf16), the way SDPA's CPU kernels accumulate. On CPUs with AVX512-BF16, bf16
// scores are VDPBF16PS dot products of the bf16 query and K (exact products, fp32 sums),
// scaled after: the same values up to the order of the fp32 additions.
//
// Vector code uses ATen's portable SIMD types (at::vec::Vectorized), compiled for the
// widest instruction set the build machine has (the build is -march=native); the score pass
// reduces its per-row sums with a hand-written AVX-512 or AVX2 tree (`lane_sums`).
#include "common.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <string>
#include <vector>

namespace {

// Asks the cache for [p, p + bytes), one hint per 64-byte line.
inline void prefetch_span(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t i = 0; i < bytes; i += 64) __builtin_prefetch(c + i, 0, 3);
}

// Asks for the `span` elements at the start of each of a block's `bs` rows (`row` apart):
// one contiguous span when the item reads every KV head.
template <typename T>
inline void prefetch_block(const T* blk, int64_t span, int64_t row, int64_t bs) {
  if (blk == nullptr) return;
  if (span == row) return prefetch_span(blk, bs * row * sizeof(T));
  for (int64_t t = 0; t < bs; ++t) prefetch_span(blk + t * row, span * sizeof(T));
}

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kLanes = Vec::size();

inline Vec load_f(const float* p) { return Vec::loadu(p); }
inline Vec load_f(const c10::BFloat16* p) {
  Vec out;
  at::vec::load_to_float(p, out);
  return out;
}
inline float to_float(float x) { return x; }
inline float to_float(c10::BFloat16 x) { return static_cast<float>(x); }

// q . k over dim; q is fp32, k the cache's dtype. `vdim` = dim rounded down to whole vectors.
template <typename T>
inline float dot(const float* q, const T* k, int64_t vdim, int64_t dim) {
  Vec acc(0.f);
  for (int64_t d = 0; d < vdim; d += kLanes) acc = at::vec::fmadd(Vec::loadu(q + d), load_f(k + d), acc);
  float s = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, acc);
  for (int64_t d = vdim; d < dim; ++d) s += q[d] * to_float(k[d]);
  return s;
}

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
// Scores of kRows consecutive K rows (row stride `row`) against q, dim a multiple of the
// vector width: one accumulator per row, then a transpose-and-add tree (`lane_sums`, one
// per instruction set) instead of a horizontal sum per row. Lane i of the result is row
// i's score.
constexpr int64_t kRows = kLanes;  // K rows scored at a time by `scores_rows`

#if defined(CPU_CAPABILITY_AVX512)
// Per 128-bit lane L: [sum of a's four floats in L, same for b, c, d].
inline __m512 hsum4(__m512 a, __m512 b, __m512 c, __m512 d) {
  const __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
  const __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
  const __m512d abd = _mm512_castps_pd(ab), cdd = _mm512_castps_pd(cd);
  return _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(abd, cdd)),
                       _mm512_castpd_ps(_mm512_unpackhi_pd(abd, cdd)));
}
// Lane i: the sum of a[i]'s 16 floats (about 3 shuffle/add ops per row instead of 8).
inline Vec lane_sums(const Vec* a) {
  // r[g] holds, per 128-bit lane L, the partial sums of rows 4g..4g+3 over lane L.
  const __m512 r0 = hsum4(a[0], a[1], a[2], a[3]), r1 = hsum4(a[4], a[5], a[6], a[7]);
  const __m512 r2 = hsum4(a[8], a[9], a[10], a[11]), r3 = hsum4(a[12], a[13], a[14], a[15]);
  // Sum the four 128-bit lanes of each r[g] into lane g of the result.
  const __m512 y01 = _mm512_add_ps(_mm512_shuffle_f32x4(r0, r1, 0x44), _mm512_shuffle_f32x4(r0, r1, 0xEE));
  const __m512 y23 = _mm512_add_ps(_mm512_shuffle_f32x4(r2, r3, 0x44), _mm512_shuffle_f32x4(r2, r3, 0xEE));
  return _mm512_add_ps(_mm512_shuffle_f32x4(y01, y23, 0x88), _mm512_shuffle_f32x4(y01, y23, 0xDD));
}
#else
// Lane i: the sum of a[i]'s 8 floats: two rounds of pairwise horizontal adds and one
// cross-lane add (9 shuffle/add ops for 8 rows, against 5-6 per row for a sum each).
inline Vec lane_sums(const Vec* a) {
  // Per 128-bit lane: u0 = [rows 0-3 partial sums], u1 = [rows 4-7 partial sums].
  const __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
  const __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}
#endif

template <typename T>
inline Vec scores_rows(const float* q, const T* k, int64_t row, int64_t dim) {
  Vec a[kRows];
#pragma GCC unroll 16
  for (int i = 0; i < kRows; ++i) a[i] = Vec(0.f);
  for (int64_t d = 0; d < dim; d += kLanes) {
    const Vec qv = Vec::loadu(q + d);
#pragma GCC unroll 16
    for (int i = 0; i < kRows; ++i) a[i] = at::vec::fmadd(qv, load_f(k + i * row + d), a[i]);
  }
  return lane_sums(a);
}
#endif

#if defined(CPU_CAPABILITY_AVX512) && defined(__AVX512BF16__)
#define HAVE_DPBF16 1
// scores_rows for bf16 K and a bf16 query (unscaled), dim a multiple of 32: VDPBF16PS
// multiplies bf16 pairs exactly and accumulates in fp32, with no conversion of K to fp32.
inline Vec scores_rows_dp(const c10::BFloat16* q, const c10::BFloat16* k, int64_t row, int64_t dim) {
  Vec a[kRows];
#pragma GCC unroll 16
  for (int i = 0; i < kRows; ++i) a[i] = Vec(0.f);
  for (int64_t d = 0; d < dim; d += 32) {
    const __m512bh qv = (__m512bh)_mm512_loadu_si512(q + d);
#pragma GCC unroll 16
    for (int i = 0; i < kRows; ++i)
      a[i] = _mm512_dpbf16_ps(a[i], qv, (__m512bh)_mm512_loadu_si512(k + i * row + d));
  }
  return lane_sums(a);
}
#endif

// acc[g][0 : C vectors] += sum over t < cnt of w[g][t] * row t of v, for G query heads that
// share v (weights `ws` apart, accumulators `as` apart): each row of v is loaded once for all
// G heads. Each element is summed over t in order from zero, then added: G x C independent
// FMA chains, where one chain per vector would wait on each FMA's latency.
template <int G, int C, typename T>
inline void weighted_rows_g(const float* w, int64_t ws, const T* v, int64_t row, int64_t cnt,
                            float* acc, int64_t as) {
  Vec sum[G][C];
#pragma GCC unroll 8
  for (int g = 0; g < G; ++g)
#pragma GCC unroll 8
    for (int i = 0; i < C; ++i) sum[g][i] = Vec(0.f);
  for (int64_t t = 0; t < cnt; ++t) {
    const T* vt = v + t * row;
    Vec x[C];
#pragma GCC unroll 8
    for (int i = 0; i < C; ++i) x[i] = load_f(vt + i * kLanes);
#pragma GCC unroll 8
    for (int g = 0; g < G; ++g) {
      const Vec wt(w[g * ws + t]);
#pragma GCC unroll 8
      for (int i = 0; i < C; ++i) sum[g][i] = at::vec::fmadd(wt, x[i], sum[g][i]);
    }
  }
#pragma GCC unroll 8
  for (int g = 0; g < G; ++g)
#pragma GCC unroll 8
    for (int i = 0; i < C; ++i)
      (Vec::loadu(acc + g * as + i * kLanes) + sum[g][i]).store(acc + g * as + i * kLanes);
}

#if defined(CPU_CAPABILITY_AVX512)
constexpr int kAccRegs = 16;  // of 32 vector registers (the rest: one row, the weight)
#else
constexpr int kAccRegs = 8;  // of 16
#endif

template <int G, typename T>
inline void v_pass_g(const float* w, int64_t ws, const T* v, int64_t row, int64_t cnt,
                     float* acc, int64_t dim, int64_t vdim) {
  int64_t d = 0;
  if constexpr (G * 8 <= kAccRegs)
    for (; d + 8 * kLanes <= vdim; d += 8 * kLanes) weighted_rows_g<G, 8>(w, ws, v + d, row, cnt, acc + d, dim);
  if constexpr (G * 4 <= kAccRegs)
    for (; d + 4 * kLanes <= vdim; d += 4 * kLanes) weighted_rows_g<G, 4>(w, ws, v + d, row, cnt, acc + d, dim);
  if constexpr (G * 2 <= kAccRegs)
    for (; d + 2 * kLanes <= vdim; d += 2 * kLanes) weighted_rows_g<G, 2>(w, ws, v + d, row, cnt, acc + d, dim);
  for (; d < vdim; d += kLanes) weighted_rows_g<G, 1>(w, ws, v + d, row, cnt, acc + d, dim);
  for (; d < dim; ++d)  // the tail that is no whole vector
    for (int g = 0; g < G; ++g) {
      float sum = 0.f;
      for (int64_t t = 0; t < cnt; ++t) sum += w[g * ws + t] * to_float(v[t * row + d]);
      acc[g * dim + d] += sum;
    }
}

// The V pass of the `group` query heads that read one KV head.
template <typename T>
inline void v_pass(int64_t group, const float* w, int64_t ws, const T* v, int64_t row,
                   int64_t cnt, float* acc, int64_t dim, int64_t vdim) {
  switch (group) {
    case 1: return v_pass_g<1>(w, ws, v, row, cnt, acc, dim, vdim);
    case 2: return v_pass_g<2>(w, ws, v, row, cnt, acc, dim, vdim);
    case 3: return v_pass_g<3>(w, ws, v, row, cnt, acc, dim, vdim);
    case 4: return v_pass_g<4>(w, ws, v, row, cnt, acc, dim, vdim);
    default:
      for (int64_t g = 0; g < group; ++g)
        v_pass_g<1>(w + g * ws, ws, v, row, cnt, acc + g * dim, dim, vdim);
  }
}

// Splits work items over the intra-op threads, longest first onto the least-loaded thread
// (LPT), so one long sequence does not leave the other threads idle at the end of a layer.
// An item is a sequence and `per_seq` of its KV heads.
std::vector<std::vector<int64_t>> balance(const int64_t* lens, int64_t num_seqs,
                                          int64_t per_seq, int64_t window, int nbins) {
  std::vector<int64_t> items(num_seqs * per_seq);
  std::vector<int64_t> cost(items.size());
  for (size_t i = 0; i < items.size(); ++i) {
    items[i] = static_cast<int64_t>(i);
    const int64_t len = lens[i / per_seq];
    cost[i] = window > 0 ? std::min(len, window) : len;
  }
  std::stable_sort(items.begin(), items.end(),
                   [&](int64_t a, int64_t b) { return cost[a] > cost[b]; });
  std::vector<std::vector<int64_t>> bins(nbins);
  std::vector<int64_t> load(nbins, 0);
  for (int64_t i : items) {
    const int b = static_cast<int>(std::min_element(load.begin(), load.end()) - load.begin());
    bins[b].push_back(i);
    load[b] += cost[i] + 16;  // + a fixed cost per item
  }
  return bins;
}

// Shapes and strides shared by every item of one call.
template <typename T>
struct Problem {
  const T* k;         // k_cache base; [blocks, block_size, kv_heads, dim], block stride kb
  const T* v;         // v_cache base, same layout, block stride vb
  int64_t kb, vb;     // block strides (elements)
  int64_t row, dim;   // row = kv_heads * dim (token stride inside a block), head dim
  int64_t vdim;       // dim rounded down to whole vectors
  int64_t block_size, group;
};

// Attention of `hq` query heads (fp32, pre-scaled, [hq, dim]) that read KV heads h0.. of
// positions [lo, lo + n) of one sequence. Online softmax block by block.
// qraw: the same heads as stored (unscaled), sc the scale; scratch: [hq, block_size] scores;
// acc: [hq, dim]; m, l: [hq] running max and sum; next_k, next_v: the first K/V row of the
// thread's next item (prefetched during this item's last block), or null.
template <typename T>
void attend(const Problem<T>& p, const int64_t* blocks, int64_t lo, int64_t n, int64_t h0,
            int64_t hq, const float* qf, const T* qraw, float sc, float* scratch, float* acc,
            float* m, float* l, const T* next_k, const T* next_v) {
  const int64_t span = (hq / p.group) * p.dim;  // elements of one token's row this item reads
  const int64_t bs = p.block_size, dim = p.dim;
  std::fill(acc, acc + hq * dim, 0.f);
  std::fill(m, m + hq, -std::numeric_limits<float>::infinity());
  std::fill(l, l + hq, 0.f);
  for (int64_t pos = lo; pos < lo + n;) {
    const int64_t b = pos / bs, first = pos % bs;
    const int64_t cnt = std::min(bs - first, lo + n - pos);  // tokens of this block
    const T* kblk = p.k + blocks[b] * p.kb + first * p.row + h0 * dim;
    const T* vblk = p.v + blocks[b] * p.vb + first * p.row + h0 * dim;
    // The next block of this item (or the next item's first) is fetched while this one
    // computes: without it each block's first rows wait on memory (the kernel read K/V at
    // about half the rate it does with it, DRAM-resident, BENCHMARKS.md fourteenth session).
    const bool last = pos + cnt >= lo + n;
    const T* nk = last ? next_k : p.k + blocks[b + 1] * p.kb + h0 * dim;
    const T* nv = last ? next_v : p.v + blocks[b + 1] * p.vb + h0 * dim;
    prefetch_block(nk, span, p.row, bs);
    prefetch_block(nv, span, p.row, bs);
    // Scores [hq, cnt]: head by head over the block's rows (L1-resident after the first).
    for (int64_t j = 0; j < hq; ++j) {
      const T* kh = kblk + (j / p.group) * dim;
      float* sj = scratch + j * bs;
      int64_t t = 0;
#if defined(HAVE_DPBF16)
      if constexpr (std::is_same_v<T, c10::BFloat16>)
        if (dim % 32 == 0)
          for (; t + kRows <= cnt; t += kRows)
            (scores_rows_dp(qraw + j * dim, kh + t * p.row, p.row, dim) * Vec(sc)).store(sj + t);
#endif
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
      if (p.vdim == dim)
        for (; t + kRows <= cnt; t += kRows)
          scores_rows(qf + j * dim, kh + t * p.row, p.row, dim).store(sj + t);
#endif
      for (; t < cnt; ++t) sj[t] = dot(qf + j * dim, kh + t * p.row, p.vdim, dim);
    }
    for (int64_t j = 0; j < hq; ++j) {
      float* sj = scratch + j * bs;
      const float bmax = at::vec::reduce_all<float>(
          [](Vec& a, Vec& c) { return at::vec::maximum(a, c); }, sj, cnt);
      const float mnew = std::max(m[j], bmax);
      const float alpha = std::exp(m[j] - mnew);  // 0 on the first block (m = -inf)
      at::vec::map([mnew](Vec x) { return (x - Vec(mnew)).exp_u20(); }, sj, sj, cnt);
      const float bsum = at::vec::reduce_all<float>([](Vec& a, Vec& c) { return a + c; }, sj, cnt);
      l[j] = l[j] * alpha + bsum;
      m[j] = mnew;
      if (alpha != 1.f)
        at::vec::map([alpha](Vec x) { return x * Vec(alpha); }, acc + j * dim, acc + j * dim, dim);
    }
    // acc[j] += p[j, :cnt] @ V[:cnt, head of j], the query heads of one KV head together
    // (each V row read and converted once for the group).
    for (int64_t j = 0; j < hq; j += p.group)
      v_pass(p.group, scratch + j * bs, bs, vblk + (j / p.group) * dim, p.row, cnt,
             acc + j * dim, dim, p.vdim);
    pos += cnt;
  }
}

template <typename T>
void decode_kernel(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                   const at::Tensor& tables, const at::Tensor& table_starts,
                   const at::Tensor& kv_lens, int64_t window, double scale, at::Tensor& out) {
  const int64_t num_seqs = q.size(0), heads = q.size(1), dim = q.size(2);
  const int64_t block_size = k_cache.size(1), kv_heads = k_cache.size(2);
  const int64_t group = heads / kv_heads;
  // Only the block stride may differ from a contiguous layout: the views are slices of the
  // whole pool.
  const Problem<T> prob{k_cache.data_ptr<T>(), v_cache.data_ptr<T>(), k_cache.stride(0),
                        v_cache.stride(0), kv_heads * dim, dim, dim - dim % kLanes,
                        block_size, group};
  const T* qp = q.data_ptr<T>();
  const int64_t qs = q.stride(0);  // rows may be a view of the fused qkv projection
  T* op = out.data_ptr<T>();
  const int64_t* tab = tables.data_ptr<int64_t>();
  const int64_t* tstart = table_starts.data_ptr<int64_t>();
  const int64_t* lens = kv_lens.data_ptr<int64_t>();
  const float sc = static_cast<float>(scale);
  const int threads = at::get_num_threads();
  // Whole sequences when there are enough of them: a token's K/V row of every head is one
  // contiguous span, read once. Few sequences: one item per KV head, to use every thread.
  const int64_t split = num_seqs >= 2 * threads ? 1 : kv_heads;  // items per sequence
  const int64_t heads_per_item = kv_heads / split;
  const int nbins = std::max(1, std::min<int>(threads, static_cast<int>(num_seqs * split)));
  const auto bins = balance(lens, num_seqs, split, window, nbins);
  const int64_t hq = heads_per_item * group;  // query heads per item

  at::parallel_for(0, nbins, 1, [&](int64_t bin_begin, int64_t bin_end) {
    std::vector<float> qf(hq * dim), acc(hq * dim), scratch(hq * block_size), m(hq), l(hq);
    for (int64_t bin = bin_begin; bin < bin_end; ++bin) {
      const auto& its = bins[bin];
      for (size_t ii = 0; ii < its.size(); ++ii) {
        const int64_t item = its[ii];
        const T* next_k = nullptr;
        const T* next_v = nullptr;
        if (ii + 1 < its.size()) {
          const int64_t s2 = its[ii + 1] / split, h2 = (its[ii + 1] % split) * heads_per_item;
          const int64_t lo2 = window > 0 ? std::max<int64_t>(0, lens[s2] - window) : 0;
          const int64_t blk2 = tab[tstart[s2] + lo2 / block_size];
          next_k = prob.k + blk2 * prob.kb + (lo2 % block_size) * prob.row + h2 * dim;
          next_v = prob.v + blk2 * prob.vb + (lo2 % block_size) * prob.row + h2 * dim;
        }
        const int64_t s = item / split, h0 = (item % split) * heads_per_item;
        const int64_t len = lens[s];
        const int64_t lo = window > 0 ? std::max<int64_t>(0, len - window) : 0;
        // Query heads h0*group .. (h0+heads_per_item)*group, scaled, as fp32.
        const T* src = qp + s * qs + h0 * group * dim;
        for (int64_t i = 0; i < hq * dim; ++i) qf[i] = to_float(src[i]) * sc;
        attend(prob, tab + tstart[s], lo, len - lo, h0, hq, qf.data(), src, sc, scratch.data(),
               acc.data(), m.data(), l.data(), next_k, next_v);
        T* dst = op + (s * heads + h0 * group) * dim;
        for (int64_t j = 0; j < hq; ++j) {
          const float inv = 1.f / l[j];
          for (int64_t d = 0; d < dim; ++d) dst[j * dim + d] = static_cast<T>(acc[j * dim + d] * inv);
        }
      }
    }
  });
}

// q [seqs, heads, dim] (each row's heads contiguous; rows may be any stride apart, as in
// a view of the fused qkv projection); k_cache, v_cache [blocks, block_size, kv_heads, dim]
// (inner three dims contiguous); tables [sum of blocks] int64, table_starts [seqs] int64
// (offset of each sequence's block ids in tables); kv_lens [seqs] int64, each >= 1;
// window <= 0: none. The result goes into `out` when given (a contiguous tensor of q's
// shape and dtype, e.g. the decode rows of the step's attention output), else a new one.
at::Tensor paged_decode(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                        const at::Tensor& tables, const at::Tensor& table_starts,
                        const at::Tensor& kv_lens, int64_t window, double scale,
                        const std::optional<at::Tensor>& out_opt) {
  check_paged_views(q, k_cache, v_cache, "seqs", /*strided_rows=*/true);
  TORCH_CHECK(tables.scalar_type() == at::kLong && table_starts.scalar_type() == at::kLong &&
                  kv_lens.scalar_type() == at::kLong,
              "tables, table_starts and kv_lens must be int64");
  TORCH_CHECK(table_starts.numel() == q.size(0) && kv_lens.numel() == q.size(0),
              "one table start and one length per sequence");
  auto t = tables.contiguous(), ts = table_starts.contiguous(), kl = kv_lens.contiguous();
  const int64_t* lp = kl.data_ptr<int64_t>();
  TORCH_CHECK(std::all_of(lp, lp + kl.numel(), [](int64_t n) { return n >= 1; }),
              "every kv_len must be >= 1");
  at::Tensor out = out_opt.has_value() ? *out_opt : at::empty(q.sizes(), q.options());
  TORCH_CHECK(out.is_contiguous() && out.sizes() == q.sizes() &&
                  out.scalar_type() == q.scalar_type(),
              "out must be a contiguous tensor of q's shape and dtype");
  if (q.scalar_type() == at::kFloat) {
    decode_kernel<float>(q, k_cache, v_cache, t, ts, kl, window, scale, out);
  } else if (q.scalar_type() == at::kBFloat16) {
    decode_kernel<c10::BFloat16>(q, k_cache, v_cache, t, ts, kl, window, scale, out);
  } else {
    TORCH_CHECK(false, "paged_decode supports float32 and bfloat16");
  }
  return out;
}

}  // namespace

// paged_prefill.cpp
at::Tensor paged_prefill(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                         const at::Tensor& table, int64_t start, int64_t window, double scale);
std::vector<std::string> paged_prefill_dtypes();
// fused_ops.cpp
at::Tensor rms_norm_bf16(const at::Tensor& x, const at::Tensor& weight, double eps);
at::Tensor add_rms_norm_bf16(at::Tensor& h, const at::Tensor& delta, const at::Tensor& weight,
                             double eps);
at::Tensor silu_mul_bf16(const at::Tensor& gate_up);
void rope_bf16_(at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, int64_t heads,
                int64_t dim);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode", &paged_decode, "Paged decode attention reading KV blocks in place",
        py::arg("q"), py::arg("k_cache"), py::arg("v_cache"), py::arg("tables"),
        py::arg("table_starts"), py::arg("kv_lens"), py::arg("window"), py::arg("scale"),
        py::arg("out") = py::none());
  m.def("paged_prefill", &paged_prefill, "Paged causal prefill attention of one chunk");
  m.def("paged_prefill_dtypes", &paged_prefill_dtypes,
        "The dtypes paged_prefill takes in this build (bfloat16 needs AVX512-BF16)");
  m.def("rms_norm_bf16", &rms_norm_bf16, "RMSNorm of bf16 rows (fp32 math)");
  m.def("add_rms_norm_bf16", &add_rms_norm_bf16, "h += delta in place, then RMSNorm(h), bf16");
  m.def("silu_mul_bf16", &silu_mul_bf16, "silu(gate) * up of bf16 [T, 2I] rows");
  m.def("rope_bf16_", &rope_bf16_, "RoPE in place on the first heads of bf16 qkv rows");
}
