// The CPU decode GEMVs of p2pserve/engine/kernels.py (compiled on first use by torch's
// cpp_extension; kernels.py binds `gemv` and `gemv_int8`).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

static inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Y[m, o] = sum_i X[m, i] * W[o, i] for rows o in [o0, o1); X fp32 [M, in], Y fp32 [M, out].
template <int M>
static void rows(const float* X, const float* W, float* Y, int64_t in, int64_t out, int64_t o0, int64_t o1) {
  for (int64_t o = o0; o < o1; ++o) {
    const float* w = W + o * in;
    __m256 a0[M], a1[M];
    for (int m = 0; m < M; ++m) { a0[m] = _mm256_setzero_ps(); a1[m] = _mm256_setzero_ps(); }
    int64_t i = 0;
    for (; i + 16 <= in; i += 16) {
      __m256 w0 = _mm256_loadu_ps(w + i), w1 = _mm256_loadu_ps(w + i + 8);
      for (int m = 0; m < M; ++m) {
        a0[m] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(X + m * in + i), a0[m]);
        a1[m] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(X + m * in + i + 8), a1[m]);
      }
    }
    for (int m = 0; m < M; ++m) {
      float s = hsum(_mm256_add_ps(a0[m], a1[m]));
      for (int64_t j = i; j < in; ++j) s += X[m * in + j] * w[j];
      Y[m * out + o] = s;
    }
  }
}

static void run(const float* X, const float* W, float* Y, int64_t M, int64_t in, int64_t out) {
  at::parallel_for(0, out, 16, [&](int64_t b, int64_t e) {
    switch (M) {
      case 1: rows<1>(X, W, Y, in, out, b, e); break;
      case 2: rows<2>(X, W, Y, in, out, b, e); break;
      case 3: rows<3>(X, W, Y, in, out, b, e); break;
      default: rows<4>(X, W, Y, in, out, b, e); break;
    }
  });
}

// x [M, in] fp32 contiguous, w [out, in] fp32 contiguous -> [M, out] fp32
torch::Tensor gemv(torch::Tensor x, torch::Tensor w) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x: [M, in] fp32");
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && w.size(1) == x.size(1) && w.scalar_type() == at::kFloat,
              "w: [out, in] fp32");
  TORCH_CHECK(x.size(0) >= 1 && x.size(0) <= 4, "1 to 4 rows");
  const int64_t M = x.size(0), in = w.size(1), out = w.size(0);
  auto y = torch::empty({M, out}, x.options());
  run(x.data_ptr<float>(), w.data_ptr<float>(), y.data_ptr<float>(), M, in, out);
  return y;
}

// Y[m, o] = scale[o] * sum_i X[m, i] * W[o, i] for int8 W: each weight row is read once as
// bytes and widened in registers, so the step streams a quarter of fp32's bytes.
template <int M>
static void rows_int8(const float* X, const int8_t* W, const float* S, float* Y, int64_t in, int64_t out,
                      int64_t o0, int64_t o1) {
  for (int64_t o = o0; o < o1; ++o) {
    const int8_t* w = W + o * in;
    __m256 a0[M], a1[M];
    for (int m = 0; m < M; ++m) { a0[m] = _mm256_setzero_ps(); a1[m] = _mm256_setzero_ps(); }
    int64_t i = 0;
    for (; i + 16 <= in; i += 16) {
      __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + i));
      __m256 w0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
      __m256 w1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(b, 8)));
      for (int m = 0; m < M; ++m) {
        a0[m] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(X + m * in + i), a0[m]);
        a1[m] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(X + m * in + i + 8), a1[m]);
      }
    }
    for (int m = 0; m < M; ++m) {
      float s = hsum(_mm256_add_ps(a0[m], a1[m]));
      for (int64_t j = i; j < in; ++j) s += X[m * in + j] * static_cast<float>(w[j]);
      Y[m * out + o] = s * S[o];
    }
  }
}

// x [M, in] fp32 contiguous, w [out, in] int8 contiguous, scales [out] fp32 -> [M, out] fp32
torch::Tensor gemv_int8(torch::Tensor x, torch::Tensor w, torch::Tensor scales) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x: [M, in] fp32");
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && w.size(1) == x.size(1) && w.scalar_type() == at::kChar,
              "w: [out, in] int8");
  TORCH_CHECK(scales.dim() == 1 && scales.size(0) == w.size(0) && scales.scalar_type() == at::kFloat &&
              scales.is_contiguous(), "scales: [out] fp32");
  TORCH_CHECK(x.size(0) >= 1 && x.size(0) <= 4, "1 to 4 rows");
  const int64_t M = x.size(0), in = w.size(1), out = w.size(0);
  auto y = torch::empty({M, out}, x.options());
  const float* X = x.data_ptr<float>();
  const int8_t* W = w.data_ptr<int8_t>();
  const float* S = scales.data_ptr<float>();
  float* Y = y.data_ptr<float>();
  at::parallel_for(0, out, 16, [&](int64_t b, int64_t e) {
    switch (M) {
      case 1: rows_int8<1>(X, W, S, Y, in, out, b, e); break;
      case 2: rows_int8<2>(X, W, S, Y, in, out, b, e); break;
      case 3: rows_int8<3>(X, W, S, Y, in, out, b, e); break;
      default: rows_int8<4>(X, W, S, Y, in, out, b, e); break;
    }
  });
  return y;
}
