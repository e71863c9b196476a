// Exact softmax attention for many heads of tiny width (the dynamic diffusers' 32 heads of 2-5 channels, the
// UNets' 32 heads of 12-18) on an x86 CPU with AVX-512.
//
// Why a kernel of our own: at these widths the two products of attention are a few multiply-adds per score,
// so its cost is the exp of each score. The generic flash kernel packs blocks for a GEMM and pays several
// times a vectorised exp per score; this one computes a query's scores for 16 keys per register, keeps them in
// a per-thread buffer, takes the exact maximum, then the exps and the weighted sum in one pass.
//
// bfloat16 inputs use AVX512-BF16 dot products (two channels, or two keys, per lane and instruction) with float32
// accumulation, and a shorter exp polynomial whose error (4e-5) stays far below bfloat16's rounding (2e-3); the
// probabilities are rounded to bfloat16 for the weighted sum, as a bfloat16 GEMM would. float32 inputs use
// float32 FMAs and an exp polynomial accurate to float32 (1e-7).
//
// Layouts (prepared by collab_core/tiny_head_attention.py):
//   q   [B, N, H, D]  (the projection's own layout; strides given)     out [B, N, H, D] float32, same strides
//   float32:  kt, vt [B*H, D, Mp]        keys padded with zeros to Mp = a multiple of 32
//   bfloat16: kp [B*H, Dp/2, Mp, 2] (channel pairs per key)  vt [B*H, D, Mp]   Dp = D rounded up to even
// Plain C ABI, called through ctypes: no torch headers, so it builds in a second with any g++.
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>

namespace {

// 2^t for t <= 0 (t = score * scale * log2(e) minus the maximum): split t = n + f, |f| <= 1/2, a polynomial
// for 2^f, and scalef for 2^n (which goes to 0 gracefully far below the range). Degree 6: 1e-7; degree 4: 4e-5.
template <int DEGREE>
inline __m512 exp2_nonpositive(__m512 t) {
  t = _mm512_max_ps(_mm512_set1_ps(-150.0f), t);  // this order keeps a NaN score NaN
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  // Taylor coefficients of 2^f = exp(f ln 2): ln2^k / k!
  static const float c[7] = {1.0f, 0.6931471805599453f, 0.2402265069591007f, 0.05550410866482158f,
                             0.009618129107628477f, 0.0013333558146428443f, 0.00015403530393381606f};
  __m512 p = _mm512_set1_ps(c[DEGREE]);
  for (int k = DEGREE - 1; k >= 0; --k) p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(c[k]));
  return _mm512_scalef_ps(p, n);
}

// Stores 16 scores (keys j..j+15; those at or past m, the zero padding, set to -inf) and returns the running maximum.
inline __m512 store_scores(__m512 acc, int64_t j, int64_t m, float* s, __m512 mx) {
  if (j + 16 > m) {
    const int64_t keep = m > j ? m - j : 0;
    acc = _mm512_mask_mov_ps(acc, (__mmask16)(0xFFFFu << keep), _mm512_set1_ps(-INFINITY));
  }
  _mm512_storeu_ps(s + j, acc);
  return _mm512_max_ps(mx, acc);
}

// exp(scale * (score - max)) of 16 stored scores, as 2^(score * scale*log2e - max * scale*log2e).
struct Exponent {
  __m512 a, b;
  Exponent(float scale, __m512 mx) {
    const float k = scale * 1.4426950408889634f;
    a = _mm512_set1_ps(k);
    b = _mm512_set1_ps(k * _mm512_reduce_max_ps(mx));
  }
  template <int DEGREE>
  __m512 exp(const float* scores) const {
    return exp2_nonpositive<DEGREE>(_mm512_fmsub_ps(_mm512_loadu_ps(scores), a, b));
  }
};

// out[c] = (the lanes' sum of o[c]) / (the lanes' sum of l): the weighted values over the sum of the weights.
template <int D>
inline void write_output(__m512 l, const __m512* o, float* out) {
  const float inv = 1.0f / _mm512_reduce_add_ps(l);
  for (int c = 0; c < D; ++c) out[c] = _mm512_reduce_add_ps(o[c]) * inv;
}

// One query against all keys of its head, float32.
template <int D>
void query_f32(const float* q, const float* kt, const float* vt, int64_t m, int64_t mp, float scale, float* s,
               float* out) {
  __m512 qv[D];
  for (int c = 0; c < D; ++c) qv[c] = _mm512_set1_ps(q[c]);
  __m512 mx = _mm512_set1_ps(-INFINITY);
  for (int64_t j = 0; j < mp; j += 16) {
    __m512 acc = _mm512_mul_ps(qv[0], _mm512_loadu_ps(kt + j));
    for (int c = 1; c < D; ++c) acc = _mm512_fmadd_ps(qv[c], _mm512_loadu_ps(kt + c * mp + j), acc);
    mx = store_scores(acc, j, m, s, mx);
  }
  const Exponent e(scale, mx);
  __m512 l = _mm512_setzero_ps(), o[D];
  for (int c = 0; c < D; ++c) o[c] = _mm512_setzero_ps();
  for (int64_t j = 0; j < mp; j += 16) {
    const __m512 p = e.exp<6>(s + j);
    l = _mm512_add_ps(l, p);
    for (int c = 0; c < D; ++c) o[c] = _mm512_fmadd_ps(p, _mm512_loadu_ps(vt + c * mp + j), o[c]);
  }
  write_output<D>(l, o, out);
}

inline uint32_t bf16_pair(const uint16_t* q, int c, int d) {
  return (uint32_t)q[c] | ((c + 1 < d ? (uint32_t)q[c + 1] : 0u) << 16);
}

// One query against all keys of its head, bfloat16 (D channels, P = ceil(D/2) channel pairs).
template <int D>
void query_bf16(const uint16_t* q, const uint16_t* kp, const uint16_t* vt, int64_t m, int64_t mp, float scale,
                float* s, float* out) {
  constexpr int P = (D + 1) / 2;
  __m512bh qv[P];
  for (int p = 0; p < P; ++p) qv[p] = (__m512bh)_mm512_set1_epi32((int)bf16_pair(q, 2 * p, D));
  __m512 mx = _mm512_set1_ps(-INFINITY);
  for (int64_t j = 0; j < mp; j += 16) {
    __m512 acc = _mm512_setzero_ps();
    for (int p = 0; p < P; ++p)
      acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(kp + (p * mp + j) * 2), qv[p]);
    mx = store_scores(acc, j, m, s, mx);
  }
  const Exponent e(scale, mx);
  __m512 l = _mm512_setzero_ps(), o[D];
  for (int c = 0; c < D; ++c) o[c] = _mm512_setzero_ps();
  for (int64_t j = 0; j < mp; j += 32) {
    const __m512 p0 = e.exp<4>(s + j);
    const __m512 p1 = e.exp<4>(s + j + 16);
    l = _mm512_add_ps(l, _mm512_add_ps(p0, p1));
    const __m512bh pb = _mm512_cvtne2ps_pbh(p1, p0);  // elements 0-15: keys j..j+15, 16-31: the next 16
    for (int c = 0; c < D; ++c)
      o[c] = _mm512_dpbf16_ps(o[c], pb, (__m512bh)_mm512_loadu_si512(vt + c * mp + j));
  }
  write_output<D>(l, o, out);
}

typedef void (*F32Query)(const float*, const float*, const float*, int64_t, int64_t, float, float*, float*);
typedef void (*BF16Query)(const uint16_t*, const uint16_t*, const uint16_t*, int64_t, int64_t, float, float*,
                          float*);

template <int... Ds>
struct Table {
  static constexpr F32Query f32[] = {query_f32<Ds>...};
  static constexpr BF16Query bf16[] = {query_bf16<Ds>...};
};
using Widths = Table<1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26,
                     27, 28, 29, 30, 31, 32>;

}  // namespace

extern "C" {

int tiny_head_attention_max_width(void) { return 32; }

// Returns 0 on success, 1 when the head width is unsupported, 2 when a thread's score buffer could not be allocated.
int tiny_head_attention(int bf16, const void* q, const void* k, const void* v, float* out, int64_t batch,
                        int64_t heads, int64_t n, int64_t m, int64_t mp, int64_t d, int64_t q_stride_b,
                        int64_t q_stride_n, float scale, int threads) {
  if (d < 1 || d > 32 || mp % 32) return 1;
  const int64_t dp = (d + 1) / 2 * 2;
  const int64_t items = batch * heads * n;
  int failed = 0;
#pragma omp parallel num_threads(threads)
  {
    float* s = (float*)aligned_alloc(64, (size_t)mp * sizeof(float));
    if (!s) {
#pragma omp atomic write
      failed = 1;
    }
#pragma omp for schedule(static)
    for (int64_t it = 0; it < items; ++it) {
      if (!s) continue;
      const int64_t i = it % n, bh = it / n, b = bh / heads, h = bh % heads;
      const int64_t qoff = b * q_stride_b + i * q_stride_n + h * d;
      if (bf16) {
        const uint16_t* kp = (const uint16_t*)k + bh * dp * mp;
        const uint16_t* vt = (const uint16_t*)v + bh * d * mp;
        Widths::bf16[d - 1]((const uint16_t*)q + qoff, kp, vt, m, mp, scale, s, out + qoff);
      } else {
        const float* kt = (const float*)k + bh * d * mp;
        const float* vt = (const float*)v + bh * d * mp;
        Widths::f32[d - 1]((const float*)q + qoff, kt, vt, m, mp, scale, s, out + qoff);
      }
    }
    free(s);
  }
  return failed ? 2 : 0;
}
}
