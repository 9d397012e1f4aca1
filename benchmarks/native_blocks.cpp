// The butterfly rotation's block products in one pass over x each, on CPU (float32), for
// `python benchmarks/step_time.py --paired lora,hybrid --native-blocks`: what a kernel that reads x once buys against
// PyTorch's batched product with its two layout copies (methods/butterfly.py). Built there with
// torch.utils.cpp_extension; not part of the library.
#include <torch/extension.h>
#include <ATen/Parallel.h>

namespace {

// y[t, W·n + j] = Σ_i x[t, W·n + i] · Q_n[i, j]  (Q_nᵀ when transpose), for blocks (N, W, W).
template <int W>
void rotate_kernel(const float* x, int64_t ldx, const float* blocks, float* y, int64_t tokens, int64_t count,
                   bool transpose) {
  std::vector<float> q;
  if (transpose) {
    q.resize(count * W * W);
    for (int64_t n = 0; n < count; ++n)
      for (int i = 0; i < W; ++i)
        for (int j = 0; j < W; ++j) q[(n * W + i) * W + j] = blocks[(n * W + j) * W + i];
    blocks = q.data();
  }
  const int64_t features = count * W;
  at::parallel_for(0, tokens, 8, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const float* xr = x + t * ldx;
      float* yr = y + t * features;
      for (int64_t n = 0; n < count; ++n) {
        const float* a = xr + n * W;
        const float* m = blocks + n * W * W;
        float acc[W];
        for (int j = 0; j < W; ++j) acc[j] = a[0] * m[j];
        for (int i = 1; i < W; ++i)
          for (int j = 0; j < W; ++j) acc[j] += a[i] * m[i * W + j];
        for (int j = 0; j < W; ++j) yr[n * W + j] = acc[j];
      }
    }
  });
}

// out[n, i, j] = Σ_t x[t, W·n + i] · g[t, W·n + j]
template <int W>
void grad_kernel(const float* x, int64_t ldx, const float* g, int64_t ldg, float* out, int64_t tokens,
                 int64_t count) {
  at::parallel_for(0, count, 4, [&](int64_t n0, int64_t n1) {
    float* o0 = out + n0 * W * W;
    std::fill(o0, o0 + (n1 - n0) * W * W, 0.0f);
    for (int64_t t = 0; t < tokens; ++t) {
      const float* xr = x + t * ldx;
      const float* gr = g + t * ldg;
      for (int64_t n = n0; n < n1; ++n) {
        const float* a = xr + n * W;
        const float* c = gr + n * W;
        float* o = out + n * W * W;
        for (int i = 0; i < W; ++i) {
          const float ai = a[i];
          for (int j = 0; j < W; ++j) o[i * W + j] += ai * c[j];
        }
      }
    }
  });
}

void check(const torch::Tensor& x, const torch::Tensor& blocks) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == torch::kFloat && x.dim() == 2 && x.stride(1) == 1,
              "x: a CPU float32 (tokens, features) tensor with unit column stride");
  TORCH_CHECK(blocks.is_contiguous() && blocks.scalar_type() == torch::kFloat && blocks.dim() == 3 &&
                  blocks.size(1) == blocks.size(2),
              "blocks: contiguous float32 (N, W, W)");
  TORCH_CHECK(blocks.size(0) * blocks.size(1) == x.size(1), "blocks cover ", blocks.size(0) * blocks.size(1),
              " features, x has ", x.size(1));
}

#define DISPATCH_WIDTH(width, CALL)                                                      \
  switch (width) {                                                                      \
    case 2: { constexpr int W = 2; CALL; break; }                                       \
    case 4: { constexpr int W = 4; CALL; break; }                                       \
    case 8: { constexpr int W = 8; CALL; break; }                                       \
    case 16: { constexpr int W = 16; CALL; break; }                                     \
    default: TORCH_CHECK(false, "block width ", width, " has no native kernel (2, 4, 8 or 16)"); \
  }

}  // namespace

torch::Tensor block_product(const torch::Tensor& x, const torch::Tensor& blocks, bool transpose) {
  check(x, blocks);
  auto y = torch::empty({x.size(0), x.size(1)}, x.options());
  DISPATCH_WIDTH(blocks.size(1), rotate_kernel<W>(x.data_ptr<float>(), x.stride(0), blocks.data_ptr<float>(),
                                                  y.data_ptr<float>(), x.size(0), blocks.size(0), transpose));
  return y;
}

torch::Tensor block_product_grad(const torch::Tensor& x, const torch::Tensor& grad, int64_t width) {
  auto blocks = torch::empty({x.size(1) / width, width, width}, x.options());
  check(x, blocks);
  check(grad, blocks);
  TORCH_CHECK(grad.size(0) == x.size(0), "grad and x differ in tokens");
  DISPATCH_WIDTH(width, grad_kernel<W>(x.data_ptr<float>(), x.stride(0), grad.data_ptr<float>(), grad.stride(0),
                                       blocks.data_ptr<float>(), x.size(0), blocks.size(0)));
  return blocks;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("block_product", &block_product, "x · blockdiag(blocks) (or its transpose)");
  m.def("block_product_grad", &block_product_grad, "Σ_t x_nᵀ g_n per block");
}
