// admrt C++ sampling core: the guided DDPM and DDIM loops of ADM on ATen tensors (CPU and CUDA),
// with no Python in it (library target admrt, libadmrt; the pybind11 module admrt.core sits on top).
//
// Matches guided-diffusion's gaussian_diffusion.py: p_sample / p_sample_loop (DDPM, Ho et al.
// 2020, with the learned-range variance of Nichol & Dhariwal 2021), ddim_sample /
// ddim_sample_loop (Song et al. 2020, eta), condition_mean (DDPM guidance: mu + Sigma * g,
// Dhariwal & Nichol Alg. 1) and condition_score (DDIM guidance: eps - sqrt(1 - abar) * g, Alg. 2).
// The multistep solvers (plan.h: DPM-Solver++(2M)/(3M), SDE-DPM-Solver++(2M), UniPC-2/3 with
// B(h) = h) take the x_0 of the guided eps (condition_score) and are one linear update over the
// sample, the current and the previous x_0 predictions (and UniPC's previous sample), whose
// per-step weights -- the lower orders of the first and last steps included -- are rows of the
// coefficient table: the same step for every step, capture-safe.
//
// The ggml pattern: the networks (Denoiser, ClassifierGrad) are separate from the per-run
// context (Sampler), which owns fixed buffers (x, labels, scales, seeds, t, noise), the per-step
// coefficient table (N, K) and model-timestep table (N,) on the device, a device step counter,
// and on CUDA the captured graph of one whole step (network, classifier gradient with its
// backward, update, noise), replayed for every step with no host synchronisation.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "plan.h"

namespace admrt {

// The network: (x_t (B,C,H,W) float32, t (B,) float32 model timesteps, y (B,) int64 labels (zeros
// for an unconditional model, which ignores them), low_res (B,C,h,w) float32 or none) ->
// (B,C,H,W) eps, or (B,2C,H,W) [eps | v] for learned sigma (x_0 in place of eps for an x_0-predicting
// model, SamplerParams::prediction); float32. No host synchronisation
// inside (it may be captured in a CUDA graph).
class Denoiser {
 public:
  virtual ~Denoiser() = default;
  virtual at::Tensor operator()(const at::Tensor& x_t, const at::Tensor& t, const at::Tensor& y,
                                const std::optional<at::Tensor>& low_res) = 0;
};

// grad_{x_t} log p(y | x_t, t), unscaled, float32, shape of x_t (reference: classifier_sample.cond_fn
// without its classifier_scale; the core multiplies by each sample's guidance scale).
class ClassifierGrad {
 public:
  virtual ~ClassifierGrad() = default;
  virtual at::Tensor operator()(const at::Tensor& x_t, const at::Tensor& t, const at::Tensor& y) = 0;
};

enum class Variance { LearnedRange, FixedSmall, FixedLarge };
// What the network's first C channels are (guided-diffusion's ModelMeanType): EPSILON or START_X.
enum class Prediction { Eps, XStart };
// Seeded: counter-based noise keyed by (seed_b, draw, element) (noise.h): an image depends only on
// its seed. Reference: one torch generator drawn in guided-diffusion's order (x_T first, then one
// randn_like per step, also at eta = 0 and at the last step); never graph-captured.
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
  static Schedule from_tables(const std::map<std::string, at::Tensor>& tables, int64_t original_num_steps,
                              bool rescale_timesteps);
};

// Everything fixed for the life of a Sampler context (its buffers and graph depend on it).
struct SamplerParams {
  Method method = Method::DDIM;
  Variance variance = Variance::LearnedRange;
  Prediction prediction = Prediction::Eps;
  double eta = 0.0;                  // DDIM only: 0 deterministic, 1 ~ DDPM-like
  bool clip_denoised = true;         // clamp the x_0 prediction to [-1, 1]
  bool check_finite = true;          // device flag per step, read once after the loop
  double dynamic_threshold = 0.0;    // Imagen's rule at this percentile in (0, 1) instead of the clamp; 0: off
  // Guidance on part of the trajectory (Kynkaanniemi et al. 2024): the classifier runs only at
  // model timesteps in [guidance_t_min, guidance_t_max] (max < 0: no upper bound) and on every
  // guidance_every-th call (0, k, 2k, ...); on the other calls it is not run at all.
  int64_t guidance_t_min = 0;
  int64_t guidance_t_max = -1;
  int64_t guidance_every = 1;
  NoiseMode noise = NoiseMode::Seeded;
  bool cuda_graphs = true;           // on CUDA with seeded noise: capture one step, replay it
  int64_t batch_size = 1;            // B: every batch has this size (pad the last one)
  std::vector<int64_t> image_shape;  // (C, H, W)
  std::vector<int64_t> low_res_shape;  // (C, h, w) of an upsampler's conditioning, else empty
  at::Device device = at::kCPU;
};

SamplerParams default_params();

// The per-batch inputs; all optional tensors have batch size B.
struct BatchInputs {
  std::optional<at::Tensor> y;              // int64 (B,) labels; none: zeros (unconditional)
  std::optional<at::Tensor> low_res;        // float32 (B, C, h, w) in [-1, 1] (upsampler)
  std::optional<at::Tensor> guidance;       // float32 (B,) classifier scale per sample (guided)
  std::optional<at::Tensor> seeds;          // int64 (B,) (uint64 bits), seeded noise
  std::optional<at::Generator> generator;   // reference noise; none: the device's default generator
  std::optional<at::Tensor> x_T;            // start from this instead of drawing it
};

// Called from the host loop after each step is launched, (steps launched, total); reads no
// device value, so on CUDA it does not wait for the step. May throw to cancel.
using ProgressFn = std::function<void(int64_t, int64_t)>;

// One image entering a slot (step batching): which of the context's plans it follows, its label
// (ignored by an unconditional model), classifier scale, seed, and an upsampler's conditioning.
struct SlotInputs {
  int64_t plan = 0;
  int64_t label = 0;
  double guidance = 0.0;
  uint64_t seed = 0;
  std::optional<at::Tensor> low_res;  // float32 (C, h, w) in [-1, 1] (upsampler)
};

class Sampler {
 public:
  // classifier: guidance on (every batch computes the gradient; scales come per sample), or null.
  // schedules: the step plans this context runs (one, or several for step batching: each image
  // follows one of them; their methods are params.method); sample() runs the first.
  Sampler(std::shared_ptr<Denoiser> model, std::shared_ptr<ClassifierGrad> classifier,
          const std::vector<Schedule>& schedules, const SamplerParams& params);
  Sampler(std::shared_ptr<Denoiser> model, std::shared_ptr<ClassifierGrad> classifier, const Schedule& schedule,
          const SamplerParams& params)
      : Sampler(std::move(model), std::move(classifier), std::vector<Schedule>{schedule}, params) {}
  ~Sampler();
  Sampler(const Sampler&) = delete;
  Sampler& operator=(const Sampler&) = delete;

  // The whole reverse process for one batch; returns x_0 (B, C, H, W) float32 (a new tensor).
  at::Tensor sample(const BatchInputs& inputs, const ProgressFn& progress = nullptr);

  // Step batching (seeded noise only): the batch is params.batch_size slots, each holding one
  // image at its own step of its own plan (a per-slot row index into the device tables, per-slot
  // draw counter, seed, label, scale and solver history). enter() puts an image into a free slot
  // and draws its x_T; iterate() runs one batched step over the slots up to the highest occupied
  // one (captured on CUDA: a power-of-two bucket, one graph per bucket) -- free slots in that
  // range keep their values -- and returns the slots whose image is now done; take() returns a done slot's
  // x_0 (C, H, W) (throwing if it is not finite) and frees the slot; release() frees a slot at
  // any step (cancel). An image's x_0 equals what sample() gives for the same seed, label and scale.
  void enter(int64_t slot, const SlotInputs& in);
  std::vector<int64_t> iterate();
  at::Tensor take(int64_t slot);
  void release(int64_t slot);
  // Moves a busy slot's image, with all its state, into a free slot (compaction: the step runs
  // over the slots up to the highest busy one).
  void move(int64_t from, int64_t to);
  bool slot_busy(int64_t slot) const { return slot_plan_.at(slot) >= 0; }
  int64_t occupied() const;
  // Of a busy slot: steps done, and steps of its plan.
  int64_t slot_step(int64_t slot) const { return slot_row_.at(slot) - plan_offset_.at(slot_plan_.at(slot)); }
  int64_t plan_steps(int64_t plan) const { return plan_steps_.at(plan); }
  int64_t num_plans() const { return static_cast<int64_t>(plan_steps_.size()); }

  const SamplerParams& params() const { return params_; }
  int64_t num_steps() const { return plan_steps_[0]; }
  bool guided() const { return classifier_ != nullptr; }
  bool uses_graph() const;   // whether steps are captured and replayed (CUDA, seeded, cuda_graphs)
  bool captured() const;     // whether a graph exists (after the first batch's second step)
  // Per step of the first plan (loop order): whether the classifier runs (guided contexts;
  // guidance interval).
  std::vector<bool> guided_steps() const {
    return std::vector<bool>(guided_rows_.begin(), guided_rows_.begin() + plan_steps_[0]);
  }

 private:
  struct Views;  // the buffers' first m slots
  void load_inputs(const BatchInputs& inputs);
  // One step over the first m slots; `guide`: run the classifier (decided on the host).
  void step(int64_t m, const std::optional<at::Generator>& generator, bool guide);
  at::Tensor denoised(const at::Tensor& x0) const;           // clamp or dynamic thresholding
  void run_step(int64_t m, bool guide, const std::optional<at::Generator>& generator);
  // Throws naming the first non-finite step found in `flags` ((b, 3) of bad_) of a plan.
  void raise_if_not_finite(const at::Tensor& flags, int64_t plan) const;
  void check_slot(int64_t slot, const char* what) const;
  void free_slot(int64_t slot);

  std::shared_ptr<Denoiser> model_;
  std::shared_ptr<ClassifierGrad> classifier_;
  SamplerParams params_;
  std::vector<int64_t> plan_offset_, plan_steps_;  // the plans' rows in the tables
  std::vector<int64_t> model_t_;   // host copy of the original timesteps per row (errors)
  bool has_noise_ = true;          // seeded DDIM with eta = 0 draws nothing after x_T
  std::vector<bool> guided_rows_;  // host: the classifier runs at this row
  at::Tensor coef_;                // (R, K) float32, row offset + k = the k-th step of a plan's loop
  at::Tensor t_table_;             // (R,) float32 model timesteps
  // Per slot: step_ the row index into the tables, draw_ the steps done (noise draw counter),
  // active_ whether it advances this step (bool).
  at::Tensor step_, draw_, active_;
  at::Tensor x_, y_, low_res_, scale_, seeds_, t_, noise_;
  at::Tensor bad_;                 // (B, 3) int64: first non-finite step (model output, gradient, sample)
  // Solvers: the previous x_0 predictions (history_[0] the last call's) and UniPC's previous
  // corrected sample, preallocated.
  std::vector<at::Tensor> history_;
  at::Tensor last_sample_;
  // Host state of the slots (step batching): plan (-1: free), row, scale.
  std::vector<int64_t> slot_plan_, slot_row_;
  std::vector<double> slot_scale_;
  bool slots_stale_ = false;       // sample() used the buffers: reset the slots' device state first
  struct Graph;
  std::unique_ptr<Graph> graph_;   // CUDA: side stream and captured steps
};

// ((x + 1) * 127.5).clamp(0, 255) as uint8, NCHW -> NHWC (the reference's sample scripts).
at::Tensor to_uint8_nhwc(const at::Tensor& x);

// A seed derived from `seed` for stream `stream` (e.g. the upsampler stage of a cascade).
uint64_t derive_seed(uint64_t seed, uint64_t stream);

}  // namespace admrt
