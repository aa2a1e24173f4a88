// The CPU decode GEMVs of p2pserve/engine/kernels.py (compiled on first use by torch's
// cpp_extension with -march=native, together with decode_step.cpp, which uses the pointer
// level `*_rows` functions and binds everything to Python). Their loops run on team.cpp's
// threads.
//
// Which instructions a loop uses is decided by what the compiler may emit for the CPU it
// is built on: AVX-512, else AVX2 + FMA, else plain C++ the compiler vectorises as it can.
// kernels.py builds one copy per CPU (its cache name includes the CPU's flags), so the
// choice is made on, and for, the machine that runs it.
#include <torch/extension.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <string>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define P2P_AVX2 1
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
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

// Activations as 16-bit integers, wherever AVX2 is. There the int8 and int4 loops were
// bound by turning each weight into a float (widen, convert, scale: an instruction each per
// 8 or 16 values), not by memory. With X in int16, a weight is only widened to 16 bits, and
// one `madd` (AVX-512 VNNI: `dpwssd`, which adds too) multiplies 16 or 32 of them and adds
// pairs, exactly, in int32; a group's sum is converted and scaled once. X takes a scale per
// group of the weight's (per row where the weight has one scale a row), so an outlier moves
// only its own group's rounding: each value moves by at most 1.5e-5 of its group's largest
// (bf16, which torch's int kernels take, by 4e-3 of itself).
#if defined(P2P_AVX2)
#define P2P_I16 1
// int32 sums of at most this many products before they are scaled into float: far from
// overflow for int8 (127 * 32767 * 2 per madd lane, 64 madds) and int4 alike
constexpr int64_t I16_RUN = 1024;
// the largest |x| in 16 bits: the largest whose two bytes (`QuantX::split`) are both int8
constexpr float I16_TOP = 32639.f;

#if !defined(P2P_AVX512) || defined(__AVX512VNNI__)
// int4 weights against X split into bytes: a nibble is an unsigned byte already, and
// `vpdpbusd` multiplies 64 unsigned bytes by 64 signed ones and adds them in fours into
// int32, so a 16-bit x = 256 hi + lo takes two products (hi's sums shifted by 8 and added
// to lo's, exactly) and no widening of the weights: half the instructions of widening the
// nibbles to int16 for `vpdpwssd`, for the same 16-bit activations. AVX2's `vpmaddubsw`
// does the same in int16 pairs (a nibble times a byte, twice, cannot reach its saturation):
// twice the values an instruction of widening the nibbles for `vpmaddwd`. AVX-512 without
// VNNI keeps the widening loop.
#define P2P_INT4_SPLIT 1
#endif
#if defined(P2P_INT4_SPLIT) && defined(P2P_AVX512)
#define P2P_INT8_SPLIT 1  // int8 in int4's layout: see split8_at
#endif

struct QuantX {
  // how the int16 values are laid out for the loop that reads them
  enum Layout {
    plain,   // in X's order
    // AVX-512: groups 2p and 2p + 1 interleaved by 16 values (16 of 2p, 16 of 2p + 1, ...),
    // so one 512-bit product covers both and its int32 lanes split 8 / 8 between them: a
    // pair's sums are converted and scaled by one instruction each, not a reduction per
    // group. A last odd group keeps X's order.
    paired,
    // int4 (P2P_INT4_SPLIT), `bytes` in place of `q`: each x as hi = (x + 128) >> 8 and
    // lo = x - 256 hi, both int8, in quads of four 32-value blocks (128 values, 256 bytes):
    // hi of values 0-15 of each block, hi of 16-31 of each, then the same of lo, matching
    // the low and high nibbles of the quad's 64 weight bytes; rows padded with zeros to
    // whole quads
    split,
  };
  std::vector<int16_t> q;  // [M, in]: round(x / scale of its group); plain or paired
  std::vector<int8_t> bytes;  // [M, 2 * padded]: split
  std::vector<float> scale;  // [M, G]: each group's largest |x| / I16_TOP
  std::vector<float> gsum;  // [M, G]: each group's sum of x (int4's minima multiply them)
  // [M, G]: each group's sum of its int16 values times its scale, the x the products take
  // (what the offset of int8's split layout multiplies: its share cancels exactly)
  std::vector<float> qsum;
  int64_t in, G, padded;
  Layout layout;

  // X [M, in] in G groups of in / G; `split` where the caller's loop reads that layout,
  // else paired where the groups allow it on AVX-512 (groups too long for one int32 run,
  // or not of whole 16s, keep X's order)
  QuantX(const float* X, int64_t M, int64_t in_, int64_t G_, bool split = false)
      : scale(M * G_), gsum(M * G_), qsum(M * G_), in(in_), G(G_), padded((in_ + 127) / 128 * 128) {
    const int64_t gs = in / G;
#if defined(P2P_AVX512)
    layout = split ? Layout::split : G >= 2 && gs % 16 == 0 && gs <= I16_RUN ? Layout::paired : Layout::plain;
#else
    layout = split ? Layout::split : Layout::plain;
#endif
    if (layout == Layout::split)
      bytes.assign(M * 2 * padded, 0);
    else
      q.resize(M * in);
#if defined(P2P_AVX512)
    if (gs % 16 == 0) {
      quantize16(X, M, gs);
      return;
    }
#endif
    for (int64_t m = 0; m < M; ++m)
      for (int64_t g = 0; g < G; ++g) {
        const float* x = X + m * in + g * gs;
        float top = 0.f, sum = 0.f;
        for (int64_t i = 0; i < gs; ++i) top = std::max(top, std::abs(x[i])), sum += x[i];
        const float inv = top > 0.f ? I16_TOP / top : 0.f;
        int64_t isum = 0;
        for (int64_t i = 0; i < gs; ++i) {
          const auto v = static_cast<int16_t>(std::nearbyint(x[i] * inv));
          isum += v;
          if (layout == Layout::split) {
            int8_t* quad = bytes.data() + m * 2 * padded + split_slot(g * gs + i);
            const int hi = (v + 128) >> 8;  // arithmetic: a floor
            quad[0] = static_cast<int8_t>(hi);
            quad[128] = static_cast<int8_t>(v - 256 * hi);
          } else {
            q[m * in + slot(g, i, gs)] = v;
          }
        }
        scale[m * G + g] = top / I16_TOP;
        gsum[m * G + g] = sum;
        qsum[m * G + g] = static_cast<float>(isum) * scale[m * G + g];
      }
  }
#if defined(P2P_AVX512)
  // the loop above, 16 values at a time: a run of 16 in X lands on 16 neighbours in every
  // layout (slot, split_slot). It was serial work on the caller's thread before each
  // GEMV's team ran.
  void quantize16(const float* X, int64_t M, int64_t gs) {
    const __m512i half = _mm512_set1_epi32(128);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t g = 0; g < G; ++g) {
        const float* x = X + m * in + g * gs;
        __m512 top = _mm512_setzero_ps(), sum = _mm512_setzero_ps();
        for (int64_t i = 0; i < gs; i += 16) {
          const __m512 v = _mm512_loadu_ps(x + i);
          top = _mm512_max_ps(top, _mm512_abs_ps(v)), sum = _mm512_add_ps(sum, v);
        }
        const float t = _mm512_reduce_max_ps(top);
        const __m512 inv = _mm512_set1_ps(t > 0.f ? I16_TOP / t : 0.f);
        __m512i isum = _mm512_setzero_si512();  // gs / 16 values of at most 32639 a lane: no overflow
        for (int64_t i = 0; i < gs; i += 16) {
          // round to nearest even, as std::nearbyint in the default rounding mode
          const __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x + i), inv));
          isum = _mm512_add_epi32(isum, v);
          if (layout == Layout::split) {
            int8_t* quad = bytes.data() + m * 2 * padded + split_slot(g * gs + i);
            const __m512i hi = _mm512_srai_epi32(_mm512_add_epi32(v, half), 8);  // a floor
            _mm_storeu_si128(reinterpret_cast<__m128i*>(quad), _mm512_cvtepi32_epi8(hi));
            _mm_storeu_si128(reinterpret_cast<__m128i*>(quad + 128),
                             _mm512_cvtepi32_epi8(_mm512_sub_epi32(v, _mm512_slli_epi32(hi, 8))));
          } else {
            int16_t* to = q.data() + m * in + slot(g, i, gs);
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(to), _mm512_cvtepi32_epi16(v));
          }
        }
        scale[m * G + g] = t / I16_TOP;
        gsum[m * G + g] = _mm512_reduce_add_ps(sum);
        qsum[m * G + g] = static_cast<float>(_mm512_reduce_add_epi32(isum)) * scale[m * G + g];
      }
  }
#endif
  // where value i of group g (of gs values) goes in a row of q, plain or paired
  int64_t slot(int64_t g, int64_t i, int64_t gs) const {
    const bool pair = layout == Layout::paired && g < G - G % 2;
    return pair ? (g - g % 2) * gs + (i / 16) * 32 + (g % 2) * 16 + i % 16 : g * gs + i;
  }
  // where the hi byte of value `at` goes in a row of `bytes` (split; its lo byte 128 on)
  static int64_t split_slot(int64_t at) {
    const int64_t r = at % 128, j = r % 32;
    return at / 128 * 256 + (j / 16) * 64 + r / 32 * 16 + j % 16;
  }
  const int16_t* row(int64_t m) const { return q.data() + m * in; }
  const int8_t* split_row(int64_t m) const { return bytes.data() + m * 2 * padded; }
  float xs(int64_t m, int64_t g) const { return scale[m * G + g]; }
};
#endif

#if defined(P2P_AVX512)
static inline __m128i load16(const void* p) { return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)); }
static inline __m256i join(__m128i lo, __m128i hi) {
  return _mm256_inserti128_si256(_mm256_castsi128_si256(lo), hi, 1);
}
// acc + the pairwise products of 32 int16 weights with 32 int16 activations at x
static inline __m512i dot32(__m512i acc, __m512i w, const int16_t* x) {
#if defined(__AVX512VNNI__)
  return _mm512_dpwssd_epi32(acc, w, _mm512_loadu_si512(x));
#else
  return _mm512_add_epi32(acc, _mm512_madd_epi16(w, _mm512_loadu_si512(x)));
#endif
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
  team::parallel_for(0, out, 16, [&](int64_t b, int64_t e) {
    for (int64_t o = b; o < e; ++o)
      for (int64_t m = 0; m < M; m += tile) fn(m, std::min(tile, M - m), o);
  });
}

// fn(std::integral_constant<int, n>) for n in 1..Max (Max for any larger n): a row loop's
// count of X's rows is a template argument, so its accumulators are registers
template <int Max, class Fn>
static inline void with_rows(int64_t n, Fn&& fn) {
  if constexpr (Max > 1)
    if (n < Max) return with_rows<Max - 1>(n, fn);
  fn(std::integral_constant<int, Max>{});
}

// fp16 scales and minima (GGUF's) or fp32 ones
static inline float to_float(float v) { return v; }
static inline float to_float(c10::Half h) {
#if defined(P2P_AVX2)
  return _cvtsh_ss(h.x);
#else
  return static_cast<float>(h);
#endif
}

#if defined(P2P_AVX2)
static inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
static inline __m256 load8(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
static inline __m256 load8(const c10::BFloat16* p) {  // a bf16 value is a float's top 16 bits
  const __m256i u = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(u, 16));
}
// the first n (at most 8) values at p as floats; the rest 0, and never read
static inline __m256 load8(const float* p, int64_t n) {
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_maskload_ps(p, _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), lanes));
}
// and of 16-bit ones, which have no masked load: set lane by lane (eight stores read back as
// one vector stall the load: no store forwarding)
template <class S>
static inline __m256 load8(const S* p, int64_t n) {
  if (n == 8) return load8(p);
  float v[8];
  for (int64_t i = 0; i < 8; ++i) v[i] = i < n ? to_float(p[i]) : 0.f;
  return _mm256_setr_ps(v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7]);
}
#endif

#if defined(P2P_AVX512)
// the first n (at most 16) values at p as floats; the rest 0, and never read
static inline __m512 load16_ps(const float* p, int64_t n) {
  return _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << n) - 1), p);
}
static inline __m512 load16_ps(const c10::Half* p, int64_t n) {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(static_cast<__mmask16>((1u << n) - 1), p));
}

// For each pair of groups (g, g + 1) below `end` in QuantX's paired order, `sums(g, acc)`
// gives each row of X's int32 sums of the pair's products (lanes 0-7: group g's, 8-15:
// g + 1's), which are scaled into a[m]. The scales of 16 groups (weight's times X's) are
// multiplied at once and each pair picks its two by one permute: done a pair at a time, the
// scalar products and broadcasts cost more than a 32-value group's own products.
template <int M, class S, class SumsFn>
static inline __attribute__((always_inline)) void over_pairs(const QuantX& qx, int64_t m0, const S* s, int64_t end,
                                                              __m512 a[M], SumsFn sums) {
  const __m512i second = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
  for (int64_t g = 0; g < end; g += 16) {
    const int64_t n = std::min<int64_t>(16, end - g);
    __m512 c[M];
    const __m512 sw = load16_ps(s + g, n);
    for (int m = 0; m < M; ++m) c[m] = _mm512_mul_ps(sw, load16_ps(qx.scale.data() + (m0 + m) * qx.G + g, n));
    for (int64_t k = 0; k < n; k += 2) {
      __m512i acc[M];
      sums(g + k, acc);
      const __m512i pick = _mm512_add_epi32(second, _mm512_set1_epi32(static_cast<int>(k)));
      for (int m = 0; m < M; ++m)
        a[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[m]), _mm512_permutexvar_ps(pick, c[m]), a[m]);
    }
  }
}
#endif

// A weight's scales (and int4's minima) are arrays of their own beside its values, a few
// dozen bytes a row: too short a stream for the hardware prefetcher to run ahead of, so a
// row's first scale load waited on memory (a third of the int4 loop's samples, on Zen 5).
// Each row fetches those of the row `ahead` of it; past the last row, prefetches do not fault.
template <class T>
static inline void prefetch_row(const T* rows, int64_t row, int64_t n) {
#if defined(P2P_AVX2)
  constexpr int64_t ahead = 4;
  const T* p = rows + (row + ahead) * n;
  _mm_prefetch(reinterpret_cast<const char*>(p), _MM_HINT_T0);
  _mm_prefetch(reinterpret_cast<const char*>(p + n - 1), _MM_HINT_T0);
#endif
}

// A GEMV that reads its weight row after row is one stream, which the hardware prefetchers
// follow, but on a Xeon (2 threads) they kept too few lines in flight to cover memory's
// latency at the loops' pace: a small matrix's rows came at 60-80% of the bandwidth a plain
// sum reads. So each 64 bytes read fetch their place 16 rows on into L2 and 2 rows on into
// L1 (the L2 one is what helps: L2 tracks more misses than L1), as split_rows's do.
// `row_bytes`: the weight's bytes a row. Past a tensor's end, prefetches do not fault.
static inline void fetch_ahead(const void* p, int64_t row_bytes) {
#if defined(P2P_AVX2)
  _mm_prefetch(static_cast<const char*>(p) + 2 * row_bytes, _MM_HINT_T0);
  _mm_prefetch(static_cast<const char*>(p) + 16 * row_bytes, _MM_HINT_T1);
#endif
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
      fetch_ahead(w + i, in * 4);
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

// X [M, in] times W [out, in] into Y [M, out], 4 rows of X at a time (any M)
static void f32_rows(const float* X, const float* W, float* Y, int64_t M, int64_t in, int64_t out) {
  for (int64_t m0 = 0; m0 < M; m0 += 4) {
    const float* x = X + m0 * in;
    float* y = Y + m0 * out;
    const int64_t n = std::min<int64_t>(4, M - m0);
    team::parallel_for(0, out, 16, [&](int64_t b, int64_t e) {
      with_rows<4>(n, [&](auto R) { rows<R>(x, W, y, in, out, b, e); });
    });
  }
}

// x [M, in] fp32 contiguous, w [out, in] fp32 contiguous -> [M, out] fp32
torch::Tensor gemv(torch::Tensor x, torch::Tensor w) {
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && w.scalar_type() == at::kFloat, "w: [out, in] fp32");
  check_x(x, w.size(1));
  TORCH_CHECK(x.size(0) <= 4, "1 to 4 rows");
  const int64_t M = x.size(0), in = w.size(1), out = w.size(0);
  auto y = torch::empty({M, out}, x.options());
  f32_rows(x.data_ptr<float>(), w.data_ptr<float>(), y.data_ptr<float>(), M, in, out);
  return y;
}

// ---------------------------------------------------------------------------- bf16
// A bf16 stage's weights as stored, half of fp32's bytes to stream. X is rounded to bf16
// first (to nearest even), as a bf16 stage's activations are: a product of two bf16 values
// is exact in fp32, so every instruction set multiplies the same numbers and only the
// order of the fp32 sums differs. AVX-512 BF16's `vdpbf16ps` multiplies 32 weights by 32
// values of X and adds the products in pairs; elsewhere a weight becomes a float by moving
// its 16 bits to the top of a 32-bit lane (`unpack` beside a zero: no conversion).
#if defined(__AVX512BF16__)
#define P2P_BF16_DP 1
#endif

// X [M, in] rounded to bf16: as bf16 bits for `vdpbf16ps`; else as floats, on AVX2 each 16
// in the order `unpack` leaves 16 weights in (lo: 0-3 and 8-11, hi: 4-7 and 12-15), a tail
// as is
struct RoundedX {
  std::vector<c10::BFloat16> bits;
  std::vector<float> f;
};

static RoundedX round_bf16(const float* X, int64_t M, int64_t in) {
  RoundedX r;
#if defined(P2P_BF16_DP)
  r.bits.resize(M * in);
  for (int64_t k = 0; k < M * in; ++k) r.bits[k] = c10::BFloat16(X[k]);
#else
  [[maybe_unused]] static constexpr int order[16] = {0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 12, 13, 14, 15};
  r.f.resize(M * in);
  for (int64_t m = 0; m < M; ++m) {
    const float* x = X + m * in;
    float* f = r.f.data() + m * in;
    int64_t i = 0;
#if defined(P2P_AVX2)
    for (; i + 16 <= in; i += 16)
      for (int k = 0; k < 16; ++k) f[i + k] = static_cast<float>(c10::BFloat16(x[i + order[k]]));
#endif
    for (; i < in; ++i) f[i] = static_cast<float>(c10::BFloat16(x[i]));
  }
#endif
  return r;
}

// Y[m, o] for output rows o in [o0, o1), X's rows m0..m0+M
template <int M>
static void rows_bf16(const RoundedX& x, int64_t m0, const c10::BFloat16* W, float* Y, int64_t in, int64_t out,
                      int64_t o0, int64_t o1) {
  for (int64_t o = o0; o < o1; ++o) {
    const c10::BFloat16* w = W + o * in;
    float s[M];
#if defined(P2P_BF16_DP)
    const c10::BFloat16* xb[M];
    __m512 a0[M], a1[M];
    for (int m = 0; m < M; ++m) xb[m] = x.bits.data() + (m0 + m) * in, a0[m] = a1[m] = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 64 <= in; i += 64) {
      fetch_ahead(w + i, in * 2), fetch_ahead(w + i + 32, in * 2);
      const __m512i w0 = _mm512_loadu_si512(w + i), w1 = _mm512_loadu_si512(w + i + 32);
      for (int m = 0; m < M; ++m) {
        a0[m] = _mm512_dpbf16_ps(a0[m], (__m512bh)w0, (__m512bh)_mm512_loadu_si512(xb[m] + i));
        a1[m] = _mm512_dpbf16_ps(a1[m], (__m512bh)w1, (__m512bh)_mm512_loadu_si512(xb[m] + i + 32));
      }
    }
    for (; i < in; i += 32) {  // the last 1-63 values, 32 at a time, masked past the row
      const __mmask32 k = in - i >= 32 ? ~0u : static_cast<__mmask32>((1u << (in - i)) - 1);
      const __m512i wv = _mm512_maskz_loadu_epi16(k, w + i);
      for (int m = 0; m < M; ++m)
        a0[m] = _mm512_dpbf16_ps(a0[m], (__m512bh)wv, (__m512bh)_mm512_maskz_loadu_epi16(k, xb[m] + i));
    }
    for (int m = 0; m < M; ++m) s[m] = _mm512_reduce_add_ps(_mm512_add_ps(a0[m], a1[m]));
#else
    const float* xf[M];
    for (int m = 0; m < M; ++m) xf[m] = x.f.data() + (m0 + m) * in, s[m] = 0.f;
    int64_t i = 0;
#if defined(P2P_AVX2)
    __m256 lo[M], hi[M];
    for (int m = 0; m < M; ++m) lo[m] = hi[m] = _mm256_setzero_ps();
    const __m256i zero = _mm256_setzero_si256();
    for (; i + 16 <= in; i += 16) {
      if ((i & 31) == 0) fetch_ahead(w + i, in * 2);
      const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + i));
      const __m256 wl = _mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, wv));
      const __m256 wh = _mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, wv));
      for (int m = 0; m < M; ++m) {
        lo[m] = _mm256_fmadd_ps(wl, _mm256_loadu_ps(xf[m] + i), lo[m]);
        hi[m] = _mm256_fmadd_ps(wh, _mm256_loadu_ps(xf[m] + i + 8), hi[m]);
      }
    }
    for (int m = 0; m < M; ++m) s[m] = hsum(_mm256_add_ps(lo[m], hi[m]));
#endif
    for (int m = 0; m < M; ++m)
      for (int64_t j = i; j < in; ++j) s[m] += xf[m][j] * static_cast<float>(w[j]);
#endif
    for (int m = 0; m < M; ++m) Y[(m0 + m) * out + o] = s[m];
  }
}

// X [M, in] fp32 times bf16 W [out, in] into Y [M, out] fp32, any M
static void bf16_rows(const float* X, const c10::BFloat16* W, float* Y, int64_t M, int64_t in, int64_t out) {
  const RoundedX x = round_bf16(X, M, in);
  over_rows(M, out, 4, [&](int64_t m, int64_t n, int64_t o) {
    with_rows<4>(n, [&](auto R) { rows_bf16<R>(x, m, W, Y, in, out, o, o + 1); });
  });
}

// x [M, in] fp32 contiguous, w [out, in] bf16 contiguous -> [M, out] fp32
torch::Tensor gemv_bf16(torch::Tensor x, torch::Tensor w) {
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && w.scalar_type() == at::kBFloat16, "w: [out, in] bf16");
  check_x(x, w.size(1));
  const int64_t M = x.size(0), in = w.size(1), out = w.size(0);
  auto y = torch::empty({M, out}, x.options());
  bf16_rows(x.data_ptr<float>(), w.data_ptr<c10::BFloat16>(), y.data_ptr<float>(), M, in, out);
  return y;
}

// ---------------------------------------------------------------------------- int8
// One output row o of an int8 weight with a scale per group of `gs` inputs (gs = in: one
// per row): each 16 (or 8) bytes are widened in registers and multiplied by their scale,
// so the step streams a quarter of fp32's bytes and no dequantized copy exists. The vector
// accumulators run across groups and are summed once a row: a horizontal sum per group (a
// Q8_0 row has one every 32 values) cost as much as the group's own products.
template <int M>
static void row_int8(const float* X, const int8_t* w, const float* s, float* Y, int64_t in, int64_t gs,
                     int64_t out, int64_t o) {
  float r[M];
  for (int m = 0; m < M; ++m) r[m] = 0.f;
  for (int64_t g0 = 0, g = 0; g0 < in; g0 += gs, ++g)
    for (int64_t i = g0; i < std::min(in, g0 + gs); ++i) {
      const float wv = static_cast<float>(w[i]) * s[g];
      for (int m = 0; m < M; ++m) r[m] += X[m * in + i] * wv;
    }
  for (int m = 0; m < M; ++m) Y[m * out + o] = r[m];
}

#if defined(P2P_AVX512)
// One row of an int8 weight against rows m0.. of a QuantX: a pair of groups at a time, 16
// weights of each widened to one register of 32 int16 (QuantX's paired order), one product
// per row of X; then the groups that keep X's order, 32 values a product.
// GS: the group size where the caller knows it at compile time (32: GGUF's Q8_0), else 0.
template <int M, int GS>
static void row_int8_i16(const QuantX& qx, int64_t m0, const int8_t* w, const float* s, float* Y, int64_t gs_,
                         int64_t out, int64_t o) {
  const int64_t gs = GS ? GS : gs_, G = qx.in / gs;
  const int16_t* xr[M];
  for (int m = 0; m < M; ++m) xr[m] = qx.row(m0 + m);
  __m512 a[M];
  float r[M];
  for (int m = 0; m < M; ++m) a[m] = _mm512_setzero_ps(), r[m] = 0.f;
  const int64_t paired = qx.layout == QuantX::paired ? G - G % 2 : 0;
  over_pairs<M>(qx, m0, s, paired, a, [&](int64_t g, __m512i acc[M]) __attribute__((always_inline)) {
    const int8_t *wa = w + g * gs, *wb = wa + gs;
    for (int64_t c = 0; c < 2 * gs; c += 64) fetch_ahead(wa + c, qx.in);
    for (int m = 0; m < M; ++m) acc[m] = _mm512_setzero_si512();
    for (int64_t c = 0; c < gs; c += 16) {
      const __m512i wv = _mm512_cvtepi8_epi16(join(load16(wa + c), load16(wb + c)));
      for (int m = 0; m < M; ++m) acc[m] = dot32(acc[m], wv, xr[m] + g * gs + 2 * c);
    }
  });
  int64_t g = paired;
  for (; g < G; ++g)
    for (int64_t c0 = g * gs; c0 < (g + 1) * gs; c0 += I16_RUN) {
      const int64_t c1 = std::min((g + 1) * gs, c0 + I16_RUN);
      // two chains of products a row of X: one waited on its own `vpdpwssd`s (a row's whole
      // length is one group where the weight has a scale a row)
      __m512i acc[M], odd[M];
      int32_t t[M];
      for (int m = 0; m < M; ++m) acc[m] = odd[m] = _mm512_setzero_si512(), t[m] = 0;
      int64_t i = c0;
      for (; i + 64 <= c1; i += 64) {
        fetch_ahead(w + i, qx.in);
        const __m512i w0 = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + i)));
        const __m512i w1 = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + i + 32)));
        for (int m = 0; m < M; ++m) acc[m] = dot32(acc[m], w0, xr[m] + i), odd[m] = dot32(odd[m], w1, xr[m] + i + 32);
      }
      for (int m = 0; m < M; ++m) acc[m] = _mm512_add_epi32(acc[m], odd[m]);
      for (; i + 32 <= c1; i += 32) {
        const __m512i wv = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + i)));
        for (int m = 0; m < M; ++m) acc[m] = dot32(acc[m], wv, xr[m] + i);
      }
      for (; i < c1; ++i)
        for (int m = 0; m < M; ++m) t[m] += static_cast<int32_t>(w[i]) * xr[m][i];
      for (int m = 0; m < M; ++m) {
        const float sx = s[g] * qx.xs(m0 + m, g);
        a[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[m]), _mm512_set1_ps(sx), a[m]), r[m] += t[m] * sx;
      }
    }
  for (int m = 0; m < M; ++m) Y[m * out + o] = _mm512_reduce_add_ps(a[m]) + r[m];
}
#elif defined(P2P_I16)
// int32 sums of the products of an int8 weight row's values c0..c1 (at most I16_RUN) with
// rows m0.. of a QuantX: 16 weights widened to int16, one madd per row of X, two chains of
// them (one waited on its own adds); a tail short of 16 values in ti
template <int M>
static inline __attribute__((always_inline)) void int8_run(const QuantX& qx, int64_t m0, const int8_t* w,
                                                            int64_t c0, int64_t c1, __m256i ai[M], int32_t ti[M]) {
  __m256i bi[M];
  for (int m = 0; m < M; ++m) ai[m] = bi[m] = _mm256_setzero_si256(), ti[m] = 0;
  int64_t i = c0;
  for (; i + 32 <= c1; i += 32) {
    if ((i & 63) == 0) fetch_ahead(w + i, qx.in);
    const __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + i)));
    const __m256i w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + i + 16)));
    for (int m = 0; m < M; ++m) {
      const int16_t* x = qx.row(m0 + m) + i;
      ai[m] = _mm256_add_epi32(ai[m], _mm256_madd_epi16(w0, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x))));
      bi[m] = _mm256_add_epi32(bi[m], _mm256_madd_epi16(w1, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 16))));
    }
  }
  for (int m = 0; m < M; ++m) ai[m] = _mm256_add_epi32(ai[m], bi[m]);
  for (; i + 16 <= c1; i += 16) {
    const __m256i wv = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + i)));
    for (int m = 0; m < M; ++m)
      ai[m] = _mm256_add_epi32(ai[m], _mm256_madd_epi16(wv, _mm256_loadu_si256(
                                                           reinterpret_cast<const __m256i*>(qx.row(m0 + m) + i))));
  }
  for (; i < c1; ++i)
    for (int m = 0; m < M; ++m) ti[m] += static_cast<int32_t>(w[i]) * qx.row(m0 + m)[i];
}

// One row of an int8 weight against rows m0.. of a QuantX, in groups of gs. Where groups
// are whole 16s within one run (Q8_0's 32), two groups' sums fold into one register
// (`hadd`: lanes 0-1 and 4-5 the first's, 2-3 and 6-7 the second's), so one convert and
// one FMA scale both, by the scales of 8 groups (weight's times X's) multiplied at once
// and picked by a permute: a 32-value group's products take less time than converting its
// sum and scaling it from scalars. One scale a row, and other groups, a run at a time.
// GS: the group size where the caller knows it at compile time (32: GGUF's Q8_0), else 0.
template <int M, int GS>
static void row_int8_i16(const QuantX& qx, int64_t m0, const int8_t* w, const float* s, float* Y, int64_t gs_,
                         int64_t out, int64_t o) {
  const int64_t gs = GS ? GS : gs_, G = qx.in / gs;
  __m256 a[M];
  float r[M];
  __m256i sa[M], sb[M];
  int32_t ta[M], tb[M];
  for (int m = 0; m < M; ++m) a[m] = _mm256_setzero_ps(), r[m] = 0.f;
  if (G >= 2 && gs % 16 == 0 && gs <= I16_RUN) {  // no tails
    const __m256i pair = _mm256_setr_epi32(0, 0, 1, 1, 0, 0, 1, 1);
    for (int64_t g0 = 0; g0 < G; g0 += 8) {
      const int64_t n = std::min<int64_t>(8, G - g0);
      __m256 c[M];
      const __m256 sw = load8(s + g0, n);
      for (int m = 0; m < M; ++m) c[m] = _mm256_mul_ps(sw, load8(qx.scale.data() + (m0 + m) * G + g0, n));
      int64_t k = 0;
      for (; k + 2 <= n; k += 2) {
        int8_run<M>(qx, m0, w, (g0 + k) * gs, (g0 + k + 1) * gs, sa, ta);
        int8_run<M>(qx, m0, w, (g0 + k + 1) * gs, (g0 + k + 2) * gs, sb, tb);
        const __m256i pick = _mm256_add_epi32(pair, _mm256_set1_epi32(static_cast<int>(k)));
        for (int m = 0; m < M; ++m)
          a[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_hadd_epi32(sa[m], sb[m])),
                                 _mm256_permutevar8x32_ps(c[m], pick), a[m]);
      }
      if (k < n) {
        int8_run<M>(qx, m0, w, (g0 + k) * gs, (g0 + k + 1) * gs, sa, ta);
        const __m256i pick = _mm256_set1_epi32(static_cast<int>(k));
        for (int m = 0; m < M; ++m)
          a[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sa[m]), _mm256_permutevar8x32_ps(c[m], pick), a[m]);
      }
    }
  } else {
    for (int64_t g = 0; g < G; ++g)
      for (int64_t c0 = g * gs; c0 < (g + 1) * gs; c0 += I16_RUN) {
        int8_run<M>(qx, m0, w, c0, std::min((g + 1) * gs, c0 + I16_RUN), sa, ta);
        for (int m = 0; m < M; ++m) {
          const float sx = s[g] * qx.xs(m0 + m, g);
          a[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sa[m]), _mm256_set1_ps(sx), a[m]), r[m] += ta[m] * sx;
        }
      }
  }
  for (int m = 0; m < M; ++m) Y[m * out + o] = hsum(a[m]) + r[m];
}
#endif

// int8 the way int4 is multiplied: `vpdpbusd` takes unsigned bytes against X's signed ones,
// so the split layout stores each int8 value plus 128, and W = (stored - 128) * scale: the
// offset's share of a group is -128 * scale * the group's sum of X's int16 values (qsum),
// which cancels it exactly. Its values are ordered as int4's nibbles are: a quad of four
// 32-value blocks (128 values, 128 bytes) as values 0-15 of each block, then 16-31 of each,
// so a quad's two 64-byte loads are what an int4 quad's low and high nibbles hold; a last
// part quad of k blocks holds its k * 16 first halves, then their second halves. Two
// `vpdpbusd` a row of X per 64 weights, where widening to int16 took two instructions and
// two `vpdpwssd`. Rows of a whole number of blocks (in % 32 == 0), in groups of a power
// of two or one group a row (split_rows's windows).
//
// where value i of a row of `in` goes in the split layout
static inline int64_t split8_at(int64_t i, int64_t in) {
  const int64_t quad = i / 128 * 128, r = i % 128, half = std::min<int64_t>(128, in - quad) / 2;
  return quad + (r % 32) / 16 * half + r / 32 * 16 + r % 16;
}
#if defined(P2P_INT8_SPLIT)
static void int8_split(const float* X, const uint8_t* W, const float* S, float* Y, int64_t M, int64_t in,
                       int64_t out, int64_t G);  // below, beside int4's split_gemv
#endif

// X [M, in] times an int8 W [out, in] with scales S [out, G] into Y [M, out]
static void int8_rows(const float* X, const int8_t* W, const float* S, float* Y, int64_t M, int64_t in,
                      int64_t out, int64_t G) {
  const int64_t gs = in / G;
#if defined(P2P_I16)
  const QuantX qx(X, M, in, G);
#endif
  over_rows(M, out, 4, [&](int64_t m, int64_t n, int64_t o) {
    const int8_t* w_o = W + o * in;
    const float* s_o = S + o * G;
    float* y_m = Y + m * out;
    if (m == 0) prefetch_row(S, o, G);
    with_rows<4>(n, [&](auto R) {
#if defined(P2P_I16)
      if (gs == 32)
        row_int8_i16<R, 32>(qx, m, w_o, s_o, y_m, gs, out, o);
      else
        row_int8_i16<R, 0>(qx, m, w_o, s_o, y_m, gs, out, o);
#else
      row_int8<R>(X + m * in, w_o, s_o, y_m, in, gs, out, o);
#endif
    });
  });
}

// Whether this build multiplies int8 weights in the split layout (pack_int8's).
bool int8_split_layout() {
#if defined(P2P_INT8_SPLIT)
  return true;
#else
  return false;
#endif
}

// Whether an int8 weight of `in` values a row in G groups takes the split layout here.
bool int8_splits(int64_t in, int64_t G) {
  if (G < 1 || in % G != 0) return false;
  const int64_t gs = in / G;
  return int8_split_layout() && in % 32 == 0 && (G == 1 || (gs & (gs - 1)) == 0);
}

// An int8 weight [out, in] (int8, or uint8 in the split layout) with its scales [out, G]:
// true for the split layout
static bool check_int8(const torch::Tensor& w, const torch::Tensor& scales) {
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && (w.scalar_type() == at::kChar || w.scalar_type() == at::kByte),
              "w: [out, in] int8, or uint8 in the split layout");
  TORCH_CHECK(scales.dim() == 2 && scales.size(0) == w.size(0) && scales.scalar_type() == at::kFloat &&
              scales.is_contiguous() && scales.size(1) >= 1 && w.size(1) % scales.size(1) == 0,
              "scales: [out, groups] fp32");
  const bool split = w.scalar_type() == at::kByte;
  TORCH_CHECK(!split || int8_splits(w.size(1), scales.size(1)), "this build or shape has no split int8 layout");
  return split;
}

// The int8 weight q [out, in] in the split layout, for rows whose groups `int8_splits` allows.
torch::Tensor pack_int8(torch::Tensor q, int64_t G) {
  TORCH_CHECK(q.dim() == 2 && q.is_contiguous() && q.scalar_type() == at::kChar, "q: [out, in] int8");
  const int64_t in = q.size(1), out = q.size(0);
  TORCH_CHECK(int8_splits(in, G), "no split int8 layout for ", in, " values in ", G, " groups");
  auto p = torch::empty({out, in}, q.options().dtype(at::kByte));
  const int8_t* Q = q.data_ptr<int8_t>();
  uint8_t* P = p.data_ptr<uint8_t>();
  std::vector<int64_t> at(in);
  for (int64_t i = 0; i < in; ++i) at[i] = split8_at(i, in);
  team::parallel_for(0, out, 64, [&](int64_t b, int64_t e) {
    for (int64_t o = b; o < e; ++o)
      for (int64_t i = 0; i < in; ++i) P[o * in + at[i]] = static_cast<uint8_t>(Q[o * in + i] + 128);
  });
  return p;
}

// x [M, in] fp32, w [out, in] int8 (or uint8 in the split layout), scales [out, groups]
// fp32 -> [M, out] fp32: Y[m, o] = sum_i X[m, i] * W[o, i] * scales[o, i / (in / groups)]
torch::Tensor gemv_int8(torch::Tensor x, torch::Tensor w, torch::Tensor scales) {
  const bool split = check_int8(w, scales);
  check_x(x, w.size(1));
  const int64_t M = x.size(0), in = w.size(1), out = w.size(0), G = scales.size(1);
  auto y = torch::empty({M, out}, x.options());
#if defined(P2P_INT8_SPLIT)
  if (split) {
    int8_split(x.data_ptr<float>(), w.data_ptr<uint8_t>(), scales.data_ptr<float>(), y.data_ptr<float>(), M, in,
               out, G);
    return y;
  }
#endif
  int8_rows(x.data_ptr<float>(), w.data_ptr<int8_t>(), scales.data_ptr<float>(), y.data_ptr<float>(), M, in, out, G);
  return y;
}

// The fp32 weight [out, in] an int8 one computes with, q * scale of its group: for a
// prefill chunk's GEMM (as dequantize_int4)
torch::Tensor dequantize_int8(torch::Tensor w, torch::Tensor scales) {
  const bool split = check_int8(w, scales);
  const int64_t in = w.size(1), out = w.size(0), G = scales.size(1), gs = in / G;
  auto d = torch::empty({out, in}, scales.options());
  const float* S = scales.data_ptr<float>();
  float* D = d.data_ptr<float>();
#if defined(P2P_INT8_SPLIT)
  if (split) {  // a block's 32 values are two runs of 16 (split8_at), its group's scale one
    const uint8_t* U = w.data_ptr<uint8_t>();
    const __m512 offset = _mm512_set1_ps(128.f);
    team::parallel_for(0, out, 16, [&](int64_t b, int64_t e) {
      for (int64_t o = b; o < e; ++o)
        for (int64_t quad = 0; quad < in; quad += 128) {
          const int64_t half = std::min<int64_t>(128, in - quad) / 2;
          const uint8_t* p = U + o * in + quad;
          for (int64_t k = 0; k < half / 16; ++k) {
            const __m512 sc = _mm512_set1_ps(S[o * G + (quad + 32 * k) / gs]);
            float* r = D + o * in + quad + 32 * k;
            for (const int64_t at : {16 * k, half + 16 * k}) {
              const __m512 v = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(load16(p + at)));
              _mm512_storeu_ps(r, _mm512_mul_ps(_mm512_sub_ps(v, offset), sc));
              r += 16;
            }
          }
        }
    });
    return d;
  }
#endif
  const int8_t* W = w.data_ptr<int8_t>();
  team::parallel_for(0, out, 16, [&](int64_t b, int64_t e) {
    for (int64_t o = b; o < e; ++o)
      for (int64_t g = 0; g < G; ++g) {
        const float sc = S[o * G + g];
        const int8_t* q = W + o * in + g * gs;
        float* r = D + o * in + g * gs;
        for (int64_t i = 0; i < gs; ++i) r[i] = static_cast<float>(q[i]) * sc;
      }
  });
  return d;
}

// ---------------------------------------------------------------------------- int4
// A row of an int4 weight is blocks of 32 values in 16 bytes, value j of a block in the
// low nibble of byte j and value 16 + j in its high nibble (GGUF's Q4_0/Q4_1 order), with
// per group of `gs` inputs a scale and minimum: W = q * scale + min, q in 0..15.
// Where AVX2 is, the nibbles are widened to int16 and multiplied into QuantX's rows; the
// portable loop turns each into its weight, q * scale + min, and multiplies floats. The scales and minima are fp16 (Q4_0/Q4_1's own) or fp32 where fp16 cannot hold them
// exactly (Q4_K's d * sc, an fp16 times a 6-bit integer): `S` is their element type.

template <int M, class S>
static void row_int4(const float* X, const uint8_t* w, const S* s, const S* mn, float* Y,
                     int64_t in, int64_t gs, int64_t out, int64_t o) {
  float r[M];
  for (int m = 0; m < M; ++m) r[m] = 0.f;
  for (int64_t i = 0; i < in; i += 32) {
    const float sc = to_float(s[i / gs]), mi = to_float(mn[i / gs]);
    float wv[32];
    for (int j = 0; j < 16; ++j) {
      const uint8_t b = w[i / 2 + j];
      wv[j] = static_cast<float>(b & 0x0F) * sc + mi;
      wv[16 + j] = static_cast<float>(b >> 4) * sc + mi;
    }
    for (int m = 0; m < M; ++m)
      for (int j = 0; j < 32; ++j) r[m] += wv[j] * X[m * in + i + j];
  }
  for (int m = 0; m < M; ++m) Y[m * out + o] = r[m];
}

#if defined(P2P_I16)
// X's group sums times the minima, sum_g min_g * sum(x in g), 8 groups a step: one at a
// time, its chain of dependent FMAs took as long as the row's products
template <class S>
static inline float minima_share(const S* mn, const float* gsum, int64_t G) {
  __m256 vm = _mm256_setzero_ps();
  int64_t h = 0;
  for (; h + 8 <= G; h += 8) vm = _mm256_fmadd_ps(load8(mn + h), _mm256_loadu_ps(gsum + h), vm);
  float shift = hsum(vm);
  for (; h < G; ++h) shift += to_float(mn[h]) * gsum[h];
  return shift;
}
#endif

#if defined(P2P_AVX512)
// One row of an int4 weight against rows m0.. of a QuantX: a pair of groups at a time, each
// 32-value block's low nibbles (its values 0-15) of both groups widened to one register of
// 32 int16 and its high nibbles (16-31) to another, matching QuantX's paired order; then
// the groups that keep X's order, a block's two nibble halves in one register.
// GS: the group size where the caller knows it at compile time (32: GGUF's Q4_0/Q4_1/Q4_K), else 0.
template <int M, int GS, class S>
static void row_int4_i16(const QuantX& qx, int64_t m0, const uint8_t* w, const S* s, const S* mn, float* Y,
                         int64_t gs_, int64_t G, int64_t out, int64_t o) {
  const int64_t gs = GS ? GS : gs_;
  const int16_t* xr[M];
  for (int m = 0; m < M; ++m) xr[m] = qx.row(m0 + m);
  const __m256i low = _mm256_set1_epi8(0x0F);
  __m512 a[M];
  for (int m = 0; m < M; ++m) a[m] = _mm512_setzero_ps();
  const int64_t paired = qx.layout == QuantX::paired ? G - G % 2 : 0;
  over_pairs<M>(qx, m0, s, paired, a, [&](int64_t g, __m512i acc[M]) __attribute__((always_inline)) {
    const uint8_t *wa = w + g * gs / 2, *wb = wa + gs / 2;
    for (int m = 0; m < M; ++m) acc[m] = _mm512_setzero_si512();
    for (int64_t j = 0; j < gs; j += 32) {
      const __m256i b = join(load16(wa + j / 2), load16(wb + j / 2));
      const __m512i lo = _mm512_cvtepu8_epi16(_mm256_and_si256(b, low));
      const __m512i hi = _mm512_cvtepu8_epi16(_mm256_and_si256(_mm256_srli_epi16(b, 4), low));
      for (int m = 0; m < M; ++m) {
        const int16_t* x = xr[m] + g * gs + 2 * j;
        acc[m] = dot32(dot32(acc[m], lo, x), hi, x + 32);
      }
    }
  });
  int64_t g = paired;
  for (; g < G; ++g) {
    __m512i acc[M];
    for (int m = 0; m < M; ++m) acc[m] = _mm512_setzero_si512();
    for (int64_t i = g * gs; i < (g + 1) * gs; i += 32) {
      const __m128i b = load16(w + i / 2), low16 = _mm256_castsi256_si128(low);
      const __m512i wv = _mm512_cvtepu8_epi16(join(_mm_and_si128(b, low16), _mm_and_si128(_mm_srli_epi16(b, 4), low16)));
      for (int m = 0; m < M; ++m) acc[m] = dot32(acc[m], wv, xr[m] + i);
    }
    const float sc = to_float(s[g]);
    for (int m = 0; m < M; ++m)
      a[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[m]), _mm512_set1_ps(sc * qx.xs(m0 + m, g)), a[m]);
  }
  for (int m = 0; m < M; ++m)
    Y[m * out + o] = _mm512_reduce_add_ps(a[m]) + minima_share(mn, qx.gsum.data() + (m0 + m) * G, G);
}
#elif defined(P2P_I16)
// One row of an int4 weight against rows m0.. of a QuantX: a block's nibbles widened to
// int16 (two registers of 16), a madd each per row of X, two groups at a time where M is
// 1 (as row_int8_i16); the minima multiply X's group sums
template <int M>
static inline __attribute__((always_inline)) void int4_group(const QuantX& qx, int64_t m0, const uint8_t* w,
                                                              int64_t g0, int64_t g1, __m256 p[M]) {
  const __m128i low = _mm_set1_epi8(0x0F);
  __m256i ai[M];  // a group is at most I16_RUN values (gemv_int4 checks)
  for (int m = 0; m < M; ++m) ai[m] = _mm256_setzero_si256();
  for (int64_t i = g0; i < g1; i += 32) {
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + i / 2));
    const __m256i lo = _mm256_cvtepu8_epi16(_mm_and_si128(b, low));
    const __m256i hi = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(b, 4), low));
    for (int m = 0; m < M; ++m) {
      const __m256i* x = reinterpret_cast<const __m256i*>(qx.row(m0 + m) + i);
      ai[m] = _mm256_add_epi32(ai[m], _mm256_add_epi32(_mm256_madd_epi16(lo, _mm256_loadu_si256(x)),
                                                       _mm256_madd_epi16(hi, _mm256_loadu_si256(x + 1))));
    }
  }
  for (int m = 0; m < M; ++m) p[m] = _mm256_cvtepi32_ps(ai[m]);
}

template <int M, class S>
static void row_int4_i16(const QuantX& qx, int64_t m0, const uint8_t* w, const S* s, const S* mn, float* Y,
                         int64_t gs, int64_t G, int64_t out, int64_t o) {
  __m256 a0[M], a1[M];  // a1: odd groups' where M is 1
  for (int m = 0; m < M; ++m) a0[m] = a1[m] = _mm256_setzero_ps();
  int64_t g = 0;
  if constexpr (M == 1)
    for (; g + 2 <= G; g += 2) {
      __m256 p0[1], p1[1];
      int4_group<1>(qx, m0, w, g * gs, (g + 1) * gs, p0);
      int4_group<1>(qx, m0, w, (g + 1) * gs, (g + 2) * gs, p1);
      a0[0] = _mm256_fmadd_ps(p0[0], _mm256_set1_ps(to_float(s[g]) * qx.xs(m0, g)), a0[0]);
      a1[0] = _mm256_fmadd_ps(p1[0], _mm256_set1_ps(to_float(s[g + 1]) * qx.xs(m0, g + 1)), a1[0]);
    }
  for (; g < G; ++g) {
    __m256 p[M];
    int4_group<M>(qx, m0, w, g * gs, (g + 1) * gs, p);
    const float sc = to_float(s[g]);
    for (int m = 0; m < M; ++m) a0[m] = _mm256_fmadd_ps(p[m], _mm256_set1_ps(sc * qx.xs(m0 + m, g)), a0[m]);
  }
  for (int m = 0; m < M; ++m)
    Y[m * out + o] = hsum(_mm256_add_ps(a0[m], a1[m])) + minima_share(mn, qx.gsum.data() + (m0 + m) * G, G);
}
#endif

#if defined(P2P_INT4_SPLIT)
// where the O weight rows o.. of an int4 weight (or int8 in its split layout, which has no
// minima: N null) keep their values, scales and minima; the first pass over them (X's first
// rows) fetches the scales and minima ahead (prefetch_row)
template <int O, class S>
struct SplitRows {
  const uint8_t* w[O];
  const S *s[O], *mn[O];
  SplitRows(const uint8_t* W, const S* Sc, const S* N, int64_t row_bytes, int64_t G, int64_t o, bool first) {
    for (int r = 0; r < O; ++r)
      w[r] = W + (o + r) * row_bytes, s[r] = Sc + (o + r) * G, mn[r] = N ? N + (o + r) * G : nullptr;
    if (first)
      for (int r = 0; r < O; ++r) {
        prefetch_row(Sc, o + r, G);
        if (N) prefetch_row(N, o + r, G);
      }
  }
};
#endif

#if defined(P2P_INT4_SPLIT) && defined(P2P_AVX512)
// O rows o.. of an int4 weight (or an int8 one in its split layout: Int8) against rows
// m0.. of a QuantX in its split layout, a quad of four blocks (128 values) at a time: the
// bytes' low nibbles are values 0-15 of each block and their high nibbles 16-31 (int8: its
// quad's first and second 64 bytes), as QuantX splits X, so each row of X takes four
// `vpdpbusd` (hi and lo of X, against both halves) per weight row, its loads shared by the
// O weight rows. Lane l of a quad's int32 sums holds values of block l / 4, so its group
// within a window of 16 groups (whose scales are multiplied at once, as in over_pairs, and
// whose minima times X's group sums join the accumulators there) is (128 k + 32 (l / 4))
// >> log2(gs) for the window's quad k: gs is a power of two here, or the whole row (G 1).
// A last part quad is loaded masked; X's padding is zeros.
template <int M, int O, class S, bool Int8 = false>
static inline void split_rows(const QuantX& qx, int64_t m0, const SplitRows<O, S>& rows, float* Y, int64_t gs,
                              int64_t out, int64_t o) {
  const int64_t in = qx.in, G = qx.G, row_bytes = Int8 ? in : in / 2;
  const int shift = G == 1 ? 31 : __builtin_ctzll(gs);
  // reading O rows a quad at a time hops between them, which the hardware prefetcher does
  // not follow as it does one row's stream: each quad fetches its place two passes on into
  // L1, and its place in the next block of 16 rows into L2. The first alone kept only as
  // many lines in flight as L1 tracks misses, too few to cover memory's latency at the
  // loop's pace; L2 tracks more, and a line it holds reaches L1 in time.
  const int64_t ahead = 2 * O * row_bytes, far = 16 * row_bytes;
  const int8_t* xr[M];
  for (int m = 0; m < M; ++m) xr[m] = qx.split_row(m0 + m);
  const __m512i low = _mm512_set1_epi8(0x0F), zero = _mm512_setzero_si512();
#if defined(__GFNI__)
  // GF(2) affine map of each byte: bit i of the result is bit i + 4 of the byte (i < 4), 0 above
  const __m512i high_nibble = _mm512_set1_epi64(0x1020408000000000);
#endif
  const __m512i first = _mm512_set_epi32(96, 96, 96, 96, 64, 64, 64, 64, 32, 32, 32, 32, 0, 0, 0, 0);
  __m512 a[O][M];
  for (int r = 0; r < O; ++r)
    for (int m = 0; m < M; ++m) a[r][m] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; g += 16) {
    const int64_t n = std::min<int64_t>(16, G - g);
    __m512 c[O][M];
    for (int m = 0; m < M; ++m) {
      const __m512 sx = load16_ps(qx.scale.data() + (m0 + m) * G + g, n);
      if constexpr (Int8) {  // the offset's share: -128 * scale * qsum
        const __m512 sum = _mm512_mul_ps(load16_ps(qx.qsum.data() + (m0 + m) * G + g, n), _mm512_set1_ps(-128.f));
        for (int r = 0; r < O; ++r) {
          const __m512 sw = load16_ps(rows.s[r] + g, n);
          c[r][m] = _mm512_mul_ps(sw, sx), a[r][m] = _mm512_fmadd_ps(sw, sum, a[r][m]);
        }
      } else {
        const __m512 sum = load16_ps(qx.gsum.data() + (m0 + m) * G + g, n);
        for (int r = 0; r < O; ++r) {
          c[r][m] = _mm512_mul_ps(load16_ps(rows.s[r] + g, n), sx);
          a[r][m] = _mm512_fmadd_ps(load16_ps(rows.mn[r] + g, n), sum, a[r][m]);
        }
      }
    }
    const int64_t k1 = (std::min((g + 16) * gs, in) + 127) / 128;
    __m512i at = first;
    for (int64_t k = g * gs / 128; k < k1; ++k, at = _mm512_add_epi32(at, _mm512_set1_epi32(128))) {
      __m512i lo[O], hi[O];  // values 0-15 of each block, and 16-31
      const int64_t half = std::min<int64_t>(128, in - k * 128) / 2;  // int8: bytes of each
      for (int r = 0; r < O; ++r) {
        if constexpr (Int8) {
          const uint8_t* p = rows.w[r] + k * 128;
          if (half == 64) {
            lo[r] = _mm512_loadu_si512(p), hi[r] = _mm512_loadu_si512(p + 64);
            _mm_prefetch(reinterpret_cast<const char*>(p + 64 + ahead), _MM_HINT_T0);
            _mm_prefetch(reinterpret_cast<const char*>(p + 64 + far), _MM_HINT_T1);
          } else {
            const __mmask64 part = (1ULL << half) - 1;
            lo[r] = _mm512_maskz_loadu_epi8(part, p), hi[r] = _mm512_maskz_loadu_epi8(part, p + half);
          }
          _mm_prefetch(reinterpret_cast<const char*>(p + ahead), _MM_HINT_T0);
          _mm_prefetch(reinterpret_cast<const char*>(p + far), _MM_HINT_T1);
        } else {
          const int64_t nb = (in - k * 128) / 2;
          const __m512i b = nb >= 64 ? _mm512_loadu_si512(rows.w[r] + k * 64)
                                     : _mm512_maskz_loadu_epi8((1ULL << nb) - 1, rows.w[r] + k * 64);
          lo[r] = _mm512_and_si512(b, low);
#if defined(__GFNI__)  // one instruction for the shift and the mask: the loop is bound by instructions
          hi[r] = _mm512_gf2p8affine_epi64_epi8(b, high_nibble, 0);
#else
          hi[r] = _mm512_and_si512(_mm512_srli_epi16(b, 4), low);
#endif
          _mm_prefetch(reinterpret_cast<const char*>(rows.w[r] + k * 64 + ahead), _MM_HINT_T0);
          _mm_prefetch(reinterpret_cast<const char*>(rows.w[r] + k * 64 + far), _MM_HINT_T1);
        }
      }
      const __m512i pick = _mm512_srli_epi32(at, shift);
      for (int m = 0; m < M; ++m) {
        const int8_t* x = xr[m] + k * 256;
        const __m512i x0 = _mm512_loadu_si512(x), x1 = _mm512_loadu_si512(x + 64);
        const __m512i x2 = _mm512_loadu_si512(x + 128), x3 = _mm512_loadu_si512(x + 192);
        for (int r = 0; r < O; ++r) {
          const __m512i h = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(zero, lo[r], x0), hi[r], x1);
          // lo's products accumulate onto hi's, shifted: 256 hi + lo without an add
          const __m512i sums = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_slli_epi32(h, 8), lo[r], x2), hi[r], x3);
          a[r][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), _mm512_permutexvar_ps(pick, c[r][m]), a[r][m]);
        }
      }
    }
  }
  for (int r = 0; r < O; ++r)
    for (int m = 0; m < M; ++m) Y[(m0 + m) * out + o + r] = _mm512_reduce_add_ps(a[r][m]);
}
#elif defined(P2P_INT4_SPLIT)
// AVX2's split_rows, for int4 only (an int8 value plus 128 times a byte of X, twice, can
// pass `vpmaddubsw`'s int16 saturation): half a quad (two blocks, 32 bytes) at a time.
// `vpmaddubsw` multiplies its 32 nibbles by 32 bytes of X and adds pairs into int16: a nibble's two
// products with hi and with lo of X, each at most 2 * 15 * 128 in a pair, sum within
// int16; `vpmaddwd` by 256 and by 1 joins hi's and lo's into int32, lanes 0-3 holding the
// first block's values and 4-7 the second's. Windows of 8 groups, as 16 on AVX-512; a
// row's last window is its last 8 groups, overlapping the one before, so that its scales
// are whole vectors too (AVX2 has no 16-bit masked load), and the minima join once a row.
template <int M, int O, class S, bool Int8 = false>
static inline void split_rows(const QuantX& qx, int64_t m0, const SplitRows<O, S>& rows, float* Y, int64_t gs,
                              int64_t out, int64_t o) {
  static_assert(!Int8, "int8's split layout is AVX-512 VNNI's");
  const int64_t in = qx.in, G = qx.G;
  const int shift = __builtin_ctzll(gs);
  const int64_t ahead = 2 * O * (in / 2);  // as on AVX-512: rows hop, so each fetches its place two passes on
  const int8_t* xr[M];
  for (int m = 0; m < M; ++m) xr[m] = qx.split_row(m0 + m);
  const __m256i low = _mm256_set1_epi8(0x0F), by256 = _mm256_set1_epi16(256), ones = _mm256_set1_epi16(1);
  const __m256i second = _mm256_set_epi32(32, 32, 32, 32, 0, 0, 0, 0);
  __m256 a[O][M];
  for (int r = 0; r < O; ++r)
    for (int m = 0; m < M; ++m) a[r][m] = _mm256_setzero_ps();
  for (int64_t g = 0; g < G; g += 8) {
    const int64_t g0 = std::max<int64_t>(0, std::min(g, G - 8)), n = std::min<int64_t>(8, G - g0);
    __m256 c[O][M];
    for (int m = 0; m < M; ++m) {
      const __m256 sx = load8(qx.scale.data() + (m0 + m) * G + g0, n);
      for (int r = 0; r < O; ++r) c[r][m] = _mm256_mul_ps(load8(rows.s[r] + g0, n), sx);
    }
    const int64_t h1 = (std::min((g + 8) * gs, in) + 63) / 64;
    for (int64_t h = g * gs / 64; h < h1; ++h) {  // half h of quad h / 2: values 64 h..
      __m256i lo[O], hi[O];
      for (int r = 0; r < O; ++r) {
        const uint8_t* p = rows.w[r] + h * 32;
        // a row is whole blocks, so a last half holds one or two
        const __m256i b = in - h * 64 >= 64 ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))
                                            : _mm256_zextsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
        lo[r] = _mm256_and_si256(b, low), hi[r] = _mm256_and_si256(_mm256_srli_epi16(b, 4), low);
        _mm_prefetch(reinterpret_cast<const char*>(p + ahead), _MM_HINT_T0);
      }
      const __m256i pick = _mm256_sub_epi32(_mm256_srli_epi32(_mm256_add_epi32(second, _mm256_set1_epi32(64 * h)), shift),
                                            _mm256_set1_epi32(static_cast<int>(g0)));
      for (int m = 0; m < M; ++m) {
        const int8_t* x = xr[m] + (h >> 1) * 256 + (h & 1) * 32;
        const __m256i x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x));
        const __m256i x1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 64));
        const __m256i x2 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 128));
        const __m256i x3 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 192));
        for (int r = 0; r < O; ++r) {
          const __m256i h16 = _mm256_add_epi16(_mm256_maddubs_epi16(lo[r], x0), _mm256_maddubs_epi16(hi[r], x1));
          const __m256i l16 = _mm256_add_epi16(_mm256_maddubs_epi16(lo[r], x2), _mm256_maddubs_epi16(hi[r], x3));
          const __m256i sums = _mm256_add_epi32(_mm256_madd_epi16(h16, by256), _mm256_madd_epi16(l16, ones));
          a[r][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), _mm256_permutevar8x32_ps(c[r][m], pick), a[r][m]);
        }
      }
    }
  }
  for (int r = 0; r < O; ++r)
    for (int m = 0; m < M; ++m)
      Y[(m0 + m) * out + o + r] = hsum(a[r][m]) + minima_share(rows.mn[r], qx.gsum.data() + (m0 + m) * G, G);
}
#endif

#if defined(P2P_INT4_SPLIT)
// X [M, in] times an int4 W [out, in / 2] (or an int8 one in its split layout [out, in]:
// Int8, N null) into Y [M, out] through split_rows: 16 weight rows at a time against every
// tile of X's rows (so they stay in L1 while X passes), several weight rows a pass where
// few rows of X leave registers free
template <class S, bool Int8 = false>
static void split_gemv(const float* X, const uint8_t* W, const S* Sc, const S* N, float* Y, int64_t M, int64_t in,
                       int64_t out, int64_t G) {
#if defined(P2P_AVX512)
  constexpr int tile = 8, block = 16;
#else
  constexpr int tile = 4, block = 16;
#endif
  const int64_t gs = in / G;
  const QuantX qx(X, M, in, G, true);
  team::parallel_for(0, out, block, [&](int64_t b, int64_t e) {
    for (int64_t o0 = b; o0 < e; o0 += block) {
      const int64_t o1 = std::min(e, o0 + block);
      for (int64_t m = 0; m < M; m += tile)
        with_rows<tile>(std::min<int64_t>(tile, M - m), [&](auto R) {
#if defined(P2P_AVX512)
          constexpr int O = R == 1 ? 4 : R <= 4 ? 2 : 1;
#else
          constexpr int O = R == 1 ? 4 : 1;
#endif
          const int64_t row_bytes = Int8 ? in : in / 2;
          int64_t o = o0;
          for (; o + O <= o1; o += O)
            split_rows<R, O, S, Int8>(qx, m, SplitRows<O, S>(W, Sc, N, row_bytes, G, o, m == 0), Y, gs, out, o);
          for (; o < o1; ++o)
            split_rows<R, 1, S, Int8>(qx, m, SplitRows<1, S>(W, Sc, N, row_bytes, G, o, m == 0), Y, gs, out, o);
        });
    }
  });
}
#endif

#if defined(P2P_INT8_SPLIT)
static void int8_split(const float* X, const uint8_t* W, const float* S, float* Y, int64_t M, int64_t in,
                       int64_t out, int64_t G) {
  split_gemv<float, true>(X, W, S, nullptr, Y, M, in, out, G);
}
#endif

// x [M, in] fp32, w [out, in / 2] uint8 (blocks as above), scales and mins [out, groups]
// fp16 or fp32 (both the same) -> [M, out] fp32
template <class S>
static void int4_rows(const float* X, const uint8_t* W, const S* Sc, const S* N, float* Y, int64_t M, int64_t in,
                      int64_t out, int64_t G) {
  const int64_t gs = in / G;
  // AVX-512's 32 registers hold the accumulators (int32 and float) of 8 activation rows;
  // AVX2's 16 and the portable loop those of 4
#if defined(P2P_AVX512)
  constexpr int tile = 8;
#else
  constexpr int tile = 4;
#endif
#if defined(P2P_INT4_SPLIT)
  if ((gs & (gs - 1)) == 0) return split_gemv(X, W, Sc, N, Y, M, in, out, G);
#endif
#if defined(P2P_I16)
  const QuantX qx(X, M, in, G);
#endif
  over_rows(M, out, tile, [&](int64_t m, int64_t n, int64_t o) {
    const uint8_t* w_o = W + o * (in / 2);
    const S *s_o = Sc + o * G, *n_o = N + o * G;
    float* y_m = Y + m * out;
    if (m == 0) prefetch_row(Sc, o, G), prefetch_row(N, o, G);
    with_rows<tile>(n, [&](auto R) {
#if defined(P2P_AVX512)
      if (gs == 32)
        row_int4_i16<R, 32>(qx, m, w_o, s_o, n_o, y_m, gs, G, out, o);
      else
        row_int4_i16<R, 0>(qx, m, w_o, s_o, n_o, y_m, gs, G, out, o);
#elif defined(P2P_I16)
      row_int4_i16<R>(qx, m, w_o, s_o, n_o, y_m, gs, G, out, o);
#else
      row_int4<R>(X + m * in, w_o, s_o, n_o, y_m, in, gs, out, o);
#endif
    });
  });
}

static void check_int4(const torch::Tensor& w, const torch::Tensor& scales, const torch::Tensor& mins) {
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && w.scalar_type() == at::kByte, "w: [out, in / 2] uint8");
  const int64_t in = w.size(1) * 2, out = w.size(0);
  const auto st = scales.scalar_type();
  TORCH_CHECK(scales.dim() == 2 && scales.size(0) == out && (st == at::kHalf || st == at::kFloat) &&
              scales.is_contiguous() && mins.sizes() == scales.sizes() && mins.scalar_type() == st &&
              mins.is_contiguous(), "scales, mins: [out, groups], both fp16 or both fp32");
  const int64_t G = scales.size(1);
  TORCH_CHECK(G >= 1 && in % G == 0 && (in / G) % 32 == 0 && in / G <= 1024,
              "groups of a multiple of 32 inputs, at most 1024");
}

torch::Tensor gemv_int4(torch::Tensor x, torch::Tensor w, torch::Tensor scales, torch::Tensor mins) {
  check_int4(w, scales, mins);
  const int64_t in = w.size(1) * 2, out = w.size(0), G = scales.size(1);
  check_x(x, in);
  const int64_t M = x.size(0);
  auto y = torch::empty({M, out}, x.options());
  const float* X = x.data_ptr<float>();
  const uint8_t* W = w.data_ptr<uint8_t>();
  float* Y = y.data_ptr<float>();
  if (scales.scalar_type() == at::kHalf)
    int4_rows(X, W, scales.data_ptr<c10::Half>(), mins.data_ptr<c10::Half>(), Y, M, in, out, G);
  else
    int4_rows(X, W, scales.data_ptr<float>(), mins.data_ptr<float>(), Y, M, in, out, G);
  return y;
}

// The fp32 weight [out, in] an int4 one computes with, q * scale + min: for a GEMM over
// many rows of X (a prefill chunk), where a library's blocked GEMM outruns gemv_int4's
// scaling of every pair of groups for every row, by more than writing this out costs
template <class S>
static void dequantize_int4_rows(const uint8_t* W, const S* Sc, const S* N, float* D, int64_t in, int64_t out,
                                 int64_t G) {
  const int64_t gs = in / G;
  team::parallel_for(0, out, 16, [&](int64_t b, int64_t e) {
    for (int64_t o = b; o < e; ++o) {
      const uint8_t* w = W + o * (in / 2);
      float* d = D + o * in;
      for (int64_t g = 0; g < G; ++g) {
        const float sc = to_float(Sc[o * G + g]), mn = to_float(N[o * G + g]);
        for (int64_t i = g * gs; i < (g + 1) * gs; i += 32)  // a block: low nibbles 0-15, high 16-31
          for (int j = 0; j < 16; ++j) {
            const uint8_t byte = w[i / 2 + j];
            d[i + j] = static_cast<float>(byte & 0x0F) * sc + mn;
            d[i + j + 16] = static_cast<float>(byte >> 4) * sc + mn;
          }
      }
    }
  });
}

torch::Tensor dequantize_int4(torch::Tensor w, torch::Tensor scales, torch::Tensor mins) {
  check_int4(w, scales, mins);
  const int64_t in = w.size(1) * 2, out = w.size(0), G = scales.size(1);
  auto d = torch::empty({out, in}, scales.options().dtype(at::kFloat));
  if (scales.scalar_type() == at::kHalf)
    dequantize_int4_rows(w.data_ptr<uint8_t>(), scales.data_ptr<c10::Half>(), mins.data_ptr<c10::Half>(),
                         d.data_ptr<float>(), in, out, G);
  else
    dequantize_int4_rows(w.data_ptr<uint8_t>(), scales.data_ptr<float>(), mins.data_ptr<float>(),
                         d.data_ptr<float>(), in, out, G);
  return d;
}
