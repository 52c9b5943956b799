// What the engine's C++ kernels share: the instruction set they are built for, and the
// checks on a paged pool's per-layer views.
#pragma once

// ATen's portable SIMD types (at::vec::Vectorized) are compiled for the widest instruction
// set the build machine has (the build is -march=native).
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

// q [tokens, heads, dim] contiguous (or, with `strided_rows`, each row's heads contiguous
// and rows any stride apart, as in a view of the fused qkv projection); k_cache, v_cache
// [blocks, block_size, kv_heads, dim] views of the pool (only the block stride is free),
// q's dtype, heads a multiple of kv_heads. `what` names q's rows in the message.
inline void check_paged_views(const at::Tensor& q, const at::Tensor& k_cache,
                              const at::Tensor& v_cache, const char* what,
                              bool strided_rows = false) {
  const bool rows_ok = q.dim() == 3 && (strided_rows ? q.stride(2) == 1 && q.stride(1) == q.size(2)
                                                     : q.is_contiguous());
  TORCH_CHECK(rows_ok, "q must be a ", strided_rows ? "row-wise " : "", "contiguous [", what,
              ", heads, dim]");
  TORCH_CHECK(k_cache.dim() == 4 && v_cache.dim() == 4, "caches must be 4-D");
  TORCH_CHECK(k_cache.stride(3) == 1 && k_cache.stride(2) == k_cache.size(3) &&
                  k_cache.stride(1) == k_cache.size(2) * k_cache.size(3),
              "a cache block must be contiguous [block_size, kv_heads, dim]");
  TORCH_CHECK(v_cache.strides() == k_cache.strides(), "K and V views must share strides");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() && q.scalar_type() == v_cache.scalar_type(),
              "q and the cache dtype differ");
  TORCH_CHECK(q.size(2) == k_cache.size(3) && q.size(1) % k_cache.size(2) == 0,
              "head shapes do not match");
}
