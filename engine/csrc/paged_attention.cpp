// Paged decode attention on the CPU: one query token per sequence against its KV blocks,
// read in place from the paged pool (no gather copy, no padding to the batch's longest).
//
// Work items are (sequence, KV heads) pairs, balanced over torch's intra-op threads (the
// same OpenMP pool as torch's own ops); the query heads that share a KV head (GQA) are
// handled together, so each K/V row is read once.
// Each item walks its blocks once with an online softmax (running max and sum per query
// head), so a block's scores stay in L1 and K and V of a block are read back to back.
// Numerics: scores, softmax and the weighted sum run in fp32 whatever the storage dtype
// (fp32 or bf16), the way SDPA's CPU kernels accumulate.
//
// Vector code uses ATen's portable SIMD types (at::vec::Vectorized), compiled for the
// widest instruction set the build machine has (the build is -march=native); the score pass
// reduces its per-row sums with a hand-written AVX-512 or AVX2 tree (`lane_sums`).
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && defined(__AVX512VL__)
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#elif defined(__AVX2__) && defined(__FMA__)
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#else
#define CPU_CAPABILITY DEFAULT
#endif
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

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

// acc[0 : N vectors] += sum over t < cnt of w[t] * row t of v (rows `row` apart), each
// element summed over t in order from zero, then added: N independent FMA chains, where one
// chain per vector would wait on each FMA's latency.
template <int N, typename T>
inline void weighted_rows(const float* w, const T* v, int64_t row, int64_t cnt, float* acc) {
  Vec sum[N];
#pragma GCC unroll 8
  for (int i = 0; i < N; ++i) sum[i] = Vec(0.f);
  for (int64_t t = 0; t < cnt; ++t) {
    const Vec wt(w[t]);
    const T* vt = v + t * row;
#pragma GCC unroll 8
    for (int i = 0; i < N; ++i) sum[i] = at::vec::fmadd(wt, load_f(vt + i * kLanes), sum[i]);
  }
#pragma GCC unroll 8
  for (int i = 0; i < N; ++i) (Vec::loadu(acc + i * kLanes) + sum[i]).store(acc + i * kLanes);
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
// scratch: [hq, block_size] scores; acc: [hq, dim]; m, l: [hq] running max and sum.
template <typename T>
void attend(const Problem<T>& p, const int64_t* blocks, int64_t lo, int64_t n, int64_t h0,
            int64_t hq, const float* qf, float* scratch, float* acc, float* m, float* l) {
  const int64_t bs = p.block_size, dim = p.dim;
  std::fill(acc, acc + hq * dim, 0.f);
  std::fill(m, m + hq, -std::numeric_limits<float>::infinity());
  std::fill(l, l + hq, 0.f);
  for (int64_t pos = lo; pos < lo + n;) {
    const int64_t b = pos / bs, first = pos % bs;
    const int64_t cnt = std::min(bs - first, lo + n - pos);  // tokens of this block
    const T* kblk = p.k + blocks[b] * p.kb + first * p.row + h0 * dim;
    const T* vblk = p.v + blocks[b] * p.vb + first * p.row + h0 * dim;
    // Scores [hq, cnt]: head by head over the block's rows (L1-resident after the first).
    for (int64_t j = 0; j < hq; ++j) {
      const T* kh = kblk + (j / p.group) * dim;
      float* sj = scratch + j * bs;
      int64_t t = 0;
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
    // acc[j] += p[j, :cnt] @ V[:cnt, head of j]: the sums over the block's tokens kept in
    // registers, several vectors of dim at once (independent FMA chains).
    for (int64_t j = 0; j < hq; ++j) {
      const T* vh = vblk + (j / p.group) * dim;
      const float* pj = scratch + j * bs;
      float* aj = acc + j * dim;
      int64_t d = 0;
      for (; d + 8 * kLanes <= p.vdim; d += 8 * kLanes) weighted_rows<8>(pj, vh + d, p.row, cnt, aj + d);
      for (; d + 4 * kLanes <= p.vdim; d += 4 * kLanes) weighted_rows<4>(pj, vh + d, p.row, cnt, aj + d);
      for (; d < p.vdim; d += kLanes) weighted_rows<1>(pj, vh + d, p.row, cnt, aj + d);
      for (; d < dim; ++d) {  // the tail that is no whole vector (d == p.vdim here)
        float sum = 0.f;
        for (int64_t t = 0; t < cnt; ++t) sum += pj[t] * to_float(vh[t * p.row + d]);
        aj[d] += sum;
      }
    }
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
      for (const int64_t item : bins[bin]) {
        const int64_t s = item / split, h0 = (item % split) * heads_per_item;
        const int64_t len = lens[s];
        const int64_t lo = window > 0 ? std::max<int64_t>(0, len - window) : 0;
        // Query heads h0*group .. (h0+heads_per_item)*group, scaled, as fp32.
        const T* src = qp + (s * heads + h0 * group) * dim;
        for (int64_t i = 0; i < hq * dim; ++i) qf[i] = to_float(src[i]) * sc;
        attend(prob, tab + tstart[s], lo, len - lo, h0, hq, qf.data(), scratch.data(),
               acc.data(), m.data(), l.data());
        T* dst = op + (s * heads + h0 * group) * dim;
        for (int64_t j = 0; j < hq; ++j) {
          const float inv = 1.f / l[j];
          for (int64_t d = 0; d < dim; ++d) dst[j * dim + d] = static_cast<T>(acc[j * dim + d] * inv);
        }
      }
    }
  });
}

// q [seqs, heads, dim]; k_cache, v_cache [blocks, block_size, kv_heads, dim] (inner three
// dims contiguous); tables [sum of blocks] int64, table_starts [seqs] int64 (offset of each
// sequence's block ids in tables); kv_lens [seqs] int64, each >= 1; window <= 0: none.
at::Tensor paged_decode(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                        const at::Tensor& tables, const at::Tensor& table_starts,
                        const at::Tensor& kv_lens, int64_t window, double scale) {
  TORCH_CHECK(q.dim() == 3 && q.is_contiguous(), "q must be a contiguous [seqs, heads, dim]");
  TORCH_CHECK(k_cache.dim() == 4 && v_cache.dim() == 4, "caches must be 4-D");
  TORCH_CHECK(k_cache.stride(3) == 1 && k_cache.stride(2) == k_cache.size(3) &&
                  k_cache.stride(1) == k_cache.size(2) * k_cache.size(3),
              "a cache block must be contiguous [block_size, kv_heads, dim]");
  TORCH_CHECK(v_cache.strides() == k_cache.strides(), "K and V views must share strides");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type(), "q and the cache dtype differ");
  TORCH_CHECK(q.size(2) == k_cache.size(3) && q.size(1) % k_cache.size(2) == 0,
              "head shapes do not match");
  TORCH_CHECK(tables.scalar_type() == at::kLong && table_starts.scalar_type() == at::kLong &&
                  kv_lens.scalar_type() == at::kLong,
              "tables, table_starts and kv_lens must be int64");
  TORCH_CHECK(table_starts.numel() == q.size(0) && kv_lens.numel() == q.size(0),
              "one table start and one length per sequence");
  auto t = tables.contiguous(), ts = table_starts.contiguous(), kl = kv_lens.contiguous();
  const int64_t* lp = kl.data_ptr<int64_t>();
  TORCH_CHECK(std::all_of(lp, lp + kl.numel(), [](int64_t n) { return n >= 1; }),
              "every kv_len must be >= 1");
  at::Tensor out = at::empty_like(q);
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

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode", &paged_decode, "Paged decode attention reading KV blocks in place");
}
