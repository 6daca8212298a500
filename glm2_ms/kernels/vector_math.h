// Vector helpers shared by the kernels' sources (AVX2 and FMA, 8 floats a vector).
#pragma once
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#include <cmath>
#include <initializer_list>

namespace vm {

inline float hsum(__m256 v) {
  __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  return _mm_cvtss_f32(_mm_add_ss(x, _mm_movehdup_ps(x)));
}

// e^x in 8 lanes, within 2 ulp of expf: x = n ln2 + r with |r| <= ln2/2, e^r by its Taylor polynomial to r^7, times
// 2^n built in the exponent bits. Below -87.3 the result is 0 (no denormals), above 88.7 it is inf, and NaN stays NaN.
inline __m256 exp(__m256 x) {
  const __m256 log2e = _mm256_set1_ps(1.44269504088896341f);
  const __m256 ln2_hi = _mm256_set1_ps(0.693359375f), ln2_lo = _mm256_set1_ps(-2.12194440e-4f);
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, log2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 clamped = _mm256_max_ps(_mm256_min_ps(n, _mm256_set1_ps(128.0f)), _mm256_set1_ps(-127.0f));
  __m256 r = _mm256_fnmadd_ps(clamped, ln2_hi, x);
  r = _mm256_fnmadd_ps(clamped, ln2_lo, r);
  __m256 p = _mm256_set1_ps(1.0f / 5040);
  for (float c : {1.0f / 720, 1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f}) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
  // 2^n as two factors, so that n = 128 (x near 88.7) does not overflow the exponent field before the product
  const __m256i half = _mm256_srai_epi32(_mm256_cvtps_epi32(clamped), 1);
  const __m256i rest = _mm256_sub_epi32(_mm256_cvtps_epi32(clamped), half);
  const __m256 two_a = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(half, _mm256_set1_epi32(127)), 23));
  const __m256 two_b = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(rest, _mm256_set1_epi32(127)), 23));
  __m256 y = _mm256_mul_ps(_mm256_mul_ps(p, two_a), two_b);
  y = _mm256_blendv_ps(y, _mm256_setzero_ps(), _mm256_cmp_ps(x, _mm256_set1_ps(-87.33654f), _CMP_LT_OQ));
  y = _mm256_blendv_ps(y, _mm256_set1_ps(INFINITY), _mm256_cmp_ps(x, _mm256_set1_ps(88.72284f), _CMP_GT_OQ));
  return _mm256_blendv_ps(y, x, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));  // NaN in, NaN out
}

inline float dot(const float *a, const float *b, int64_t n) {
  __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
    s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
  }
  for (; i + 8 <= n; i += 8) s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
  float total = hsum(_mm256_add_ps(s0, s1));
  for (; i < n; ++i) total += a[i] * b[i];
  return total;
}

// A 1-D weight of float32, float16 or bfloat16 (its dtype's kind), read as float32.
inline float weight_at(const void *w, int kind, int64_t i) {  // kind: 0 float32, 1 float16, 2 bfloat16
  if (kind == 0) return static_cast<const float *>(w)[i];
  const uint16_t bits = static_cast<const uint16_t *>(w)[i];
  if (kind == 1) return _cvtsh_ss(bits);
  const uint32_t wide = static_cast<uint32_t>(bits) << 16;
  float f;
  memcpy(&f, &wide, sizeof f);
  return f;
}

inline int weight_kind(const char *dtype) {
  return strcmp(dtype, "float32") == 0 ? 0 : strcmp(dtype, "float16") == 0 ? 1 : strcmp(dtype, "bfloat16") == 0 ? 2 : -1;
}

}  // namespace vm
