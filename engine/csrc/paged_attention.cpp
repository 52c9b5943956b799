// Paged decode attention on the CPU: one query token per sequence against its KV blocks,
// read in place from the paged pool (no gather copy, no padding to the batch's longest).
//
// Work items are (sequence, KV head) pairs, balanced over torch's intra-op threads (the
// same OpenMP pool as torch's own ops); the query heads that share a KV head (GQA) are
// handled together, so each K/V row is read once.
// Numerics: scores, softmax and the weighted sum run in fp32 whatever the storage dtype
// (fp32 or bf16), the way SDPA's CPU kernels accumulate.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

inline float to_float(float x) { return x; }
inline float to_float(c10::BFloat16 x) { return static_cast<float>(x); }

template <typename T>
inline float dot(const float* q, const T* k, int64_t dim) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t d = 0; d < dim; ++d) acc += q[d] * to_float(k[d]);
  return acc;
}

template <typename T>
inline void axpy(float a, const T* v, float* out, int64_t dim) {
#pragma omp simd
  for (int64_t d = 0; d < dim; ++d) out[d] += a * to_float(v[d]);
}

// Calls fn(token index t in [0, n), row pointer into the cache) for positions [lo, lo + n)
// of one sequence, walking its block table block by block (no division per token).
template <typename T, typename Fn>
inline void for_each_row(const int64_t* blocks, int64_t lo, int64_t n, int64_t block_size,
                         const T* base, int64_t block_stride, int64_t row_stride, Fn&& fn) {
  int64_t t = 0;
  for (int64_t b = lo / block_size; t < n; ++b) {
    const int64_t first = b == lo / block_size ? lo % block_size : 0;
    const T* blk = base + blocks[b] * block_stride;
    for (int64_t o = first; o < block_size && t < n; ++o, ++t) fn(t, blk + o * row_stride);
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

template <typename T>
void decode_kernel(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                   const at::Tensor& tables, const at::Tensor& table_starts,
                   const at::Tensor& kv_lens, int64_t window, double scale, at::Tensor& out) {
  const int64_t num_seqs = q.size(0), heads = q.size(1), dim = q.size(2);
  const int64_t block_size = k_cache.size(1), kv_heads = k_cache.size(2);
  const int64_t group = heads / kv_heads;
  // Strides of the pool views [blocks, block_size, kv_heads, dim] (only the block stride
  // may differ from a contiguous layout: the views are slices of the whole pool).
  const int64_t kb = k_cache.stride(0), ks = k_cache.stride(1), kh = k_cache.stride(2);
  const int64_t vb = v_cache.stride(0);
  const T* kp = k_cache.data_ptr<T>();
  const T* vp = v_cache.data_ptr<T>();
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
    std::vector<float> qf(hq * dim), acc(hq * dim), scores, inv(hq);
    for (int64_t bin = bin_begin; bin < bin_end; ++bin) {
      for (const int64_t item : bins[bin]) {
        const int64_t s = item / split, h0 = (item % split) * heads_per_item;
        const int64_t len = lens[s];
        const int64_t lo = window > 0 ? std::max<int64_t>(0, len - window) : 0;
        const int64_t n = len - lo;
        const int64_t* blocks = tab + tstart[s];
        // Query heads h0*group .. (h0+heads_per_item)*group, scaled, as fp32.
        const T* src = qp + (s * heads + h0 * group) * dim;
        for (int64_t i = 0; i < hq * dim; ++i) qf[i] = to_float(src[i]) * sc;
        scores.resize(hq * n);
        float* sp = scores.data();
        const float* qv = qf.data();
        for_each_row(blocks, lo, n, block_size, kp + h0 * kh, kb, ks, [&](int64_t t, const T* kr) {
          for (int64_t j = 0; j < hq; ++j) sp[j * n + t] = dot(qv + j * dim, kr + (j / group) * kh, dim);
        });
        for (int64_t j = 0; j < hq; ++j) {
          float* sg = sp + j * n;
          float m = sg[0];
          for (int64_t t = 1; t < n; ++t) m = std::max(m, sg[t]);
          float sum = 0.f;
#pragma omp simd reduction(+ : sum)
          for (int64_t t = 0; t < n; ++t) {
            sg[t] = std::exp(sg[t] - m);
            sum += sg[t];
          }
          inv[j] = 1.f / sum;
        }
        std::fill(acc.begin(), acc.end(), 0.f);
        float* av = acc.data();
        for_each_row(blocks, lo, n, block_size, vp + h0 * kh, vb, ks, [&](int64_t t, const T* vr) {
          for (int64_t j = 0; j < hq; ++j) axpy(sp[j * n + t], vr + (j / group) * kh, av + j * dim, dim);
        });
        T* dst = op + (s * heads + h0 * group) * dim;
        for (int64_t j = 0; j < hq; ++j)
          for (int64_t d = 0; d < dim; ++d) dst[j * dim + d] = static_cast<T>(av[j * dim + d] * inv[j]);
      }
    }
  });
}

// q [seqs, heads, dim]; k_cache, v_cache [blocks, block_size, kv_heads, dim] (inner three
// dims contiguous); tables [sum of blocks] int64, table_starts [seqs] int64 (offset of each
// sequence's block ids in tables); kv_lens [seqs] int64; window <= 0: none.
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
  at::Tensor out = at::empty_like(q);
  auto t = tables.contiguous(), ts = table_starts.contiguous(), kl = kv_lens.contiguous();
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
