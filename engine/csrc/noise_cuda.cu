// The CUDA kernel of seeded_normal_ (noise.h): thread i computes group i of four elements.
// Reads the draw index and the gate from device memory, so a captured graph replays it as is.
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "philox.h"

namespace admrt {
namespace {

__global__ void seeded_normal_kernel(float* __restrict__ out, const int64_t* __restrict__ seeds,
                                     const int64_t* __restrict__ draw, int64_t draw_offset,
                                     const float* __restrict__ gate, bool per_sample_draw, bool per_sample_gate,
                                     int64_t batch, int64_t per_sample) {
  const int64_t groups = (per_sample + 3) / 4;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < batch * groups;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = i / groups, g = i % groups;
    // Zero noise coefficient for this sample: nothing to draw.
    if (gate != nullptr && gate[per_sample_gate ? b : 0] == 0.0f) continue;
    const uint64_t k = static_cast<uint64_t>(draw[per_sample_draw ? b : 0] + draw_offset);
    float n[4];
    philox::box_muller4(philox::bits(static_cast<uint64_t>(seeds[b]), k, static_cast<uint64_t>(g)), n);
    float* dst = out + b * per_sample + 4 * g;
    const int64_t m = per_sample - 4 * g < 4 ? per_sample - 4 * g : 4;
    for (int64_t j = 0; j < m; ++j) dst[j] = n[j];
  }
}

}  // namespace

void seeded_normal_cuda(float* out, const int64_t* seeds, const int64_t* draw, int64_t draw_offset,
                        const float* gate, bool per_sample_draw, bool per_sample_gate, int64_t batch,
                        int64_t per_sample, void* stream) {
  const int64_t work = batch * ((per_sample + 3) / 4);
  const int threads = 256;
  const int64_t blocks = (work + threads - 1) / threads;
  const unsigned grid = static_cast<unsigned>(blocks < 65535 * 8 ? blocks : 65535 * 8);
  seeded_normal_kernel<<<grid, threads, 0, static_cast<cudaStream_t>(stream)>>>(out, seeds, draw, draw_offset,
                                                                                gate, per_sample_draw,
                                                                                per_sample_gate, batch, per_sample);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("seeded noise kernel launch failed: ") + cudaGetErrorString(err));
}

}  // namespace admrt
