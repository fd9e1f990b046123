// TensorFlow ops around depthwise.h, for training VAN on CPU:
//
//   VanDepthwiseConv2d(input, filter, bias) -> output
//     act(depthwise_conv2d(input, filter, stride 1, SAME, dilation) + bias), act: none | gelu
//   VanDepthwiseConv2dGrad(input, filter, bias, out_backprop) -> input, filter and bias gradients
//
// With activation=gelu the gradient op recomputes the pre-activation from `input` instead of
// keeping it from the forward pass: the recompute is 9-49 multiply-adds per value, far cheaper on
// these memory-bound layers than writing and re-reading one more activation-sized tensor.
// The ops never reach an exported model: van_trainer.model folds inference onto stock TF ops.
#include <algorithm>
#include <cstdlib>
#include <limits>
#include <string>
#include <vector>

#include "depthwise.h"
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "tensorflow/core/util/work_sharder.h"

namespace van_kernels {
namespace {

bool cpu_has(const std::string& isa) {
  if (isa == "avx512") return __builtin_cpu_supports("avx512f");
  if (isa == "avx2") return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return isa == "avx" && __builtin_cpu_supports("avx");
}

// The widest ISA this CPU runs, or the one $VAN_TFX_KERNELS_ISA names (avx512, avx2, avx: tests
// and benchmarks run the AVX2 path on AVX-512 machines); null with `error` set if it can't run.
const Kernels* kernels_for_this_cpu(std::string* error) {
  static const Kernels* const all[] = {&avx512::kKernels, &avx2::kKernels, &avx::kKernels};
  const char* forced = std::getenv("VAN_TFX_KERNELS_ISA");
  for (const Kernels* kernels : all) {
    if (forced && *forced && kernels->isa != std::string(forced)) continue;
    if (cpu_has(kernels->isa)) return kernels;
    if (forced && *forced) break;
  }
  *error = forced && *forced ? "VAN_TFX_KERNELS_ISA=" + std::string(forced) +
                                   " names an ISA this CPU lacks or none of avx512, avx2, avx"
                             : "this CPU has no AVX (TensorFlow itself requires it)";
  return nullptr;
}

}  // namespace
}  // namespace van_kernels

namespace tensorflow {
namespace {

using shape_inference::InferenceContext;
using shape_inference::ShapeHandle;
using van_kernels::Geometry;

// Bytes of activations one gradient work unit aims to keep in cache (a quarter of a 2 MB L2).
constexpr int64_t kUnitBytes = 512 * 1024;

Status ConvShape(InferenceContext* c) {
  ShapeHandle input, filter, bias;
  TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 4, &input));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(1), 4, &filter));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(2), 1, &bias));
  c->set_output(0, input);
  return OkStatus();
}

Status GradShape(InferenceContext* c) {
  TF_RETURN_IF_ERROR(ConvShape(c));
  c->set_output(0, c->input(0));
  c->set_output(1, c->input(1));
  c->set_output(2, c->input(2));
  return OkStatus();
}

REGISTER_OP("VanDepthwiseConv2d")
    .Input("input: float")
    .Input("filter: float")
    .Input("bias: float")
    .Attr("dilation: int >= 1 = 1")
    .Attr("activation: {'none', 'gelu'} = 'none'")
    .Output("output: float")
    .SetShapeFn(ConvShape)
    .Doc("act(depthwise_conv2d(input, filter, SAME, dilation) + bias), NHWC, odd kernels.");

REGISTER_OP("VanDepthwiseConv2dGrad")
    .Input("input: float")
    .Input("filter: float")
    .Input("bias: float")
    .Input("out_backprop: float")
    .Attr("dilation: int >= 1 = 1")
    .Attr("activation: {'none', 'gelu'} = 'none'")
    .Output("input_backprop: float")
    .Output("filter_backprop: float")
    .Output("bias_backprop: float")
    .SetShapeFn(GradShape)
    .Doc("Gradients of VanDepthwiseConv2d with respect to input, filter and bias.");

// Checks the inputs' shapes (errors name the op's input) and fills in the geometry.
Status CheckShapes(OpKernelContext* ctx, int dilation, Geometry* g) {
  const Tensor& input = ctx->input(0);
  const Tensor& filter = ctx->input(1);
  const Tensor& bias = ctx->input(2);
  if (input.dims() != 4) {
    return errors::InvalidArgument("input must be NHWC (rank 4), got shape ",
                                   input.shape().DebugString());
  }
  if (filter.dims() != 4 || filter.dim_size(3) != 1) {
    return errors::InvalidArgument("filter must be [height, width, channels, 1], got shape ",
                                   filter.shape().DebugString());
  }
  if (filter.dim_size(2) != input.dim_size(3)) {
    return errors::InvalidArgument("filter has ", filter.dim_size(2), " channels, input has ",
                                   input.dim_size(3));
  }
  if (filter.dim_size(0) % 2 == 0 || filter.dim_size(1) % 2 == 0) {
    return errors::InvalidArgument(
        "filter height and width must be odd (symmetric SAME padding), got shape ",
        filter.shape().DebugString());
  }
  if (bias.dims() != 1 || bias.dim_size(0) != input.dim_size(3)) {
    return errors::InvalidArgument("bias must be [", input.dim_size(3), "], got shape ",
                                   bias.shape().DebugString());
  }
  constexpr int64_t kMaxInt = std::numeric_limits<int>::max();
  if (input.dim_size(1) * input.dim_size(2) * input.dim_size(3) > kMaxInt ||
      filter.dim_size(0) * filter.dim_size(1) * int64_t(dilation) > kMaxInt) {
    return errors::InvalidArgument("input shape ", input.shape().DebugString(),
                                   " and filter shape ", filter.shape().DebugString(),
                                   " are too large");
  }
  g->height = int(input.dim_size(1));
  g->width = int(input.dim_size(2));
  g->channels = int(input.dim_size(3));
  g->kh = int(filter.dim_size(0));
  g->kw = int(filter.dim_size(1));
  g->dilation = dilation;
  return OkStatus();
}

class ConvBase : public OpKernel {
 public:
  explicit ConvBase(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("dilation", &dilation_));
    std::string activation;
    OP_REQUIRES_OK(ctx, ctx->GetAttr("activation", &activation));
    gelu_ = activation == "gelu";
    std::string error;
    kernels_ = van_kernels::kernels_for_this_cpu(&error);
    OP_REQUIRES(ctx, kernels_ != nullptr, errors::FailedPrecondition(error));
  }

 protected:
  int dilation_;
  bool gelu_;
  const van_kernels::Kernels* kernels_ = nullptr;
};

REGISTER_OP("VanKernelsIsa")
    .Output("isa: string")
    .SetShapeFn([](InferenceContext* c) {
      c->set_output(0, c->Scalar());
      return OkStatus();
    })
    .Doc("The instruction set the VanDepthwiseConv2d kernels run with on this CPU.");

class VanKernelsIsaOp : public OpKernel {
 public:
  using OpKernel::OpKernel;

  void Compute(OpKernelContext* ctx) override {
    std::string error;
    const van_kernels::Kernels* kernels = van_kernels::kernels_for_this_cpu(&error);
    OP_REQUIRES(ctx, kernels != nullptr, errors::FailedPrecondition(error));
    Tensor* out = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({}), &out));
    out->scalar<tstring>()() = kernels->isa;
  }
};
REGISTER_KERNEL_BUILDER(Name("VanKernelsIsa").Device(DEVICE_CPU), VanKernelsIsaOp);

class VanDepthwiseConv2dOp : public ConvBase {
 public:
  using ConvBase::ConvBase;

  void Compute(OpKernelContext* ctx) override {
    Geometry g;
    OP_REQUIRES_OK(ctx, CheckShapes(ctx, dilation_, &g));
    const Tensor& input = ctx->input(0);
    Tensor* output = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, input.shape(), &output));
    if (input.NumElements() == 0) return;
    const int64_t rows = input.dim_size(0) * g.height;
    const int64_t image = int64_t(g.height) * g.width * g.channels;
    const float* x = input.flat<float>().data();
    const float* k = ctx->input(1).flat<float>().data();
    const float* b = ctx->input(2).flat<float>().data();
    float* y = output->flat<float>().data();
    const van_kernels::Kernels& kernels = *kernels_;
    const bool gelu = gelu_;
    const int64_t cost = int64_t(g.width) * g.channels * (2 * g.kh * g.kw + (gelu ? 30 : 0));
    auto* pool = ctx->device()->tensorflow_cpu_worker_threads();
    Shard(pool->num_threads, pool->workers, rows, cost, [&](int64_t begin, int64_t end) {
      while (begin < end) {  // [begin, end) may span images: one call per image's rows
        const int64_t n = begin / g.height;
        const int h0 = int(begin % g.height);
        const int h1 = int(std::min<int64_t>(end - n * g.height, g.height));
        kernels.conv_rows(x + n * image, 0, k, b, y + begin * g.width * g.channels, g, false,
                          gelu, h0, h1);
        begin = n * g.height + h1;
      }
    });
  }
};

class VanDepthwiseConv2dGradOp : public ConvBase {
 public:
  using ConvBase::ConvBase;

  void Compute(OpKernelContext* ctx) override {
    Geometry g;
    OP_REQUIRES_OK(ctx, CheckShapes(ctx, dilation_, &g));
    const Tensor& input = ctx->input(0);
    const Tensor& filter = ctx->input(1);
    const Tensor& dy_tensor = ctx->input(3);
    OP_REQUIRES(ctx, dy_tensor.shape() == input.shape(),
                errors::InvalidArgument("out_backprop shape ", dy_tensor.shape().DebugString(),
                                        " differs from input shape ",
                                        input.shape().DebugString()));
    Tensor *dx_tensor = nullptr, *dk_tensor = nullptr, *db_tensor = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, input.shape(), &dx_tensor));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, filter.shape(), &dk_tensor));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(2, ctx->input(2).shape(), &db_tensor));
    const int64_t taps = int64_t(g.kh) * g.kw * g.channels;
    float* dk = dk_tensor->flat<float>().data();
    float* db = db_tensor->flat<float>().data();
    std::fill(dk, dk + taps, 0.f);
    std::fill(db, db + g.channels, 0.f);
    const int64_t batch = input.dim_size(0);
    if (input.NumElements() == 0) return;

    // Work units are blocks of rows of one image. A unit's rows (plus the halo its GELU
    // recompute needs) aim to stay in cache, so the recomputed values are still there when the
    // input gradient and the filter gradient read them back, and so are the input rows the
    // filter gradient reads again; at least 4 units per thread.
    auto* pool = ctx->device()->tensorflow_cpu_worker_threads();
    const int64_t row_size = int64_t(g.width) * g.channels;
    const int halo = (g.kh / 2) * g.dilation;  // rows of dz one dx row reaches above and below
    const int64_t cached_rows = std::max<int64_t>(1, kUnitBytes / (row_size * 4) - 2 * halo);
    const int64_t wanted = 4 * int64_t(pool->num_threads);
    const int blocks = int(std::clamp<int64_t>(
        std::max((g.height + cached_rows - 1) / cached_rows, (wanted + batch - 1) / batch), 1,
        g.height));
    const int rows_per_unit = (g.height + blocks - 1) / blocks;
    const int64_t units = batch * blocks;
    // Shards are fixed, contiguous ranges of units, each summing into a filter gradient of its
    // own: a few buffers per thread whatever the batch (one per unit was ~84 MB at batch 1024),
    // and the same sums in the same order however the threads are scheduled.
    const int64_t shards = std::min<int64_t>(units, 4 * int64_t(pool->num_threads));
    std::vector<float> partial(size_t(shards) * size_t(taps + g.channels), 0.f);

    const int64_t image = g.height * row_size;
    const float* x = input.flat<float>().data();
    const float* k = filter.flat<float>().data();
    const float* b = ctx->input(2).flat<float>().data();
    const float* dy = dy_tensor.flat<float>().data();
    float* dx = dx_tensor->flat<float>().data();
    const van_kernels::Kernels& kernels = *kernels_;
    const bool gelu = gelu_;

    auto run_unit = [&](int64_t unit, float* unit_dk) {
      const int64_t n = unit / blocks;
      const int h0 = int(unit % blocks) * rows_per_unit;
      const int h1 = std::min(g.height, h0 + rows_per_unit);
      if (h0 >= h1) return;
      const float* x_image = x + n * image;
      const float* dz = dy + n * image;  // dz = dL/d(pre-activation); dy itself without GELU
      int dz_row0 = 0;
      thread_local std::vector<float> scratch;
      if (gelu) {  // dz rows [s0, s1) = dy * GELU'(conv + bias), recomputed here
        const int s0 = std::max(0, h0 - halo), s1 = std::min(g.height, h1 + halo);
        scratch.resize(size_t(s1 - s0) * row_size);
        kernels.conv_rows(x_image, 0, k, b, scratch.data(), g, false, false, s0, s1);
        kernels.gelu_grad(scratch.data(), dy + n * image + s0 * row_size, (s1 - s0) * row_size);
        dz = scratch.data();
        dz_row0 = s0;
      }
      kernels.conv_rows(dz, dz_row0, k, nullptr, dx + n * image + h0 * row_size, g, true, false,
                        h0, h1);
      kernels.filter_grad_rows(x_image, dz + (h0 - dz_row0) * row_size, unit_dk, unit_dk + taps,
                               g, h0, h1);
    };
    const int64_t unit_cost =
        int64_t(rows_per_unit) * row_size * (4 * g.kh * g.kw + (gelu ? 60 : 0));
    const int64_t shard_cost = unit_cost * ((units + shards - 1) / shards);
    pool->workers->ParallelFor(shards, shard_cost, [&](int64_t begin, int64_t end) {
      for (int64_t shard = begin; shard < end; ++shard) {
        float* shard_dk = partial.data() + shard * (taps + g.channels);
        for (int64_t unit = units * shard / shards; unit < units * (shard + 1) / shards; ++unit) {
          run_unit(unit, shard_dk);
        }
      }
    });
    for (int64_t shard = 0; shard < shards; ++shard) {
      const float* shard_dk = partial.data() + shard * (taps + g.channels);
      for (int64_t i = 0; i < taps; ++i) dk[i] += shard_dk[i];
      for (int c = 0; c < g.channels; ++c) db[c] += shard_dk[taps + c];
    }
  }
};

REGISTER_KERNEL_BUILDER(Name("VanDepthwiseConv2d").Device(DEVICE_CPU), VanDepthwiseConv2dOp);
REGISTER_KERNEL_BUILDER(Name("VanDepthwiseConv2dGrad").Device(DEVICE_CPU),
                        VanDepthwiseConv2dGradOp);

}  // namespace
}  // namespace tensorflow
