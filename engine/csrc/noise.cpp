// Seeded noise on the host, and the dispatch to the CUDA kernel (noise_cuda.cu).
#include "noise.h"

#include <ATen/Parallel.h>

#include <sstream>
#include <stdexcept>

#include "philox.h"

#ifdef ADMRT_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace admrt {
namespace {

// draws[b]: sample b's draw index, or -1: nothing drawn for it.
void fill_cpu(float* out, const int64_t* seeds, const std::vector<int64_t>& draws, int64_t batch,
              int64_t per_sample) {
  const int64_t groups = (per_sample + 3) / 4;
  at::parallel_for(0, batch * groups, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / groups, g = i % groups;
      if (draws[b] < 0) continue;
      float n[4];
      philox::box_muller4(philox::bits(static_cast<uint64_t>(seeds[b]), static_cast<uint64_t>(draws[b]),
                                       static_cast<uint64_t>(g)), n);
      float* dst = out + b * per_sample + 4 * g;
      const int64_t m = std::min<int64_t>(4, per_sample - 4 * g);
      for (int64_t j = 0; j < m; ++j) dst[j] = n[j];
    }
  });
}

void check(bool ok, const char* what, const std::string& msg) {
  if (!ok) throw std::invalid_argument(std::string(what) + ": " + msg);
}

std::string sizes(const at::Tensor& t) {
  std::ostringstream s;
  s << t.sizes() << " " << t.scalar_type() << " on " << t.device();
  return s.str();
}

}  // namespace

void seeded_normal_(at::Tensor& out, const at::Tensor& seeds, const at::Tensor& draw, int64_t draw_offset,
                    const std::optional<at::Tensor>& gate) {
  check(out.scalar_type() == at::kFloat && out.dim() >= 1 && out.is_contiguous(), "out",
        "expected a contiguous float32 (B, ...) tensor, got " + sizes(out));
  const int64_t batch = out.size(0);
  check(seeds.scalar_type() == at::kLong && seeds.dim() == 1 && seeds.size(0) == batch &&
            seeds.device() == out.device() && seeds.is_contiguous(),
        "seeds", "expected int64 (" + std::to_string(batch) + ",) on out's device, got " + sizes(seeds));
  check(draw.scalar_type() == at::kLong && (draw.numel() == 1 || draw.numel() == batch) &&
            draw.device() == out.device() && draw.is_contiguous(),
        "draw", "expected a one-element or (" + std::to_string(batch) + ",) int64 tensor on out's device, got " +
                    sizes(draw));
  if (gate)
    check(gate->scalar_type() == at::kFloat && (gate->numel() == 1 || gate->numel() == batch) &&
              gate->device() == out.device() && gate->is_contiguous(),
          "gate", "expected a one-element or (" + std::to_string(batch) + ",) float32 tensor on out's device, got " +
                      sizes(*gate));
  const bool per_draw = draw.numel() != 1, per_gate = gate && gate->numel() != 1;
  const int64_t per_sample = batch ? out.numel() / batch : 0;
  if (out.numel() == 0) return;
  if (out.is_cuda()) {
#ifdef ADMRT_WITH_CUDA
    const c10::cuda::CUDAGuard on_device(out.device());
    seeded_normal_cuda(out.data_ptr<float>(), seeds.data_ptr<int64_t>(), draw.data_ptr<int64_t>(), draw_offset,
                       gate ? gate->data_ptr<float>() : nullptr, per_draw, per_gate, batch, per_sample,
                       c10::cuda::getCurrentCUDAStream(out.device().index()).stream());
    return;
#else
    throw std::runtime_error("seeded noise on CUDA: this admrt core was built without CUDA (rebuild it against "
                             "a CUDA build of torch with nvcc on the PATH)");
#endif
  }
  check(out.is_cpu(), "out", "expected a CPU or CUDA tensor, got " + sizes(out));
  const int64_t* d = draw.data_ptr<int64_t>();
  const float* gv = gate ? gate->data_ptr<float>() : nullptr;
  std::vector<int64_t> draws(batch);
  bool any = false;
  for (int64_t b = 0; b < batch; ++b) {
    const bool on = gv == nullptr || gv[per_gate ? b : 0] != 0.0f;
    draws[b] = on ? d[per_draw ? b : 0] + draw_offset : -1;
    any = any || on;
  }
  if (!any) return;
  fill_cpu(out.data_ptr<float>(), seeds.data_ptr<int64_t>(), draws, batch, per_sample);
}

at::Tensor seeded_normal(const at::Tensor& seeds, at::IntArrayRef sample_shape, int64_t draw) {
  std::vector<int64_t> shape{seeds.size(0)};
  shape.insert(shape.end(), sample_shape.begin(), sample_shape.end());
  at::Tensor out = at::empty(shape, seeds.options().dtype(at::kFloat));
  seeded_normal_(out, seeds.contiguous(), at::full({1}, draw, seeds.options().dtype(at::kLong)));
  return out;
}

}  // namespace admrt
