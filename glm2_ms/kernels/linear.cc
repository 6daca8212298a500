// y[m, n] = sum_k x[m, k] * w[n, k]: float32 activations against 16-bit or block-quantized weights, float32 arithmetic.
//
// Why: on CPU, MindSpore computes in float32 over 16-bit weights by casting each weight to a float32 copy and then
// running its MatMul, so every decoding step of ChatGLM2-6B writes and reads 25 GB of casts (and a compiled step
// keeps them all); and it has no int8 or int4 matmul at all. Here each weight row is widened in registers or in
// cache, a block of rows at a time, and used at once: a step reads the weights once, as stored. Used for a few
// rows (decoding, a prompt); training keeps MindSpore's MatMul.
//
// Weight formats: float16 or bfloat16 [N, K]; or GGUF's blocks of 32 weights, as uint8 [N, K/32 * bytes]: q8_0 is
// a float16 scale d and 32 int8 q (w = d * q; 34 bytes), q4_0 a float16 scale d and 16 bytes whose byte j holds
// weight j in its low nibble and weight j + 16 in its high one (w = d * (nibble - 8); 18 bytes).
//
// Entry points in MindSpore's "aot" custom-operator form (params: x [M, K] float32, w, y [M, N] float32): Linear,
// exact float32 arithmetic; LinearQ8, over blocks only, the activations quantized to q8_0 first, as llama.cpp
// computes (below).
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#include <cmath>
#include <type_traits>
#include <vector>

#include "vector_math.h"

namespace {

enum Kind { F16, BF16, Q8_0, Q4_0 };

constexpr int64_t kBlock = 512;  // weight elements widened at a time per row: 4 rows of 2 KB float32 stay in L1
constexpr int kCols = 4;         // weight rows (output columns) per pass, each widened once for every row of x
constexpr int kRows = 3;         // rows of x per register tile: 3 x 4 accumulators
// rows of x up to which a quantized weight goes through decoding's passes (Linear: the direct pass, a pair of rows at
// a time, each pair unpacking the blocks anew; LinearQ8: the tiles, in one pass of up to this many rows); a 16-bit
// one always does, its widening being cheaper than the prompt pass's staging
constexpr int64_t kDirectRows = 8;
constexpr int64_t kQK = 32;      // weights per quantized block
// weight rows a decoding thread takes at a time: whichever thread is free takes the next ones, so a thread whose core
// is shared (another process, the checksums of weights still being read) does not hold the step back, as an even
// split would; and a share of rows is contiguous memory long enough to stream
constexpr int64_t kShareRows = 64;

template <Kind K>
constexpr int64_t block_bytes() {
  return K == Q8_0 ? 2 + kQK : 2 + kQK / 2;
}

inline __m256 widen(const uint16_t *w, bool bf16) {
  __m128i bits = _mm_loadu_si128(reinterpret_cast<const __m128i *>(w));
  if (!bf16) return _mm256_cvtph_ps(bits);
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
}

inline float widen1(uint16_t w, bool bf16) {
  if (!bf16) return _cvtsh_ss(w);
  uint32_t bits = static_cast<uint32_t>(w) << 16;
  float f;
  memcpy(&f, &bits, sizeof f);
  return f;
}

inline __m256 ints(__m128i bytes) { return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes)); }

// The 32 integers of a quantized block (before its scale) as 4 vectors of 8 floats, in weight order.
template <Kind K>
inline void block_values(const uint8_t *blk, __m256 v[4]) {
  if constexpr (K == Q8_0) {
    for (int i = 0; i < 4; ++i) v[i] = ints(_mm_loadl_epi64(reinterpret_cast<const __m128i *>(blk + 2 + 8 * i)));
  } else {
    const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i *>(blk + 2));
    const __m128i low4 = _mm_set1_epi8(0x0F), eight = _mm_set1_epi8(8);
    const __m128i lo = _mm_sub_epi8(_mm_and_si128(bytes, low4), eight);
    const __m128i hi = _mm_sub_epi8(_mm_and_si128(_mm_srli_epi16(bytes, 4), low4), eight);
    v[0] = ints(lo), v[1] = ints(_mm_srli_si128(lo, 8)), v[2] = ints(hi), v[3] = ints(_mm_srli_si128(hi, 8));
  }
}

inline uint16_t scale_bits(const uint8_t *blk) {  // a block's float16 scale, as stored
  uint16_t h;
  memcpy(&h, blk, sizeof h);
  return h;
}

inline __m256 block_scale(const uint8_t *blk) {  // in every lane
  return _mm256_cvtph_ps(_mm_set1_epi16(static_cast<int16_t>(scale_bits(blk))));
}

// out[0 .. len) = the weights k0 .. k0 + len of one quantized weight row `r`, as float32 (k0 and len whole
// blocks). 16-bit rows are never staged: they always take the direct pass.
template <Kind K>
void fill(const uint8_t *r, int64_t k0, int64_t len, float *out) {
  static_assert(K == Q8_0 || K == Q4_0);
  for (int64_t b = 0; b < len / kQK; ++b) {
    const uint8_t *blk = r + (k0 / kQK + b) * block_bytes<K>();
    __m256 v[4];
    block_values<K>(blk, v);
    const __m256 d = block_scale(blk);
    for (int i = 0; i < 4; ++i) _mm256_storeu_ps(out + b * kQK + 8 * i, _mm256_mul_ps(v[i], d));
  }
}


// R rows of x (from `x`, stride k) against the kCols widened rows over `len` elements: the sums of the first
// `cols` added to out[r * n + c].
template <int R>
void tile(const float *x, int64_t k, const float (*wide)[kBlock], int64_t len, float *out, int64_t n, int cols) {
  __m256 acc[R][kCols];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < kCols; ++c) acc[r][c] = _mm256_setzero_ps();
  const int64_t vec = len & ~int64_t(7);
  for (int64_t j = 0; j < vec; j += 8) {
    __m256 w[kCols];
    for (int c = 0; c < kCols; ++c) w[c] = _mm256_load_ps(wide[c] + j);
    for (int r = 0; r < R; ++r) {
      const __m256 xv = _mm256_loadu_ps(x + r * k + j);
      for (int c = 0; c < kCols; ++c) acc[r][c] = _mm256_fmadd_ps(xv, w[c], acc[r][c]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < cols; ++c) {
      float s = vm::hsum(acc[r][c]);
      for (int64_t j = vec; j < len; ++j) s += x[r * k + j] * wide[c][j];
      out[r * n + c] += s;
    }
}

// A weight matrix: row i starts at data + i * row_bytes.
struct Weights {
  const uint8_t *data;
  int64_t row_bytes;
  const uint8_t *row(int64_t i) const { return data + i * row_bytes; }
};

// The weights k0 .. k0 + len of output columns n0 .. n0 + cols - 1 (cols <= kCols), widened once, against every
// row of x: their products added to y.
template <Kind K>
void columns(const float *x, Weights w, float *y, int64_t m, int64_t n, int64_t k, int64_t k0, int64_t len,
             int64_t n0, int cols) {
  alignas(32) float wide[kCols][kBlock];
  for (int c = 0; c < kCols; ++c) {
    if (c < cols)
      fill<K>(w.row(n0 + c), k0, len, wide[c]);
    else
      memset(wide[c], 0, sizeof wide[c]);
  }
  int64_t r = 0;
  for (; r + kRows <= m; r += kRows) tile<kRows>(x + r * k + k0, k, wide, len, y + r * n + n0, n, cols);
  if (m - r == 2) tile<2>(x + r * k + k0, k, wide, len, y + r * n + n0, n, cols);
  if (m - r == 1) tile<1>(x + r * k + k0, k, wide, len, y + r * n + n0, n, cols);
}

// One or two rows of x: each weight row is widened straight from memory (or L2, for the next pair of rows) into
// the FMAs, with no staging in L1 (which costs a store and a load per element). A quantized block's
// 32 products are summed before its scale multiplies them.
template <int R, Kind K>
void direct(const float *x, Weights w, float *y, int64_t n, int64_t k, int64_t n0, int cols) {
  const uint8_t *rows[kCols];
  for (int c = 0; c < kCols; ++c) rows[c] = w.row(n0 + (c < cols ? c : 0));
  __m256 acc[R][kCols];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < kCols; ++c) acc[r][c] = _mm256_setzero_ps();
  int64_t vec = k & ~int64_t(7);
  if constexpr (K == F16 || K == BF16) {
    for (int64_t j = 0; j < vec; j += 8) {
      __m256 wv[kCols];
      for (int c = 0; c < kCols; ++c) wv[c] = widen(reinterpret_cast<const uint16_t *>(rows[c]) + j, K == BF16);
      for (int r = 0; r < R; ++r) {
        const __m256 xv = _mm256_loadu_ps(x + r * k + j);
        for (int c = 0; c < kCols; ++c) acc[r][c] = _mm256_fmadd_ps(xv, wv[c], acc[r][c]);
      }
    }
  } else {
    vec = k;
    for (int64_t b = 0; b < k / kQK; ++b) {
      for (int c = 0; c < kCols; ++c) {
        const uint8_t *blk = rows[c] + b * block_bytes<K>();
        __m256 v[4];
        block_values<K>(blk, v);
        const __m256 d = block_scale(blk);
        for (int r = 0; r < R; ++r) {
          const float *xb = x + r * k + b * kQK;
          __m256 t = _mm256_mul_ps(_mm256_loadu_ps(xb), v[0]);
          for (int i = 1; i < 4; ++i) t = _mm256_fmadd_ps(_mm256_loadu_ps(xb + 8 * i), v[i], t);
          acc[r][c] = _mm256_fmadd_ps(t, d, acc[r][c]);
        }
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < cols; ++c) {
      float s = vm::hsum(acc[r][c]);
      for (int64_t j = vec; j < k; ++j)
        s += x[r * k + j] * widen1(reinterpret_cast<const uint16_t *>(rows[c])[j], K == BF16);
      y[r * n + n0 + c] = s;
    }
}

#ifdef __AVX512F__
constexpr int kDecodeCols = 8;  // weight rows a 16-wide decoding pass streams side by side: more rows in flight
                                // read memory faster than 4 (and the registers hold 2 rows of x by 8 accumulators)

// 16 weights of a quantized block (its first or second half) as floats, before the scale.
template <Kind K>
inline __m512 half_values(const uint8_t *blk, int half) {
  if constexpr (K == Q8_0) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i *>(blk + 2 + 16 * half))));
  } else {
    const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i *>(blk + 2));
    const __m128i nibbles = half ? _mm_srli_epi16(bytes, 4) : bytes;
    const __m128i v = _mm_sub_epi8(_mm_and_si128(nibbles, _mm_set1_epi8(0x0F)), _mm_set1_epi8(8));
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(v));
  }
}

// `direct` with 16-wide vectors (chosen when the library is built for AVX-512).
template <int R, Kind K>
void direct512(const float *x, Weights w, float *y, int64_t n, int64_t k, int64_t n0, int cols) {
  const uint8_t *rows[kDecodeCols];
  for (int c = 0; c < kDecodeCols; ++c) rows[c] = w.row(n0 + (c < cols ? c : 0));
  __m512 acc[R][kDecodeCols];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < kDecodeCols; ++c) acc[r][c] = _mm512_setzero_ps();
  int64_t vec = k & ~int64_t(15);
  if constexpr (K == F16 || K == BF16) {
    for (int64_t j = 0; j < vec; j += 16) {
      __m512 wv[kDecodeCols];
      for (int c = 0; c < kDecodeCols; ++c) {
        const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(reinterpret_cast<const uint16_t *>(rows[c]) + j));
        wv[c] = K == BF16 ? _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16)) : _mm512_cvtph_ps(bits);
      }
      for (int r = 0; r < R; ++r) {
        const __m512 xv = _mm512_loadu_ps(x + r * k + j);
        for (int c = 0; c < kDecodeCols; ++c) acc[r][c] = _mm512_fmadd_ps(xv, wv[c], acc[r][c]);
      }
    }
  } else {
    vec = k;
    for (int64_t b = 0; b < k / kQK; ++b) {
      __m512 xv[R][2];
      for (int r = 0; r < R; ++r)
        for (int h = 0; h < 2; ++h) xv[r][h] = _mm512_loadu_ps(x + r * k + b * kQK + 16 * h);
      for (int c = 0; c < kDecodeCols; ++c) {
        const uint8_t *blk = rows[c] + b * block_bytes<K>();
        const __m512 v0 = half_values<K>(blk, 0), v1 = half_values<K>(blk, 1);
        const __m512 d = _mm512_set1_ps(_cvtsh_ss(scale_bits(blk)));
        for (int r = 0; r < R; ++r)
          acc[r][c] = _mm512_fmadd_ps(_mm512_fmadd_ps(xv[r][1], v1, _mm512_mul_ps(xv[r][0], v0)), d, acc[r][c]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < cols; ++c) {
      float s = _mm512_reduce_add_ps(acc[r][c]);
      for (int64_t j = vec; j < k; ++j)
        s += x[r * k + j] * widen1(reinterpret_cast<const uint16_t *>(rows[c])[j], K == BF16);
      y[r * n + n0 + c] = s;
    }
}
#define DIRECT direct512
#else
#define DIRECT direct
constexpr int kDecodeCols = kCols;
#endif

// Decoding (up to kDirectRows rows of x: one request, or a server's batch of them; any number of rows over
// 16-bit weights): the output columns shared among the threads kShareRows at a time, each weight read from memory
// once, the rows of x two at a time over it. A prompt over quantized weights (more rows): a block of kBlock
// weights at a time along k, for every column, so that the rows of x in that block (a few hundred KB) stay in L2
// while every column meets them. Within a block the columns go to whichever thread is free, for kShareRows' reason,
// and each block ends in a barrier, so no two threads add into the same output at once.
template <Kind K>
void linear(const float *x, Weights w, float *y, int64_t m, int64_t n, int64_t k) {
  constexpr bool sixteen_bit = K == F16 || K == BF16;
  if (sixteen_bit || m <= kDirectRows) {
#pragma omp parallel for schedule(dynamic, kShareRows / kDecodeCols)
    for (int64_t n0 = 0; n0 < n; n0 += kDecodeCols) {
      const int cols = n - n0 < kDecodeCols ? static_cast<int>(n - n0) : kDecodeCols;
      for (int64_t r = 0; r < m; r += 2) {  // the second pair on meets these weight rows in L2, not memory
        if (m - r == 1)
          DIRECT<1, K>(x + r * k, w, y + r * n, n, k, n0, cols);
        else
          DIRECT<2, K>(x + r * k, w, y + r * n, n, k, n0, cols);
      }
    }
    return;
  }
  if constexpr (!sixteen_bit) {
    memset(y, 0, sizeof(float) * m * n);
#pragma omp parallel
    for (int64_t k0 = 0; k0 < k; k0 += kBlock) {
      const int64_t len = k - k0 < kBlock ? k - k0 : kBlock;
#pragma omp for schedule(dynamic, 8)
      for (int64_t n0 = 0; n0 < n; n0 += kCols)
        columns<K>(x, w, y, m, n, k, k0, len, n0, n - n0 < kCols ? static_cast<int>(n - n0) : kCols);
    }
  }
}

// ---- Activations in q8_0 blocks (the entry LinearQ8): llama.cpp's arithmetic over q8_0/q4_0 weights. Each row of
// x is quantized as GGUF's q8_0 quantizes (per block of 32: d = max|x| / 127, q = round(x / d) half away from zero,
// d kept as float16), and a block's 32 products are summed in integers; the sum times the two scales is added in
// float32. A weight block then costs a few integer instructions instead of widening 32 weights to float32, which
// is what bounds a quantized step over float32 activations on a CPU of two cores. Not exact: x changes by up to
// half a step of its block (the float32 entry, Linear, is the exact one).
//
// How a kind's blocks meet the activations' bytes in dot_u8s8, which takes unsigned bytes against signed ones: as
// unsigned values u = value + c with c = offset<K>() (q4_0's nibbles as stored, c = 8; q8_0's values + 128), the
// integer sum being Σu·x − c·Σx; or (AVX2 without VNNI, q8_0: its 16-bit pair sums would overflow on values + 128)
// as magnitudes against x with the weights' signs, c = 0.
template <Kind K>
constexpr int32_t offset() {
#ifdef __AVX512VNNI__
  return K == Q4_0 ? 8 : 128;
#else
  return K == Q4_0 ? 8 : 0;
#endif
}

// The m rows of x as q8_0 blocks, with what each block adds for the weights' offset c.
struct Activations {
  int64_t blocks;  // per row of x
  std::vector<int8_t> q;
  std::vector<float> d;           // each block's scale, as its float16 gives it back
  std::vector<int32_t> offsets;   // each block's −c·Σq: what the weights' offset c adds to its integer sum

  Activations(const float *x, int64_t m, int64_t k, int32_t c)
      : blocks(k / kQK), q(m * k), d(m * blocks), offsets(m * blocks) {
#pragma omp parallel for schedule(static) if (m > 1)
    for (int64_t i = 0; i < m * blocks; ++i) quantize(x + i * kQK, i, c);
  }

  // One block, in 8-float vectors: q = round(v / d) half away from zero, as trunc(t) + sign(t) where the part cut
  // off is at least a half (t − trunc(t) is exact in float32), which is std::round's result.
  void quantize(const float *v, int64_t i, int32_t c) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 x[4], amax8 = _mm256_setzero_ps(), finite8 = _mm256_castsi256_ps(_mm256_set1_epi32(-1));
    for (int j = 0; j < 4; ++j) {
      x[j] = _mm256_loadu_ps(v + 8 * j);
      const __m256 a = _mm256_andnot_ps(sign, x[j]);
      finite8 = _mm256_and_ps(finite8, _mm256_cmp_ps(a, _mm256_set1_ps(INFINITY), _CMP_LT_OQ));
      amax8 = _mm256_max_ps(amax8, a);
    }
    if (_mm256_movemask_ps(finite8) != 0xFF) {  // a NaN or inf stays one in y
      memset(q.data() + i * kQK, 0, kQK);
      d[i] = NAN, offsets[i] = 0;
      return;
    }
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(amax8), _mm256_extractf128_ps(amax8, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    const float amax = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
    const float scale = amax / 127.0f, inverse = scale != 0.0f ? 1.0f / scale : 0.0f;
    __m256i ints[4], sum = _mm256_setzero_si256();
    for (int j = 0; j < 4; ++j) {
      const __m256 t = _mm256_mul_ps(x[j], _mm256_set1_ps(inverse));
      const __m256 whole = _mm256_round_ps(t, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
      const __m256 half_up = _mm256_cmp_ps(_mm256_andnot_ps(sign, _mm256_sub_ps(t, whole)), _mm256_set1_ps(0.5f),
                                           _CMP_GE_OQ);
      const __m256 step = _mm256_and_ps(half_up, _mm256_or_ps(_mm256_and_ps(t, sign), _mm256_set1_ps(1.0f)));
      ints[j] = _mm256_cvttps_epi32(_mm256_add_ps(whole, step));
      sum = _mm256_add_epi32(sum, ints[j]);
    }
    // 32 int32 → 32 int8 in order: the packs interleave 128-bit lanes, which the permutation undoes
    const __m256i bytes = _mm256_permutevar8x32_epi32(
        _mm256_packs_epi16(_mm256_packs_epi32(ints[0], ints[1]), _mm256_packs_epi32(ints[2], ints[3])),
        _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256(reinterpret_cast<__m256i *>(q.data() + i * kQK), bytes);
    __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, _MM_SHUFFLE(1, 0, 3, 2)));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, _MM_SHUFFLE(2, 3, 0, 1)));
    d[i] = _cvtsh_ss(_cvtss_sh(scale, _MM_FROUND_TO_NEAREST_INT));
    offsets[i] = -c * _mm_cvtsi128_si32(s4);
  }
};

// u8 × s8 products summed four at a time into int32 lanes, added to acc.
inline __m256i dot_u8s8(__m256i acc, __m256i u, __m256i s) {
#ifdef __AVX512VNNI__
  return _mm256_dpbusd_epi32(acc, u, s);
#else  // maddubs sums pairs in 16 bits: offset<K>() keeps a pair's sum within them (2 · 128 · 127 at most)
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
#endif
}

// A block's 32 weights as dot_u8s8's unsigned bytes, in weight order (offset<K>()): q4_0's 16 bytes in both halves,
// the high half shifted by 4, masked to nibbles; q8_0's values + 128, or their magnitudes.
template <Kind K>
inline __m256i unsigned_values(const uint8_t *blk) {
  if constexpr (K == Q4_0) {
    const __m256i bytes = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i *>(blk + 2)));
    return _mm256_and_si256(_mm256_srlv_epi64(bytes, _mm256_setr_epi64x(0, 0, 4, 4)), _mm256_set1_epi8(0x0F));
  } else {
    const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(blk + 2));
    return offset<K>() ? _mm256_xor_si256(w, _mm256_set1_epi8(-128)) : _mm256_abs_epi8(w);
  }
}

// The block's integer dot with one block of the activations: int32 lanes whose sum it is, each lane its own 4
// products Σ (u − c)·x, the c·Σx of its 4 values taken off in integers (not −c·Σq in one lane: two large sums that
// cancel only once they are floats would round).
template <Kind K>
inline __m256i block_dot(const uint8_t *blk, __m256i u, const int8_t *xq) {
  __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(xq));
  if constexpr (offset<K>() == 0) {
    x = _mm256_sign_epi8(x, _mm256_loadu_si256(reinterpret_cast<const __m256i *>(blk + 2)));
    return dot_u8s8(_mm256_setzero_si256(), u, x);
  } else {
    const __m256i c = _mm256_set1_epi8(static_cast<char>(offset<K>()));
    return _mm256_sub_epi32(dot_u8s8(_mm256_setzero_si256(), u, x), dot_u8s8(_mm256_setzero_si256(), c, x));
  }
}

// Blocks 0 .. blocks - 1 given in turn to add(b, sums): the even ones with `even`, the odd ones with `odd` (two
// independent chains). Every one-row pass sums in this order, so an output's bits do not depend on the pass that
// computed it; and the sums' indices are known when compiled, so they stay in registers.
template <class Sums, class Add>
__attribute__((always_inline)) inline void in_two_sums(int64_t blocks, Sums &even, Sums &odd, Add add) {
  int64_t b = 0;
  for (; b + 2 <= blocks; b += 2) add(b, even), add(b + 1, odd);
  if (b < blocks) add(b, even);
}

// One weight row against R rows of the activations from r0: each block unpacked once for the R rows.
template <Kind K, int R>
void dot_rows(const uint8_t *w, const Activations &a, int64_t r0, float *y, int64_t n) {
  __m256 even[R], odd[R];
  for (int r = 0; r < R; ++r) even[r] = odd[r] = _mm256_setzero_ps();
  in_two_sums(a.blocks, even, odd, [&](int64_t b, __m256 (&acc)[R]) __attribute__((always_inline)) {
    const uint8_t *blk = w + b * block_bytes<K>();
    const __m256 dw = block_scale(blk);
    const __m256i u = unsigned_values<K>(blk);
    for (int r = 0; r < R; ++r) {
      const int64_t at = (r0 + r) * a.blocks + b;
      const __m256 sums = _mm256_cvtepi32_ps(block_dot<K>(blk, u, a.q.data() + at * kQK));
      acc[r] = _mm256_fmadd_ps(sums, _mm256_mul_ps(dw, _mm256_set1_ps(a.d[at])), acc[r]);
    }
  });
  for (int r = 0; r < R; ++r) y[r * n] = vm::hsum(_mm256_add_ps(even[r], odd[r]));
}

// Every float16 as a float32, indexed by its bits: a block's scale read from memory rather than converted. Where
// 256-bit operations issue as two halves, the conversion shares its unit with the int32 → float32 conversion every
// block needs, and the two bound the arithmetic of q8_0's decoding row (benchmarks/kernel_ab.py).
const float *halves() {
  static const std::vector<float> table = [] {
    std::vector<float> t(1 << 16);
    for (size_t bits = 0; bits < t.size(); ++bits) t[bits] = _cvtsh_ss(static_cast<uint16_t>(bits));
    return t;
  }();
  return table.data();
}

// Asks for bytes of weights to be brought into cache (a prefetch never faults). A decoding pass over S weight rows
// at a time reads them as S interleaved streams of a few KB, each too short for the hardware prefetcher to get
// ahead of; the S rows after them are one contiguous stretch, which it reads at the memory's pace when asked for in
// order. So block b of the S rows asks for block b's share of the next S rows, which start at `ahead` (`share`:
// S blocks' bytes). The builtin, not _mm_prefetch: g++ dropped the intrinsic's prefetches from these loops.
inline void read_ahead(const uint8_t *ahead, int64_t b, int64_t share) {
  const uint8_t *at = ahead + b * share;
  for (int64_t o = 0; o < share; o += 64) __builtin_prefetch(at + o, 0, 2);  // a read, kept in L2 (_MM_HINT_T1)
}

// S weight rows from i against one row of the activations, each as dot_rows<K, 1> sums it (the same sums, the same
// scale products, the same result): 2·S independent sums, while the S rows at `ahead` are read in (read_ahead).
// q8_0's decoding row, 8 weight rows at a time.
template <Kind K, int S>
void dot_weight_rows(Weights w, int64_t i, const uint8_t *ahead, const Activations &a, float *y) {
  const float *half = halves();
  __m256 even[S], odd[S];
  for (int j = 0; j < S; ++j) even[j] = odd[j] = _mm256_setzero_ps();
  in_two_sums(a.blocks, even, odd, [&](int64_t b, __m256 (&acc)[S]) __attribute__((always_inline)) {
    read_ahead(ahead, b, S * block_bytes<K>());
    const int8_t *xq = a.q.data() + b * kQK;
    for (int j = 0; j < S; ++j) {
      const uint8_t *blk = w.row(i + j) + b * block_bytes<K>();
      const __m256 sums = _mm256_cvtepi32_ps(block_dot<K>(blk, unsigned_values<K>(blk), xq));
      acc[j] = _mm256_fmadd_ps(sums, _mm256_set1_ps(half[scale_bits(blk)] * a.d[b]), acc[j]);
    }
  });
  for (int j = 0; j < S; ++j) y[i + j] = vm::hsum(_mm256_add_ps(even[j], odd[j]));
}

// ---- A prompt's rows over q8_0 weights (more than kDirectRows; q4_0 from kQ4LaidOutRows), with activations in q8_0: 8
// weight rows at a time are laid out lane by lane (lane j: 4 consecutive values of row j, as unsigned bytes), a chunk
// of blocks at a time, so that one integer multiply-add of 4 broadcast activation bytes advances all 8 outputs, and a
// block's scales are applied to the 8 outputs at once: about 1.5 instructions per block and row of x, where a row at a
// time spends 5 (llama.cpp repacks its weights the same way, once, into memory of its own; here a chunk is laid out in
// L1 and used for every row of the prompt before the next). Where q8_0's values are not offset (offset<K>() == 0: AVX2
// without VNNI), the tile keeps them signed, and each product is their magnitude against the activation bytes given
// their signs (a pair of them then stays within maddubs' 16 bits: 2 · 128 · 127).
constexpr int kTile = 8;          // weight rows (output columns) per tile: the 8 lanes of a vector
constexpr int64_t kChunk = 32;    // blocks per laid-out chunk: 8 KB of values and 1 KB of scales stay in L1

// v[j] = the 8 dwords of row j; afterwards v[g] = dword g of rows 0..7.
inline void transpose8(__m256i v[8]) {
  __m256i t[8], u[8];
  for (int i = 0; i < 8; i += 2) {  // per 128-bit half: dwords 0, 1 (then 2, 3) of rows i and i + 1, interleaved
    t[i] = _mm256_unpacklo_epi32(v[i], v[i + 1]);
    t[i + 1] = _mm256_unpackhi_epi32(v[i], v[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {  // per half: one dword of 4 rows; u[i + g] holds dwords g and g + 4
    u[i] = _mm256_unpacklo_epi64(t[i], t[i + 2]);
    u[i + 1] = _mm256_unpackhi_epi64(t[i], t[i + 2]);
    u[i + 2] = _mm256_unpacklo_epi64(t[i + 1], t[i + 3]);
    u[i + 3] = _mm256_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int g = 0; g < 4; ++g) {  // rows 0-3 and 4-7 side by side
    v[g] = _mm256_permute2x128_si256(u[g], u[g + 4], 0x20);
    v[g + 4] = _mm256_permute2x128_si256(u[g], u[g + 4], 0x31);
  }
}

// A chunk of blocks of 8 weight rows, laid out: values[b][g] holds dword g of block b of each row, one per lane;
// scales[b] the 8 rows' scales of block b.
struct Tile {
  alignas(32) int32_t values[kChunk][8][kTile];
  alignas(32) float scales[kChunk][kTile];

  template <Kind K>
  void lay_out(Weights w, int64_t n0, int cols, int64_t b0, int64_t blocks) {
    for (int64_t b = 0; b < blocks; ++b) {
      __m256i v[8];
      for (int j = 0; j < kTile; ++j) {
        const uint8_t *blk = w.row(n0 + (j < cols ? j : 0)) + (b0 + b) * block_bytes<K>();
        scales[b][j] = _cvtsh_ss(scale_bits(blk));
        v[j] = offset<K>() > 0 ? unsigned_values<K>(blk)
                               : _mm256_loadu_si256(reinterpret_cast<const __m256i *>(blk + 2));
      }
      transpose8(v);
      for (int g = 0; g < 8; ++g) _mm256_store_si256(reinterpret_cast<__m256i *>(values[b][g]), v[g]);
    }
  }
};

// The activation bytes `x` as they meet the tile's values `w`: as they are against unsigned values, with w's signs
// against magnitudes.
template <Kind K>
inline __m256i signed_like(__m256i x, __m256i w) {
  return offset<K>() > 0 ? x : _mm256_sign_epi8(x, w);
}

// The 8 outputs of one row of x over the tile's blocks: the lanes' integer sums per block, scaled and added to acc.
template <Kind K, int R>
inline void tile_rows(const Tile &t, const Activations &a, int64_t r0, int64_t b0, int64_t blocks, __m256 acc[R]) {
  for (int64_t b = 0; b < blocks; ++b) {
    __m256i even[R], odd[R];
    for (int r = 0; r < R; ++r) {
      even[r] = _mm256_set1_epi32(a.offsets[(r0 + r) * a.blocks + b0 + b]);
      odd[r] = _mm256_setzero_si256();
    }
    for (int g = 0; g < 8; g += 2) {
      const __m256i w0 = _mm256_load_si256(reinterpret_cast<const __m256i *>(t.values[b][g]));
      const __m256i w1 = _mm256_load_si256(reinterpret_cast<const __m256i *>(t.values[b][g + 1]));
      const __m256i u0 = offset<K>() > 0 ? w0 : _mm256_abs_epi8(w0), u1 = offset<K>() > 0 ? w1 : _mm256_abs_epi8(w1);
      for (int r = 0; r < R; ++r) {
        const int32_t *xq = reinterpret_cast<const int32_t *>(a.q.data() + ((r0 + r) * a.blocks + b0 + b) * kQK);
        even[r] = dot_u8s8(even[r], u0, signed_like<K>(_mm256_set1_epi32(xq[g]), w0));
        odd[r] = dot_u8s8(odd[r], u1, signed_like<K>(_mm256_set1_epi32(xq[g + 1]), w1));
      }
    }
    const __m256 dw = _mm256_load_ps(t.scales[b]);
    for (int r = 0; r < R; ++r) {
      const __m256 sums = _mm256_cvtepi32_ps(_mm256_add_epi32(even[r], odd[r]));
      acc[r] = _mm256_fmadd_ps(sums, _mm256_mul_ps(dw, _mm256_set1_ps(a.d[(r0 + r) * a.blocks + b0 + b])), acc[r]);
    }
  }
}

template <Kind K, int R>
inline void add_rows(const Tile &t, const Activations &a, int64_t r0, int64_t b0, int64_t blocks, float *y,
                     int64_t n, int cols) {
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  tile_rows<K, R>(t, a, r0, b0, blocks, acc);
  for (int r = 0; r < R; ++r) {
    float *out = y + (r0 + r) * n;
    if (cols == kTile) {
      _mm256_storeu_ps(out, _mm256_add_ps(_mm256_loadu_ps(out), acc[r]));
    } else {
      alignas(32) float lanes[kTile];
      _mm256_store_ps(lanes, acc[r]);
      for (int j = 0; j < cols; ++j) out[j] += lanes[j];
    }
  }
}

// A decoding step's rows of x over q4_0 weights (and a prompt's below kQ4LaidOutRows, 8 rows of x at a time), 8 weight
// rows at a time, one per lane: each block's 16 nibble bytes of the 8 rows are loaded (rows j and j + 4 in the two halves of
// a vector) and turned, by a 4 × 4 transpose of dwords in each half, into 4 vectors whose lane j holds bytes 4g ..
// 4g + 3 of row j; their low nibbles are weights 4g .. 4g + 3 and their high ones 16 + 4g .., each met by 4 broadcast
// activation bytes in one integer multiply-add. A block's activation scale, its −c·Σx, the weight scales' conversion
// and the one to float then serve 8 rows at once: about half the instructions of a row at a time (dot_rows), which is
// what bounds q4_0 on two cores; and the transposition, the masks and the scales serve every row of x in a batch. (The
// 8 weight scales are put together from scalar loads in integer registers, which leave the vector units to the rest: a
// gather of them was slower than the rest of the block, and inserting them one by one into a vector took the vector
// units' time.)
inline void q4_transposed(const uint8_t *const rows[kTile], int64_t at, __m256i p[4]) {
  __m256i v[4], t[4];
  for (int j = 0; j < 4; ++j)
    v[j] = _mm256_loadu2_m128i(reinterpret_cast<const __m128i *>(rows[j + 4] + at),
                               reinterpret_cast<const __m128i *>(rows[j] + at));
  t[0] = _mm256_unpacklo_epi32(v[0], v[1]), t[1] = _mm256_unpackhi_epi32(v[0], v[1]);
  t[2] = _mm256_unpacklo_epi32(v[2], v[3]), t[3] = _mm256_unpackhi_epi32(v[2], v[3]);
  p[0] = _mm256_unpacklo_epi64(t[0], t[2]), p[1] = _mm256_unpackhi_epi64(t[0], t[2]);
  p[2] = _mm256_unpacklo_epi64(t[1], t[3]), p[3] = _mm256_unpackhi_epi64(t[1], t[3]);
}

// Block b of y[n0 .. n0 + 8) of R rows of x from r0, each added to its acc: the transposed nibbles `p`, their masks and
// the 8 weight scales made once for the R rows. A row's lane sums Σ (u − 8)·x start from its −8·Σx. With VNNI each lane
// adds its 4 products into 32 bits in one instruction; without, the 8 pair sums of maddubs add up in 16 bits (each at
// most 2 · 15 · 127 in magnitude, 8 of them within int16) and are widened once: fewer instructions than a widening per
// dword group. Both give the same integers, so a row's result is the same in either build; nor does it depend on R.
template <int R>
__attribute__((always_inline)) inline void q4_block(const uint8_t *const rows[kTile], const Activations &a, int64_t r0,
                                                    int64_t b, __m256 (&acc)[R]) {
  const int64_t at = b * block_bytes<Q4_0>();
  __m256i p[4];
  q4_transposed(rows, at + 2, p);
  const __m256i nibbles = _mm256_set1_epi8(0x0F);
  __m256i dots[R];
  for (int r = 0; r < R; ++r) dots[r] = _mm256_setzero_si256();
  for (int g = 0; g < 4; ++g) {
    const __m256i low = _mm256_and_si256(p[g], nibbles), high = _mm256_and_si256(_mm256_srli_epi16(p[g], 4), nibbles);
    for (int r = 0; r < R; ++r) {
      const int32_t *xq = reinterpret_cast<const int32_t *>(a.q.data() + ((r0 + r) * a.blocks + b) * kQK);
#ifdef __AVX512VNNI__  // the 4 products of a lane added into its 32 bits in one instruction
      dots[r] = _mm256_dpbusd_epi32(dots[r], low, _mm256_set1_epi32(xq[g]));
      dots[r] = _mm256_dpbusd_epi32(dots[r], high, _mm256_set1_epi32(xq[g + 4]));
#else
      dots[r] = _mm256_add_epi16(dots[r], _mm256_maddubs_epi16(low, _mm256_set1_epi32(xq[g])));
      dots[r] = _mm256_add_epi16(dots[r], _mm256_maddubs_epi16(high, _mm256_set1_epi32(xq[g + 4])));
#endif
    }
  }
  uint64_t low = 0, high = 0;
  for (int j = 0; j < 4; ++j) {
    low |= uint64_t{scale_bits(rows[j] + at)} << (16 * j);
    high |= uint64_t{scale_bits(rows[j + 4] + at)} << (16 * j);
  }
  const __m256 dw = _mm256_cvtph_ps(_mm_unpacklo_epi64(_mm_cvtsi64_si128(low), _mm_cvtsi64_si128(high)));
  for (int r = 0; r < R; ++r) {
    const int64_t x_at = (r0 + r) * a.blocks + b;
#ifdef __AVX512VNNI__
    const __m256i sums = _mm256_add_epi32(_mm256_set1_epi32(a.offsets[x_at]), dots[r]);
#else
    const __m256i sums =
        _mm256_add_epi32(_mm256_set1_epi32(a.offsets[x_at]), _mm256_madd_epi16(dots[r], _mm256_set1_epi16(1)));
#endif
    acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), _mm256_mul_ps(dw, _mm256_set1_ps(a.d[x_at])), acc[r]);
  }
}

// y[n0 .. n0 + 8) of R rows of x from r0 (y: row r0's outputs, rows n apart), while the 8 rows at `ahead` are read
// in (read_ahead).
template <int R>
inline void q4_tile(Weights w, const Activations &a, int64_t r0, int64_t n0, const uint8_t *ahead, float *y,
                    int64_t n) {
  const uint8_t *rows[kTile];
  for (int j = 0; j < kTile; ++j) rows[j] = w.row(n0 + j);
  __m256 even[R], odd[R];
  for (int r = 0; r < R; ++r) even[r] = odd[r] = _mm256_setzero_ps();
  in_two_sums(a.blocks, even, odd, [&](int64_t b, __m256 (&acc)[R]) __attribute__((always_inline)) {
    read_ahead(ahead, b, kTile * block_bytes<Q4_0>());
    q4_block<R>(rows, a, r0, b, acc);
  });
  for (int r = 0; r < R; ++r) _mm256_storeu_ps(y + r * n + n0, _mm256_add_ps(even[r], odd[r]));
}

// f(std::integral_constant<int, m>()) for m in 1 .. kDirectRows: a batch's rows in one pass whose count is known
// when compiled (q4_tile: one pass over 6 rows is faster than one over 4 and another over 2).
template <class F>
inline void as_constant(int64_t m, F f) {
  static_assert(kDirectRows == 8);
  switch (m) {
    case 1: return f(std::integral_constant<int, 1>());
    case 2: return f(std::integral_constant<int, 2>());
    case 3: return f(std::integral_constant<int, 3>());
    case 4: return f(std::integral_constant<int, 4>());
    case 5: return f(std::integral_constant<int, 5>());
    case 6: return f(std::integral_constant<int, 6>());
    case 7: return f(std::integral_constant<int, 7>());
    default: return f(std::integral_constant<int, 8>());
  }
}

// Rows 0 .. m of x in groups of 4, then 2, then 1: f(r0, std::integral_constant<int, R>()) for each group.
template <class F>
inline void in_groups(int64_t m, F f) {
  int64_t r = 0;
  for (; r + 4 <= m; r += 4) f(r, std::integral_constant<int, 4>());
  for (; r + 2 <= m; r += 2) f(r, std::integral_constant<int, 2>());
  if (r < m) f(r, std::integral_constant<int, 1>());
}

template <Kind K>
void prompt_q8(const Activations &a, Weights w, float *y, int64_t m, int64_t n) {
  memset(y, 0, sizeof(float) * m * n);
#pragma omp parallel
  {
    Tile t;
#pragma omp for schedule(dynamic, 4)
    for (int64_t n0 = 0; n0 < n; n0 += kTile) {
      const int cols = n - n0 < kTile ? static_cast<int>(n - n0) : kTile;
      for (int64_t b0 = 0; b0 < a.blocks; b0 += kChunk) {
        const int64_t blocks = a.blocks - b0 < kChunk ? a.blocks - b0 : kChunk;
        t.lay_out<K>(w, n0, cols, b0, blocks);
        int64_t r = 0;
        for (; r + 4 <= m; r += 4) add_rows<K, 4>(t, a, r, b0, blocks, y + n0, n, cols);
        for (; r < m; ++r) add_rows<K, 1>(t, a, r, b0, blocks, y + n0, n, cols);
      }
    }
  }
}

// The fewest rows of a prompt over q4_0 that take the laid-out pass rather than decoding's tiles, 8 rows of x at a
// time. The tiles cost the same per row at any length; the laid-out pass lays each chunk out once for all the rows,
// so it costs less per row the more there are (benchmarks/kernel_ab.py --rows). With AVX2 the tiles took less time
// at every length measured: they add maddubs' pairs in 16 bits where the laid-out pass widens each group of 4 to 32.
// With VNNI both add 4 products in one instruction, and the laid-out pass caught up between 96 and 128 rows.
#ifdef __AVX512VNNI__
constexpr int64_t kQ4LaidOutRows = 128;
#else
constexpr int64_t kQ4LaidOutRows = INT64_MAX;
#endif

template <Kind K>
void linear_q8(const float *x, Weights w, float *y, int64_t m, int64_t n, int64_t k) {
  const Activations a(x, m, k, offset<K>());
  if (m >= (K == Q8_0 ? kDirectRows + 1 : kQ4LaidOutRows)) return prompt_q8<K>(a, w, y, m, n);
  // kTile weight rows at a time, read once for every row of x (q4_0 transposed in a tile, over up to 8 rows of x at
  // a time; q8_0's one row 8 weight rows side by side, more rows each weight row in turn), the rest one by one: a
  // row's outputs have the same bits alone as among others (a batch; over q4_0 in tiles, a prompt too)
  const int64_t whole = n - n % kTile;
#pragma omp parallel for schedule(dynamic, kShareRows / kTile)
  for (int64_t n0 = 0; n0 < n; n0 += kTile) {
    // the next tile's rows, read in while this one computes; the last tile's own, so as not to read past w
    const uint8_t *ahead = w.row(n0 + kTile < whole ? n0 + kTile : n0);
    if constexpr (K == Q4_0) {
      if (n0 < whole) {
        for (int64_t r0 = 0; r0 < m; r0 += kDirectRows)
          as_constant(m - r0 < kDirectRows ? m - r0 : kDirectRows, [&](auto rows) {
            q4_tile<decltype(rows)::value>(w, a, r0, n0, ahead, y + r0 * n, n);
          });
        continue;
      }
    } else if (m == 1 && n0 < whole) {
      dot_weight_rows<K, kTile>(w, n0, ahead, a, y);
      continue;
    }
    for (int64_t i = n0; i < n && i < n0 + kTile; ++i)
      in_groups(m, [&](int64_t r, auto rows) {
        dot_rows<K, decltype(rows)::value>(w.row(i), a, r, y + r * n + i, n);
      });
  }
}

// The weight format of w's dtype and row length; -1 when it is none of them.
int kind_of(const char *dtype, int64_t row, int64_t k) {
  if (strcmp(dtype, "float16") == 0) return row == k ? F16 : -1;
  if (strcmp(dtype, "bfloat16") == 0) return row == k ? BF16 : -1;
  if (strcmp(dtype, "uint8") != 0 || k % kQK != 0) return -1;
  if (row == k / kQK * block_bytes<Q8_0>()) return Q8_0;
  if (row == k / kQK * block_bytes<Q4_0>()) return Q4_0;
  return -1;
}

// y[i] = the weights of row ids[i], dequantized (an embedding lookup in blocks): false for an id out of range.
template <Kind K>
bool embed(const int32_t *ids, int64_t count, Weights w, int64_t vocab, int64_t h, float *y) {
  bool ok = true;
#pragma omp parallel for schedule(static) reduction(&& : ok)
  for (int64_t i = 0; i < count; ++i) {
    if (ids[i] < 0 || ids[i] >= vocab) {
      ok = false;
      continue;
    }
    fill<K>(w.row(ids[i]), 0, h, y + i * h);
  }
  return ok;
}

template <Kind K>
int embed_entry(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes) {
  if (nparam != 3 || ndims[1] != 2 || ndims[2] != ndims[0] + 1) return 1;
  if (strcmp(dtypes[0], "int32") != 0 || strcmp(dtypes[1], "uint8") != 0 || strcmp(dtypes[2], "float32") != 0)
    return 2;
  int64_t count = 1;
  for (int d = 0; d < ndims[0]; ++d) count *= shapes[0][d];
  const int64_t h = shapes[2][ndims[2] - 1], vocab = shapes[1][0];
  if (h % kQK != 0 || shapes[1][1] != h / kQK * block_bytes<K>()) return 3;
  const Weights w{static_cast<const uint8_t *>(params[1]), shapes[1][1]};
  return embed<K>(static_cast<const int32_t *>(params[0]), count, w, vocab, h, static_cast<float *>(params[2])) ? 0 : 5;
}

}  // namespace

// The embedding lookup of ids [...] int32 in blocks [vocab, row bytes] uint8, giving y [..., hidden] float32.
extern "C" int EmbedQ8_0(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *stream,
                         void *extra) {
  (void)stream, (void)extra;
  return embed_entry<Q8_0>(nparam, params, ndims, shapes, dtypes);
}

extern "C" int EmbedQ4_0(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *stream,
                         void *extra) {
  (void)stream, (void)extra;
  return embed_entry<Q4_0>(nparam, params, ndims, shapes, dtypes);
}

namespace {

// The operands of a Linear call, checked: 0, or the error code MindSpore is given.
struct Call {
  const float *x;
  Weights w;
  float *y;
  int64_t m, n, k;
  int kind;

  int parse(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes) {
    if (nparam != 3 || ndims[0] != 2 || ndims[1] != 2 || ndims[2] != 2) return 1;
    if (strcmp(dtypes[0], "float32") != 0 || strcmp(dtypes[2], "float32") != 0) return 2;
    m = shapes[0][0], k = shapes[0][1], n = shapes[1][0];
    const int64_t row = shapes[1][1];
    if (shapes[2][0] != m || shapes[2][1] != n) return 4;
    kind = kind_of(dtypes[1], row, k);
    x = static_cast<const float *>(params[0]);
    w = Weights{static_cast<const uint8_t *>(params[1]), strcmp(dtypes[1], "uint8") == 0 ? row : 2 * row};
    y = static_cast<float *>(params[2]);
    return kind < 0 ? 3 : 0;
  }
};

}  // namespace

// y [m, n] = x [m, k] float32 · w [n, k]ᵀ in float32 arithmetic, w float16, bfloat16 or q8_0/q4_0 blocks.
extern "C" int Linear(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *stream,
                      void *extra) {
  (void)stream, (void)extra;
  Call c;
  if (const int error = c.parse(nparam, params, ndims, shapes, dtypes)) return error;
  switch (c.kind) {
    case F16: linear<F16>(c.x, c.w, c.y, c.m, c.n, c.k); return 0;
    case BF16: linear<BF16>(c.x, c.w, c.y, c.m, c.n, c.k); return 0;
    case Q8_0: linear<Q8_0>(c.x, c.w, c.y, c.m, c.n, c.k); return 0;
    default: linear<Q4_0>(c.x, c.w, c.y, c.m, c.n, c.k); return 0;
  }
}

// The same product with x quantized to q8_0 blocks first (linear_q8): w in q8_0 or q4_0 blocks only.
extern "C" int LinearQ8(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *stream,
                        void *extra) {
  (void)stream, (void)extra;
  Call c;
  if (const int error = c.parse(nparam, params, ndims, shapes, dtypes)) return error;
  switch (c.kind) {
    case Q8_0: linear_q8<Q8_0>(c.x, c.w, c.y, c.m, c.n, c.k); return 0;
    case Q4_0: linear_q8<Q4_0>(c.x, c.w, c.y, c.m, c.n, c.k); return 0;
    default: return 3;
  }
}
