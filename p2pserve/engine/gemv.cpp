// The CPU decode GEMVs of p2pserve/engine/kernels.py (compiled on first use by torch's
// cpp_extension with -march=native; kernels.py binds `gemv`, `gemv_int8`, `gemv_int4`, `isa`).
//
// Which instructions a loop uses is decided by what the compiler may emit for the CPU it
// is built on: AVX-512, else AVX2 + FMA, else plain C++ the compiler vectorises as it can.
// kernels.py builds one copy per CPU (its cache name includes the CPU's flags), so the
// choice is made on, and for, the machine that runs it.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#include <string>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define P2P_AVX2 1
#if defined(__AVX512F__)
#define P2P_AVX512 1
#endif
#endif

std::string isa() {
#if defined(P2P_AVX512)
  return "avx512";
#elif defined(P2P_AVX2)
  return "avx2";
#else
  return "portable";
#endif
}

#if defined(P2P_AVX2)
static inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#endif

static void check_x(const torch::Tensor& x, int64_t in) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous() && x.size(1) == in,
              "x: [M, in] fp32 contiguous");
  TORCH_CHECK(x.size(0) >= 1, "at least one row");
}

// Every row of X against every output row o of a weight, `tile` rows of X at a time: a
// weight row stays in L1 while all of X passes over it, so a prefill chunk reads the
// weights from memory once too. `fn(m, n, o)` computes output row o for X's rows m..m+n.
template <class RowFn>
static void over_rows(int64_t M, int64_t out, int64_t tile, RowFn fn) {
  at::parallel_for(0, out, 16, [&](int64_t b, int64_t e) {
    for (int64_t o = b; o < e; ++o)
      for (int64_t m = 0; m < M; m += tile) fn(m, std::min(tile, M - m), o);
  });
}

// ---------------------------------------------------------------------------- fp32
// Y[m, o] = sum_i X[m, i] * W[o, i] for rows o in [o0, o1); X fp32 [M, in], Y fp32 [M, out].
template <int M>
static void rows(const float* X, const float* W, float* Y, int64_t in, int64_t out, int64_t o0, int64_t o1) {
  for (int64_t o = o0; o < o1; ++o) {
    const float* w = W + o * in;
    float s[M];
    int64_t i = 0;
#if defined(P2P_AVX2)
    __m256 a0[M], a1[M];
    for (int m = 0; m < M; ++m) { a0[m] = _mm256_setzero_ps(); a1[m] = _mm256_setzero_ps(); }
    for (; i + 16 <= in; i += 16) {
      __m256 w0 = _mm256_loadu_ps(w + i), w1 = _mm256_loadu_ps(w + i + 8);
      for (int m = 0; m < M; ++m) {
        a0[m] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(X + m * in + i), a0[m]);
        a1[m] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(X + m * in + i + 8), a1[m]);
      }
    }
    for (int m = 0; m < M; ++m) s[m] = hsum(_mm256_add_ps(a0[m], a1[m]));
#else
    for (int m = 0; m < M; ++m) s[m] = 0.f;
#endif
    for (int m = 0; m < M; ++m) {
      for (int64_t j = i; j < in; ++j) s[m] += X[m * in + j] * w[j];
      Y[m * out + o] = s[m];
    }
  }
}

// x [M, in] fp32 contiguous, w [out, in] fp32 contiguous -> [M, out] fp32
torch::Tensor gemv(torch::Tensor x, torch::Tensor w) {
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && w.scalar_type() == at::kFloat, "w: [out, in] fp32");
  check_x(x, w.size(1));
  TORCH_CHECK(x.size(0) <= 4, "1 to 4 rows");
  const int64_t M = x.size(0), in = w.size(1), out = w.size(0);
  auto y = torch::empty({M, out}, x.options());
  const float* X = x.data_ptr<float>();
  const float* W = w.data_ptr<float>();
  float* Y = y.data_ptr<float>();
  at::parallel_for(0, out, 16, [&](int64_t b, int64_t e) {
    switch (M) {
      case 1: rows<1>(X, W, Y, in, out, b, e); break;
      case 2: rows<2>(X, W, Y, in, out, b, e); break;
      case 3: rows<3>(X, W, Y, in, out, b, e); break;
      default: rows<4>(X, W, Y, in, out, b, e); break;
    }
  });
  return y;
}

// ---------------------------------------------------------------------------- int8
// One output row o of an int8 weight with a scale per group of `gs` inputs (gs = in: one
// per row): each 16 (or 8) bytes are widened in registers and multiplied by their scale,
// so the step streams a quarter of fp32's bytes and no dequantized copy exists.
template <int M>
static void row_int8(const float* X, const int8_t* w, const float* s, float* Y, int64_t in, int64_t gs,
                     int64_t out, int64_t o) {
  float r[M];
  for (int m = 0; m < M; ++m) r[m] = 0.f;
  for (int64_t g0 = 0, g = 0; g0 < in; g0 += gs, ++g) {
    const int64_t g1 = std::min(in, g0 + gs);
    const float sc = s[g];
    int64_t i = g0;
#if defined(P2P_AVX512)
    __m512 a[M];
    for (int m = 0; m < M; ++m) a[m] = _mm512_setzero_ps();
    const __m512 vs = _mm512_set1_ps(sc);
    for (; i + 16 <= g1; i += 16) {
      __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + i));
      __m512 wv = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b)), vs);
      for (int m = 0; m < M; ++m) a[m] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(X + m * in + i), a[m]);
    }
    for (int m = 0; m < M; ++m) r[m] += _mm512_reduce_add_ps(a[m]);
#elif defined(P2P_AVX2)
    __m256 a0[M], a1[M];
    for (int m = 0; m < M; ++m) { a0[m] = _mm256_setzero_ps(); a1[m] = _mm256_setzero_ps(); }
    const __m256 vs = _mm256_set1_ps(sc);
    for (; i + 16 <= g1; i += 16) {
      __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + i));
      __m256 w0 = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b)), vs);
      __m256 w1 = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(b, 8))), vs);
      for (int m = 0; m < M; ++m) {
        a0[m] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(X + m * in + i), a0[m]);
        a1[m] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(X + m * in + i + 8), a1[m]);
      }
    }
    for (int m = 0; m < M; ++m) r[m] += hsum(_mm256_add_ps(a0[m], a1[m]));
#endif
    for (; i < g1; ++i) {
      const float wv = static_cast<float>(w[i]) * sc;
      for (int m = 0; m < M; ++m) r[m] += X[m * in + i] * wv;
    }
  }
  for (int m = 0; m < M; ++m) Y[m * out + o] = r[m];
}

// x [M, in] fp32, w [out, in] int8, scales [out, groups] fp32 -> [M, out] fp32:
// Y[m, o] = sum_i X[m, i] * W[o, i] * scales[o, i / (in / groups)]
torch::Tensor gemv_int8(torch::Tensor x, torch::Tensor w, torch::Tensor scales) {
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && w.scalar_type() == at::kChar, "w: [out, in] int8");
  check_x(x, w.size(1));
  TORCH_CHECK(scales.dim() == 2 && scales.size(0) == w.size(0) && scales.scalar_type() == at::kFloat &&
              scales.is_contiguous() && w.size(1) % scales.size(1) == 0, "scales: [out, groups] fp32");
  const int64_t M = x.size(0), in = w.size(1), out = w.size(0), G = scales.size(1), gs = in / G;
  const int8_t* W = w.data_ptr<int8_t>();
  const float* S = scales.data_ptr<float>();
  auto y = torch::empty({M, out}, x.options());
  const float* X = x.data_ptr<float>();
  float* Y = y.data_ptr<float>();
  over_rows(M, out, 4, [&](int64_t m, int64_t n, int64_t o) {
    const float* x_m = X + m * in;
    float* y_m = Y + m * out;
    const int8_t* w_o = W + o * in;
    const float* s_o = S + o * G;
    switch (n) {
      case 1: row_int8<1>(x_m, w_o, s_o, y_m, in, gs, out, o); break;
      case 2: row_int8<2>(x_m, w_o, s_o, y_m, in, gs, out, o); break;
      case 3: row_int8<3>(x_m, w_o, s_o, y_m, in, gs, out, o); break;
      default: row_int8<4>(x_m, w_o, s_o, y_m, in, gs, out, o); break;
    }
  });
  return y;
}

// ---------------------------------------------------------------------------- int4
// A row of an int4 weight is blocks of 32 values in 16 bytes, value j of a block in the
// low nibble of byte j and value 16 + j in its high nibble (GGUF's Q4_0/Q4_1 order), with
// per group of `gs` inputs an fp16 scale and minimum: W = q * scale + min, q in 0..15.
// Each nibble is widened and turned into its weight with one FMA, then multiplied into
// every row of X; the accumulators run across groups, so no sum waits on a group's end.
static inline float half(c10::Half h) {
#if defined(P2P_AVX2)
  return _cvtsh_ss(h.x);
#else
  return static_cast<float>(h);
#endif
}

template <int M>
static void row_int4(const float* X, const uint8_t* w, const c10::Half* s, const c10::Half* mn, float* Y,
                     int64_t in, int64_t gs, int64_t out, int64_t o) {
  float r[M];
#if defined(P2P_AVX512)
  // A group's 16 possible weights q * scale + min fill one register; each value's byte,
  // widened to 32 bits, indexes it (vpermps reads the index's low 4 bits: the low nibble;
  // shifted right by 4: the high one), so a value costs no conversion of its own.
  __m512 a0[M], a1[M];
  for (int m = 0; m < M; ++m) { a0[m] = _mm512_setzero_ps(); a1[m] = _mm512_setzero_ps(); }
  const __m512 levels = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (int64_t g0 = 0, g = 0; g0 < in; g0 += gs, ++g) {
    const __m512 lut = _mm512_fmadd_ps(levels, _mm512_set1_ps(half(s[g])), _mm512_set1_ps(half(mn[g])));
    for (int64_t i = g0; i < g0 + gs; i += 32) {
      const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + i / 2)));
      const __m512 w0 = _mm512_permutexvar_ps(b, lut), w1 = _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), lut);
      for (int m = 0; m < M; ++m) {
        a0[m] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(X + m * in + i), a0[m]);
        a1[m] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(X + m * in + i + 16), a1[m]);
      }
    }
  }
  for (int m = 0; m < M; ++m) r[m] = _mm512_reduce_add_ps(_mm512_add_ps(a0[m], a1[m]));
#elif defined(P2P_AVX2)
  __m256 a0[M], a1[M];
  for (int m = 0; m < M; ++m) { a0[m] = _mm256_setzero_ps(); a1[m] = _mm256_setzero_ps(); }
  const __m128i low = _mm_set1_epi8(0x0F);
  for (int64_t g0 = 0, g = 0; g0 < in; g0 += gs, ++g) {
   const __m256 vs = _mm256_set1_ps(half(s[g])), vm = _mm256_set1_ps(half(mn[g]));
   for (int64_t i = g0; i < g0 + gs; i += 32) {
    __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + i / 2));
    __m128i lo = _mm_and_si128(b, low), hi = _mm_and_si128(_mm_srli_epi16(b, 4), low);
    __m256 w0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo)), vs, vm);
    __m256 w1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8))), vs, vm);
    __m256 w2 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi)), vs, vm);
    __m256 w3 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8))), vs, vm);
    for (int m = 0; m < M; ++m) {
      const float* xm = X + m * in + i;
      a0[m] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xm), a0[m]);
      a1[m] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xm + 8), a1[m]);
      a0[m] = _mm256_fmadd_ps(w2, _mm256_loadu_ps(xm + 16), a0[m]);
      a1[m] = _mm256_fmadd_ps(w3, _mm256_loadu_ps(xm + 24), a1[m]);
    }
   }
  }
  for (int m = 0; m < M; ++m) r[m] = hsum(_mm256_add_ps(a0[m], a1[m]));
#else
  for (int m = 0; m < M; ++m) r[m] = 0.f;
  for (int64_t i = 0; i < in; i += 32) {
    const float sc = half(s[i / gs]), mi = half(mn[i / gs]);
    float wv[32];
    for (int j = 0; j < 16; ++j) {
      const uint8_t b = w[i / 2 + j];
      wv[j] = static_cast<float>(b & 0x0F) * sc + mi;
      wv[16 + j] = static_cast<float>(b >> 4) * sc + mi;
    }
    for (int m = 0; m < M; ++m)
      for (int j = 0; j < 32; ++j) r[m] += wv[j] * X[m * in + i + j];
  }
#endif
  for (int m = 0; m < M; ++m) Y[m * out + o] = r[m];
}

// x [M, in] fp32, w [out, in / 2] uint8 (blocks as above), scales and mins [out, groups]
// fp16 -> [M, out] fp32
torch::Tensor gemv_int4(torch::Tensor x, torch::Tensor w, torch::Tensor scales, torch::Tensor mins) {
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && w.scalar_type() == at::kByte, "w: [out, in / 2] uint8");
  const int64_t in = w.size(1) * 2, out = w.size(0);
  check_x(x, in);
  TORCH_CHECK(scales.dim() == 2 && scales.size(0) == out && scales.scalar_type() == at::kHalf &&
              scales.is_contiguous() && mins.sizes() == scales.sizes() && mins.scalar_type() == at::kHalf &&
              mins.is_contiguous(), "scales, mins: [out, groups] fp16");
  const int64_t G = scales.size(1);
  TORCH_CHECK(G >= 1 && in % G == 0 && (in / G) % 32 == 0, "groups of a multiple of 32 inputs");
  const int64_t M = x.size(0), gs = in / G;
  const uint8_t* W = w.data_ptr<uint8_t>();
  const c10::Half* S = scales.data_ptr<c10::Half>();
  const c10::Half* N = mins.data_ptr<c10::Half>();
  auto y = torch::empty({M, out}, x.options());
  const float* X = x.data_ptr<float>();
  float* Y = y.data_ptr<float>();
  // AVX-512's 32 registers hold the accumulators of 8 activation rows, AVX2's 16 those of 4
  const int64_t tile = isa() == "avx512" ? 8 : 4;
  over_rows(M, out, tile, [&](int64_t m, int64_t n, int64_t o) {
    const float* x_m = X + m * in;
    float* y_m = Y + m * out;
    const uint8_t* w_o = W + o * (in / 2);
    const c10::Half *s_o = S + o * G, *n_o = N + o * G;
    switch (n) {
      case 1: row_int4<1>(x_m, w_o, s_o, n_o, y_m, in, gs, out, o); break;
      case 2: row_int4<2>(x_m, w_o, s_o, n_o, y_m, in, gs, out, o); break;
      case 3: row_int4<3>(x_m, w_o, s_o, n_o, y_m, in, gs, out, o); break;
      case 4: row_int4<4>(x_m, w_o, s_o, n_o, y_m, in, gs, out, o); break;
      case 5: row_int4<5>(x_m, w_o, s_o, n_o, y_m, in, gs, out, o); break;
      case 6: row_int4<6>(x_m, w_o, s_o, n_o, y_m, in, gs, out, o); break;
      case 7: row_int4<7>(x_m, w_o, s_o, n_o, y_m, in, gs, out, o); break;
      default: row_int4<8>(x_m, w_o, s_o, n_o, y_m, in, gs, out, o); break;
    }
  });
  return y;
}
