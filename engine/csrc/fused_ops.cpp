// Fused elementwise ops of the Llama forward, for bf16 activations: RMSNorm (with the
// residual add before it), RoPE in place on the fused qkv rows, and SiLU(gate) * up.
//
// Why: in torch each of these is several passes over the activations (RMSNorm alone is
// float, pow, mean, add, rsqrt, mul, to, mul), each rounding to bf16 and dispatched from
// Python; in a 1,024-token bf16 prefill chunk they took about a sixth of the step.
// Numerics: the math runs in fp32 and rounds to bf16 where transformers' bf16 forward rounds
// (the residual sum, the normalized row before the weight, the output); RoPE and SiLU * up
// round once instead of after every op. The fp32 model keeps torch's ops: its greedy
// output is checked token for token against transformers.
#include "common.h"

#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <vector>

namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kL = Vec::size();

inline float f32(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Round to nearest even, as c10::BFloat16 does for finite values (activations are finite).
inline uint16_t bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

inline const uint16_t* bits(const at::Tensor& t) {
  return reinterpret_cast<const uint16_t*>(t.data_ptr<c10::BFloat16>());
}
inline uint16_t* mbits(at::Tensor& t) { return reinterpret_cast<uint16_t*>(t.data_ptr<c10::BFloat16>()); }

// Rows per task: enough elements that a thread's start-up is paid back.
inline int64_t grain(int64_t row_elems) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, row_elems)); }

void check_weight(const at::Tensor& weight, int64_t n) {
  TORCH_CHECK(weight.scalar_type() == at::kBFloat16 && weight.is_contiguous() && weight.numel() == n,
              "weight must be a contiguous bf16 [H]");
}

void check_rows(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, name, " must be [rows, features] with unit stride");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16, name, " must be bfloat16");
}

// out[t] = w * bf16(x[t] * rsqrt(mean(x[t]^2) + eps)), x already bf16 values in `row`.
inline void norm_row(const float* row, const uint16_t* w, float eps, int64_t n, uint16_t* out) {
  float ss = 0.f;
  for (int64_t i = 0; i < n; ++i) ss += row[i] * row[i];
  const float r = 1.f / std::sqrt(ss / static_cast<float>(n) + eps);
  for (int64_t i = 0; i < n; ++i) out[i] = bf16(f32(w[i]) * f32(bf16(row[i] * r)));
}

}  // namespace

// The row loop both norms share: load_row(t, row) fills row t's bf16 values (as floats),
// then out[t] = rms_norm(row). weight [H] bf16 -> out [T, H] bf16.
template <typename LoadRow>
at::Tensor norm_rows(int64_t T, int64_t H, const at::Tensor& like, const at::Tensor& weight,
                     double eps, const LoadRow& load_row) {
  check_weight(weight, H);
  at::Tensor out = at::empty({T, H}, like.options());
  const uint16_t* wp = bits(weight);
  uint16_t* op = mbits(out);
  at::parallel_for(0, T, grain(H), [&](int64_t t0, int64_t t1) {
    std::vector<float> row(H);
    for (int64_t t = t0; t < t1; ++t) {
      load_row(t, row.data());
      norm_row(row.data(), wp, static_cast<float>(eps), H, op + t * H);
    }
  });
  return out;
}

// x [T, H] bf16, weight [H] bf16 -> [T, H] bf16.
at::Tensor rms_norm_bf16(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_rows(x, "x");
  const int64_t H = x.size(1), xs = x.stride(0);
  const uint16_t* xp = bits(x);
  return norm_rows(x.size(0), H, x, weight, eps, [&](int64_t t, float* row) {
    for (int64_t i = 0; i < H; ++i) row[i] = f32(xp[t * xs + i]);
  });
}

// h += delta (rounded to bf16, in place), then returns rms_norm(h): the residual add and
// the next norm in one pass. h [T, H] contiguous bf16; delta [T, H] bf16.
at::Tensor add_rms_norm_bf16(at::Tensor& h, const at::Tensor& delta, const at::Tensor& weight,
                             double eps) {
  check_rows(h, "h");
  check_rows(delta, "delta");
  TORCH_CHECK(h.is_contiguous() && delta.sizes() == h.sizes(), "h must be contiguous, delta its shape");
  const int64_t H = h.size(1), ds = delta.stride(0);
  uint16_t* hp = mbits(h);
  const uint16_t* dp = bits(delta);
  return norm_rows(h.size(0), H, h, weight, eps, [&](int64_t t, float* row) {
    for (int64_t i = 0; i < H; ++i) {
      const uint16_t s = bf16(f32(hp[t * H + i]) + f32(dp[t * ds + i]));
      hp[t * H + i] = s;
      row[i] = f32(s);
    }
  });
}

// gate_up [T, 2I] bf16 (gate then up) -> [T, I] bf16: silu(gate) * up, in fp32, one rounding.
at::Tensor silu_mul_bf16(const at::Tensor& gate_up) {
  check_rows(gate_up, "gate_up");
  TORCH_CHECK(gate_up.size(1) % 2 == 0, "gate_up must have an even width");
  const int64_t T = gate_up.size(0), I = gate_up.size(1) / 2, gs = gate_up.stride(0);
  at::Tensor out = at::empty({T, I}, gate_up.options());
  const uint16_t* gp = bits(gate_up);
  uint16_t* op = mbits(out);
  at::parallel_for(0, T, grain(2 * I), [&](int64_t t0, int64_t t1) {
    float g[kL], u[kL], y[kL];
    for (int64_t t = t0; t < t1; ++t) {
      const uint16_t* gr = gp + t * gs;
      const uint16_t* ur = gr + I;
      uint16_t* orow = op + t * I;
      int64_t i = 0;
      for (; i + kL <= I; i += kL) {
        for (int64_t j = 0; j < kL; ++j) { g[j] = f32(gr[i + j]); u[j] = f32(ur[i + j]); }
        const Vec gv = Vec::loadu(g);
        const Vec sv = gv / (Vec(1.f) + gv.neg().exp());
        (sv * Vec::loadu(u)).store(y);
        for (int64_t j = 0; j < kL; ++j) orow[i + j] = bf16(y[j]);
      }
      for (; i < I; ++i) {
        const float gv = f32(gr[i]);
        orow[i] = bf16(gv / (1.f + std::exp(-gv)) * f32(ur[i]));
      }
    }
  });
  return out;
}

// RoPE in place on the first `heads` heads of each row of qkv [T, >= heads*dim] bf16 (the
// query heads then the key heads of the fused projection); cos, sin [T, dim] fp32 rows of
// the tables at the tokens' positions, rounded to bf16 first as transformers' bf16 forward
// uses them. x[i] <- x[i] cos[i] - x[i+d/2] sin[i]; x[i+d/2] <- x[i+d/2] cos + x[i] sin.
void rope_bf16_(at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, int64_t heads,
                int64_t dim) {
  check_rows(qkv, "qkv");
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat &&
                  cos.is_contiguous() && sin.is_contiguous() && cos.dim() == 2 &&
                  cos.sizes() == sin.sizes() && cos.size(0) == qkv.size(0) && cos.size(1) == dim,
              "cos and sin must be contiguous fp32 [T, dim]");
  TORCH_CHECK(dim % 2 == 0 && heads * dim <= qkv.size(1), "heads * dim exceeds the row");
  const int64_t T = qkv.size(0), qs = qkv.stride(0), half = dim / 2;
  uint16_t* xp = mbits(qkv);
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  at::parallel_for(0, T, grain(heads * dim), [&](int64_t t0, int64_t t1) {
    std::vector<float> c(dim), s(dim);
    for (int64_t t = t0; t < t1; ++t) {
      for (int64_t i = 0; i < dim; ++i) {
        c[i] = f32(bf16(cp[t * dim + i]));
        s[i] = f32(bf16(sp[t * dim + i]));
      }
      for (int64_t h = 0; h < heads; ++h) {
        uint16_t* x = xp + t * qs + h * dim;
        for (int64_t i = 0; i < half; ++i) {
          const float a = f32(x[i]), b = f32(x[i + half]);
          x[i] = bf16(a * c[i] - b * s[i]);
          x[i + half] = bf16(b * c[i + half] + a * s[i + half]);
        }
      }
    }
  });
}
