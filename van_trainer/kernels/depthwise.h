// Depthwise convolution kernels for VAN training on CPU: NHWC float32, odd kernels, stride 1,
// "same" zero padding, any dilation, bias, optionally exact GELU fused on the output.
//
// depthwise.cc holds one ISA-agnostic implementation; build.py compiles it once per ISA (AVX-512,
// AVX2+FMA, AVX) into its own namespace, and ops.cc picks one at load time by what the CPU has.
#ifndef VAN_KERNELS_DEPTHWISE_H_
#define VAN_KERNELS_DEPTHWISE_H_

#include <cstdint>

namespace van_kernels {

// One image's geometry and the filter's: kernel kh x kw, both odd, taps `dilation` apart.
struct Geometry {
  int height, width, channels, kh, kw, dilation;
};

// Rows of one image, [h_begin, h_end): out = act(bias + sum_ij in[h + (i-kh/2)d, w + (j-kw/2)d] *
// k[i, j]) with k[kh-1-i, kw-1-j] instead when `flip` (the input gradient of the conv). `in` holds
// image rows [in_row0, ...) and must cover every row a tap reaches; rows outside the image are
// zero padding. `bias` may be null. `out` points at row h_begin.
using ConvRowsFn = void (*)(const float* in, int in_row0, const float* k, const float* bias,
                            float* out, const Geometry& g, bool flip, bool gelu, int h_begin,
                            int h_end);

// Adds to dk[i, j, c] (kh*kw*channels) the products x[h + (i-kh/2)d, w + (j-kw/2)d, c] * dz[h, w,
// c] over rows [h_begin, h_end) of one image, and to db[c] the sum of dz. `x` is the whole image,
// `dz` points at row h_begin.
using FilterGradRowsFn = void (*)(const float* x, const float* dz, float* dk, float* db,
                                  const Geometry& g, int h_begin, int h_end);

// In place over n values: z[i] <- dy[i] * GELU'(z[i]), exact (erf) GELU.
using GeluGradFn = void (*)(float* z, const float* dy, int64_t n);

struct Kernels {
  const char* isa;
  ConvRowsFn conv_rows;
  FilterGradRowsFn filter_grad_rows;
  GeluGradFn gelu_grad;
};

#define VAN_DECLARE_KERNELS(NS) \
  namespace NS {                \
  extern const Kernels kKernels; \
  }
VAN_DECLARE_KERNELS(avx512)
VAN_DECLARE_KERNELS(avx2)
VAN_DECLARE_KERNELS(avx)
#undef VAN_DECLARE_KERNELS

}  // namespace van_kernels

#endif  // VAN_KERNELS_DEPTHWISE_H_
