// The row kernels declared in depthwise.h, written once for any x86 ISA with GCC vector
// extensions: one `vec` is one register of the ISA this file is compiled for. build.py compiles it
// three times, -DVAN_ISA=avx512|avx2|avx.
//
// Layout is NHWC, so a pixel's channels are contiguous: every inner loop runs over a vector of
// channels at a time, and the channel count's remainder (C % kLanes) takes a scalar path.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "depthwise.h"

#ifndef VAN_ISA
#error "compile once per ISA with -DVAN_ISA=avx512|avx2|avx"
#endif
#define VAN_STR2(x) #x
#define VAN_STR(x) VAN_STR2(x)

namespace van_kernels {
namespace VAN_ISA {
namespace {

// One vector register of floats: 16 with AVX-512, 8 with AVX2/AVX (GCC splits wider generic
// vectors into several registers badly: the AVX2 build ran 2-3x slower with 16-wide vectors).
#ifdef __AVX512F__
constexpr int kLanes = 16;
#else
constexpr int kLanes = 8;
#endif
typedef float vec __attribute__((vector_size(4 * kLanes)));
typedef int32_t veci __attribute__((vector_size(4 * kLanes)));

inline vec load(const float* p) {
  vec v;
  std::memcpy(&v, p, sizeof v);  // an unaligned vector load
  return v;
}
inline void store(float* p, vec v) { std::memcpy(p, &v, sizeof v); }
inline vec splat(float x) { return vec{} + x; }
inline vec as_float(veci v) { return (vec)v; }  // bit casts between same-size vectors
inline veci as_int(vec v) { return (veci)v; }

// 1/q: the hardware estimate (14 bits with AVX-512, 12 with AVX) and one Newton step (~28 and
// ~23 bits); a divide costs several times more and dominated the fused GELU.
inline vec reciprocal(vec q) {
#ifdef __AVX512F__
  const vec r = (vec)_mm512_rcp14_ps((__m512)q);
#else
  const vec r = (vec)_mm256_rcp_ps((__m256)q);
#endif
  return r * (2.0f - q * r);
}

// Eigen's generic_fast_erf_float (the rational approximation TensorFlow's Erf op uses on CPU),
// accurate to 3 ulp; |x| >= 3.8325 rounds to +-1.
constexpr float kErfClamp = 3.832506856900711f;
inline vec erf_ratio(vec x) {
  const vec x2 = x * x;
  vec p = x2 * 0.00022905065861350646f + 0.0034082910107109506f;
  p = x2 * p + 0.050955695062380861f;
  p = x2 * p + 0.18520832239976145f;
  p = x2 * p + 1.128379143519084f;
  p = x * p;
  vec q = x2 * -1.1791602954361697e-7f + 0.000023547966471313185f;
  q = x2 * q + 0.0010179625278914885f;
  q = x2 * q + 0.014070470171167667f;
  q = x2 * q + 0.11098505178285362f;
  q = x2 * q + 0.49746925110067538f;
  q = x2 * q + 1.0f;
  return p * reciprocal(q);
}
inline vec erf(vec x) {
  const veci bits = as_int(x);
  const vec sign_one = as_float((bits & int32_t(0x80000000)) | 0x3f800000);  // +-1.0f
  const veci saturated = as_float(bits & 0x7fffffff) >= kErfClamp;
  return saturated ? sign_one : erf_ratio(x);
}

// Cephes' expf: exp(x) = 2^n * exp(r), |r| <= ln2/2, degree-6 polynomial; ~1 ulp for x <= 88
// (callers pass -z^2/2); below -87.3 it returns 2^-126 times ~1, not a denormal.
inline vec exp(vec x) {
  x = x < -87.33654f ? splat(-87.33654f) : x;
  x = x > 88.0f ? splat(88.0f) : x;  // 2^n stays finite: n <= 127
  const vec fx = x * 1.44269504088896341f + 0.5f;
  veci n = __builtin_convertvector(fx, veci);  // truncates toward zero: make it floor
  n += __builtin_convertvector(n, vec) > fx;   // true is -1
  const vec nf = __builtin_convertvector(n, vec);
  const vec r = x - nf * 0.693359375f - nf * -2.12194440e-4f;
  vec y = r * 1.9875691500e-4f + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * (r * r) + r + 1.0f;
  return y * as_float((n + 127) << 23);  // 2^n
}

constexpr float kInvSqrt2 = 0.70710678118654752f;
constexpr float kInvSqrt2Pi = 0.39894228040143268f;

inline vec gelu(vec z) { return z * (0.5f + 0.5f * erf(z * kInvSqrt2)); }
inline float gelu(float z) { return z * (0.5f + 0.5f * std::erf(z * kInvSqrt2)); }

// d/dz z*Phi(z) = Phi(z) + z*phi(z)
inline vec gelu_slope(vec z) {
  return 0.5f + 0.5f * erf(z * kInvSqrt2) + z * exp(-0.5f * z * z) * kInvSqrt2Pi;
}
inline float gelu_slope(float z) {
  return 0.5f + 0.5f * std::erf(z * kInvSqrt2) + z * std::exp(-0.5f * z * z) * kInvSqrt2Pi;
}

inline int tap_index(const Geometry& g, int i, int j, bool flip) {
  return flip ? (g.kh - 1 - i) * g.kw + (g.kw - 1 - j) : i * g.kw + j;
}

// A tile is T output pixels x B vectors of channels, T*B accumulators: each filter tap's B
// loads are shared by T pixels, and the B vectors of one pixel are adjacent in memory (constant
// displacements from one pointer, so wide layers don't run out of address registers).
constexpr int kAccumulators = 8;  // of 32 vector registers (AVX-512) or 16 (AVX2, AVX)

template <int T, int B>
struct Tile {
  vec acc[T][B];

  void init(const float* bias) {
    for (int b = 0; b < B; ++b) {
      const vec v = bias ? load(bias + kLanes * b) : vec{};
      for (int t = 0; t < T; ++t) acc[t][b] = v;
    }
  }

  // acc[t] += in[w + t] * k for the pixels whose input w + t lies inside the row.
  void tap(const float* irow, const float* k, int w, int W, int C) {
    vec kv[B];
    for (int b = 0; b < B; ++b) kv[b] = load(k + kLanes * b);
    if (w >= 0 && w + T <= W) {
      const float* p = irow + int64_t(w) * C;
      for (int t = 0; t < T; ++t, p += C)
        for (int b = 0; b < B; ++b) acc[t][b] += load(p + kLanes * b) * kv[b];
    } else {  // near the left or right edge: taps in the padding add nothing
      for (int t = 0; t < T; ++t) {
        if (unsigned(w + t) >= unsigned(W)) continue;
        const float* p = irow + int64_t(w + t) * C;
        for (int b = 0; b < B; ++b) acc[t][b] += load(p + kLanes * b) * kv[b];
      }
    }
  }

  void store_to(float* out, int C, bool apply_gelu) {
    for (int t = 0; t < T; ++t)
      for (int b = 0; b < B; ++b) {
        const vec v = acc[t][b];
        store(out + int64_t(t) * C + kLanes * b, apply_gelu ? gelu(v) : v);
      }
  }
};

// What one output row's taps read: the filter rows whose input row lies inside the image.
struct RowTaps {
  const float* const* irows;  // input rows
  const float* const* krows;  // filter rows (their first tap, or last when flipped)
  int rows, kw, kstep, d, rw, W, C;
};

// Channels [cb, cb + B * kLanes) of output pixels [w0, w0 + T).
template <int T, int B>
void conv_tile(const RowTaps& r, const float* bias, int w0, int cb, bool apply_gelu, float* out) {
  Tile<T, B> tile;
  tile.init(bias ? bias + cb : nullptr);
  for (int i = 0; i < r.rows; ++i) {
    const float* irow = r.irows[i] + cb;
    const float* krow = r.krows[i] + cb;
    for (int j = 0; j < r.kw; ++j) {
      tile.tap(irow, krow + int64_t(j) * r.kstep, w0 + (j - r.rw) * r.d, r.W, r.C);
    }
  }
  tile.store_to(out, r.C, apply_gelu);
}

// All full vectors of channels of one output row, B at a time, T pixels per tile.
template <int B>
void conv_row_blocks(const RowTaps& r, const float* bias, int cfull, bool apply_gelu, float* orow) {
  constexpr int T = kAccumulators / B;
  for (int w0 = 0; w0 < r.W; w0 += T) {
    for (int cb = 0; cb + kLanes * B <= cfull; cb += kLanes * B) {
      float* out = orow + int64_t(w0) * r.C + cb;
      if (w0 + T <= r.W) {
        conv_tile<T, B>(r, bias, w0, cb, apply_gelu, out);
      } else {
        for (int w = w0; w < r.W; ++w) {  // the row's last pixels, one at a time
          conv_tile<1, B>(r, bias, w, cb, apply_gelu, out + int64_t(w - w0) * r.C);
        }
      }
    }
  }
}

void conv_rows(const float* in, int in_row0, const float* k, const float* bias, float* out,
               const Geometry& g, bool flip, bool apply_gelu, int h_begin, int h_end) {
  const int H = g.height, W = g.width, C = g.channels, d = g.dilation;
  const int rh = g.kh / 2, rw = g.kw / 2;
  const int64_t WC = int64_t(W) * C;
  const int blocks = C / kLanes;
  const int cfull = blocks * kLanes;
  // Tile shape, measured on every VAN-b0 layer, 16 images, one thread:
  // AVX-512: 2 vectors x 4 pixels wherever the channels allow (56x56x256: 1.9x faster than
  // 1 x 8, as fast as 8 x 1; 14x14x640 and 7x7x1024: 1.3x faster than 8 x 1). AVX2/AVX: as many
  // vectors as divide the row, up to 8 (1 pixel): wide layers then stream a pixel's channels
  // contiguously (56x56x256 and 28x28x512: 2x faster than 2 x 4) and a b0 step's depthwise
  // convs take 0.6x the time; narrow ones still share each tap over 2-4 pixels.
#ifdef __AVX512F__
  const int B = blocks % 2 == 0 ? 2 : 1;
#else
  const int B = blocks % 8 == 0 ? 8 : blocks % 4 == 0 ? 4 : blocks % 2 == 0 ? 2 : 1;
#endif
  std::vector<const float*> irows(g.kh), krows(g.kh);
  // Flipping the filter (the input gradient) walks its taps backwards: krows point at the last
  // tap of each flipped row and kstep is negative.
  RowTaps r{irows.data(), krows.data(), 0, g.kw, flip ? -C : C, d, rw, W, C};
  for (int h = h_begin; h < h_end; ++h) {
    float* orow = out + int64_t(h - h_begin) * WC;
    r.rows = 0;
    for (int i = 0; i < g.kh; ++i) {
      const int hin = h + (i - rh) * d;
      if (hin < 0 || hin >= H) continue;
      irows[r.rows] = in + int64_t(hin - in_row0) * WC;
      krows[r.rows] = k + int64_t(tap_index(g, i, 0, flip)) * C;
      ++r.rows;
    }
    switch (B) {
      case 8: conv_row_blocks<8>(r, bias, cfull, apply_gelu, orow); break;
      case 4: conv_row_blocks<4>(r, bias, cfull, apply_gelu, orow); break;
      case 2: conv_row_blocks<2>(r, bias, cfull, apply_gelu, orow); break;
      default: conv_row_blocks<1>(r, bias, cfull, apply_gelu, orow);
    }
    for (int c = cfull; c < C; ++c) {
      for (int w = 0; w < W; ++w) {
        float a = bias ? bias[c] : 0.f;
        for (int i = 0; i < r.rows; ++i) {
          for (int j = 0; j < g.kw; ++j) {
            const int win = w + (j - rw) * d;
            if (win < 0 || win >= W) continue;
            a += irows[i][int64_t(win) * C + c] * krows[i][int64_t(j) * r.kstep + c];
          }
        }
        orow[int64_t(w) * C + c] = apply_gelu ? gelu(a) : a;
      }
    }
  }
}

// One filter tap over one row, for NB vectors of channels from `x` and `dz` on: the sums over the
// row stay in NB registers, then go to `dk` once.
template <int NB>
void tap_sums(const float* x, const float* dz, float* dk, int C, int lo, int hi, int offset) {
  vec a[NB];
  for (int b = 0; b < NB; ++b) a[b] = vec{};
  for (int w = lo; w < hi; ++w) {
    const float* p = x + int64_t(w + offset) * C;
    const float* q = dz + int64_t(w) * C;
    for (int b = 0; b < NB; ++b) a[b] += load(p + kLanes * b) * load(q + kLanes * b);
  }
  for (int b = 0; b < NB; ++b) store(dk + kLanes * b, load(dk + kLanes * b) + a[b]);
}

using TapSumsFn = void (*)(const float*, const float*, float*, int, int, int, int);
constexpr int kMaxBlocks = 8;  // accumulators, leaving registers for the loads
constexpr TapSumsFn kTapSums[kMaxBlocks + 1] = {
    nullptr,     tap_sums<1>, tap_sums<2>, tap_sums<3>, tap_sums<4>,
    tap_sums<5>, tap_sums<6>, tap_sums<7>, tap_sums<8>};

void filter_grad_rows(const float* x, const float* dz, float* dk, float* db, const Geometry& g,
                      int h_begin, int h_end) {
  const int H = g.height, W = g.width, C = g.channels, d = g.dilation;
  const int rh = g.kh / 2, rw = g.kw / 2;
  const int64_t WC = int64_t(W) * C;
  const int cfull = C / kLanes * kLanes;
  for (int h = h_begin; h < h_end; ++h) {
    const float* dzrow = dz + int64_t(h - h_begin) * WC;
    for (int w = 0; w < W; ++w) {
      for (int c = 0; c < C; ++c) db[c] += dzrow[int64_t(w) * C + c];
    }
    for (int i = 0; i < g.kh; ++i) {
      const int hin = h + (i - rh) * d;
      if (hin < 0 || hin >= H) continue;
      const float* xrow = x + int64_t(hin) * WC;
      for (int j = 0; j < g.kw; ++j) {
        const int offset = (j - rw) * d;
        const int lo = std::max(0, -offset), hi = std::min(W, W - offset);
        if (lo >= hi) continue;  // this tap lies in the padding for the whole row
        float* dk_tap = dk + int64_t(i * g.kw + j) * C;
        for (int cb = 0; cb < cfull; cb += kLanes * kMaxBlocks) {
          const int blocks = std::min(kMaxBlocks, (cfull - cb) / kLanes);
          kTapSums[blocks](xrow + cb, dzrow + cb, dk_tap + cb, C, lo, hi, offset);
        }
        for (int c = cfull; c < C; ++c) {
          float a = 0.f;
          for (int w = lo; w < hi; ++w) {
            a += xrow[int64_t(w + offset) * C + c] * dzrow[int64_t(w) * C + c];
          }
          dk_tap[c] += a;
        }
      }
    }
  }
}

void gelu_grad(float* z, const float* dy, int64_t n) {
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) store(z + i, load(dy + i) * gelu_slope(load(z + i)));
  for (; i < n; ++i) z[i] = dy[i] * gelu_slope(z[i]);
}

}  // namespace

extern const Kernels kKernels = {VAN_STR(VAN_ISA), conv_rows, filter_grad_rows, gelu_grad};

}  // namespace VAN_ISA
}  // namespace van_kernels
