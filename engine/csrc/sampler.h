// admrt C++ sampling core: the guided DDPM and DDIM loops of ADM on ATen tensors (CPU and CUDA).
//
// Matches guided-diffusion's gaussian_diffusion.py: p_sample / p_sample_loop (DDPM, Ho et al.
// 2020, with the learned-range variance of Nichol & Dhariwal 2021), ddim_sample /
// ddim_sample_loop (Song et al. 2020, eta), condition_mean (DDPM guidance: mu + Sigma * g,
// Dhariwal & Nichol Alg. 1) and condition_score (DDIM guidance: eps - sqrt(1 - abar) * g, Alg. 2).
//
// The network and the classifier gradient are reached through two abstract interfaces
// (Denoiser, ClassifierGrad). The Python bindings wrap Python callables; a libtorch /
// AOTInductor backend implements them in C++ and runs the whole loop with no Python.
// Coefficient tables come from admrt.diffusion (float64) and are turned into per-step float32
// scalars once per run (the reference gathers float64 tables and casts them to float32).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <vector>

namespace admrt {

// The network: (x_t (B,C,H,W) float32, t (B,) original timesteps, y (B,) int64 or none,
// low_res (B,C,h,w) float32 or none) -> (B,C,H,W) eps, or (B,2C,H,W) [eps | v] for learned sigma.
// Implementations that ignore y (unconditional models) or low_res (non-SuperRes) just do so.
class Denoiser {
 public:
  virtual ~Denoiser() = default;
  virtual at::Tensor operator()(const at::Tensor& x_t, const at::Tensor& t,
                                const std::optional<at::Tensor>& y,
                                const std::optional<at::Tensor>& low_res) = 0;
};

// grad_{x_t} log p(y | x_t, t), unscaled, shape of x_t (reference: classifier_sample.cond_fn
// without its classifier_scale; the core multiplies by each sample's guidance scale).
class ClassifierGrad {
 public:
  virtual ~ClassifierGrad() = default;
  virtual at::Tensor operator()(const at::Tensor& x_t, const at::Tensor& t, const at::Tensor& y) = 0;
};

enum class Method { DDPM, DDIM };
enum class Variance { LearnedRange, FixedSmall, FixedLarge };
// Seeded: sample b's noise at draw k is randn from a generator seeded by mix(seed_b, k), so it
// depends on nothing else (batch size, position, neighbours). Reference: one generator, drawn
// in guided-diffusion's order (x_T first, then one randn_like per step, also at eta = 0).
enum class NoiseMode { Seeded, Reference };

// Host copy of a (possibly respaced) process's tables; names as admrt.diffusion.DiffusionTables.
struct Schedule {
  int64_t num_steps = 0;
  int64_t original_num_steps = 0;
  bool rescale_timesteps = false;
  std::vector<int64_t> timestep_map;
  std::vector<double> alphas_cumprod, alphas_cumprod_prev, log_betas, sqrt_recip_alphas_cumprod,
      sqrt_recipm1_alphas_cumprod, posterior_variance, posterior_log_variance_clipped,
      posterior_mean_coef1, posterior_mean_coef2, fixed_large_variance, fixed_large_log_variance;

  // From the named float64 tables (DiffusionTables.tensors()); throws naming a missing table.
  static Schedule from_tables(const std::map<std::string, at::Tensor>& tables,
                              int64_t original_num_steps, bool rescale_timesteps);
};

struct SamplerOptions {
  Method method = Method::DDIM;
  Variance variance = Variance::LearnedRange;
  double eta = 0.0;            // DDIM only: 0 deterministic, 1 ~ DDPM-like
  bool clip_denoised = true;   // clamp the x_0 prediction to [-1, 1]
  bool check_finite = true;    // raise as soon as the model output is NaN/Inf (one sync per step)
  NoiseMode noise = NoiseMode::Seeded;
};

// One batch to sample.
struct SampleRequest {
  std::vector<int64_t> shape;               // {B, C, H, W}
  at::Device device = at::kCPU;
  std::optional<at::Tensor> y;              // int64 (B,): class labels (model and classifier)
  std::optional<at::Tensor> low_res;        // SuperRes conditioning image, float32 in [-1, 1]
  std::optional<at::Tensor> guidance;       // float32 (B,): classifier scale per sample
  std::vector<uint64_t> seeds;              // Seeded mode: one per sample
  std::optional<at::Generator> generator;   // Reference mode: none = the device's default generator
  std::optional<at::Tensor> x_T;            // start from this x_T instead of drawing it
};

// Called after each step with (steps done, total) (progress bars); may throw to cancel.
using ProgressFn = std::function<void(int64_t, int64_t)>;

// The whole reverse process for one batch; returns x_0 (B,C,H,W) float32.
at::Tensor sample(Denoiser& model, ClassifierGrad* classifier, const Schedule& schedule,
                  const SamplerOptions& options, const SampleRequest& request,
                  const ProgressFn& progress = nullptr);

// ((x + 1) * 127.5).clamp(0, 255) as uint8, NCHW -> NHWC (the reference's sample scripts).
at::Tensor to_uint8_nhwc(const at::Tensor& x);

// The seed of sample `seed`'s noise draw `draw` (0: x_T; k >= 1: step k) in Seeded mode.
uint64_t noise_seed(uint64_t seed, uint64_t draw);

}  // namespace admrt
