// Counter-based seeded noise (see philox.h): one launch per draw on CUDA, graph-capturable (the
// draw index is read from device memory), the same numbers on CPU and CUDA at any batch size.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <vector>

namespace admrt {

// Fills out (B, ...) float32, contiguous, with out[b, e] = normal(seeds[b], draw[b] + draw_offset, e).
// seeds: int64 (B,) (uint64 bit patterns); draw: int64, one element for the whole batch or (B,)
// (each sample at its own step: step batching); both on out's device. gate: float32, one element
// or (B,), on out's device, or none; where it holds 0, nothing is drawn for that sample and its
// rows of out are left as they were (the noise coefficient of that step is zero).
void seeded_normal_(at::Tensor& out, const at::Tensor& seeds, const at::Tensor& draw, int64_t draw_offset = 0,
                    const std::optional<at::Tensor>& gate = std::nullopt);

// (B, *sample_shape) float32 on seeds' device: sample b's draw `draw` (tests, x_T, tools).
at::Tensor seeded_normal(const at::Tensor& seeds, at::IntArrayRef sample_shape, int64_t draw);

#ifdef ADMRT_WITH_CUDA
// noise_cuda.cu: the same map as the CPU loop, one thread per group of four elements.
void seeded_normal_cuda(float* out, const int64_t* seeds, const int64_t* draw, int64_t draw_offset,
                        const float* gate, bool per_sample_draw, bool per_sample_gate, int64_t batch,
                        int64_t per_sample, void* stream);
#endif

}  // namespace admrt
