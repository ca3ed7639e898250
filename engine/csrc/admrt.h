// libadmrt's public API: sample from an exported package (admrt export aoti) with no Python.
//
//   auto package = admrt::Package::load("stack.aoti", "cpu");   // the model handle (weights)
//   auto params = admrt::Context::default_params();             // steps, batch size, graphs, noise
//   params.steps = "ddim25";
//   admrt::Context ctx(package, params);                        // per-run state
//   admrt::Result r = ctx.sample({1, 2, 3}, {1.0}, {7, 8, 9});  // classes, guidance, seeds
//   // r.images: uint8 (N, H, W, C); r.labels: int64 (N,)
//
// The ggml pattern: the model handle is separate from the context, which owns one Sampler
// context (sampler.h) per stage and batch size: fixed buffers, device tables, and on CUDA the
// captured graph of a whole step. A cascade (guided base, then the upsampler conditioned on its
// uint8 output) runs when the package has an upsampler, exactly as admrt.Engine does.
// Errors are exceptions: std::invalid_argument for a bad argument (naming it, the value, and
// what was expected), std::runtime_error for a missing or damaged package.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "sampler.h"

namespace admrt {

constexpr int64_t kPackageFormatVersion = 1;   // export/aoti.py FORMAT_VERSION
// The upsampler stage's seed of an image is derive_seed(seed, kUpsamplerStream).
constexpr uint64_t kUpsamplerStream = (uint64_t{1} << 63) + 1;

// One step plan of a stage ("ddim25", "250"): its method and tables, as the manifest carries them.
struct StepPlan {
  Method method = Method::DDIM;
  Schedule schedule;
};

// A network of the package with what the sampler needs to know about it.
struct Stage {
  std::string role;                   // "model" | "classifier" | "upsampler"
  std::string kind;                   // "unet" | "superres" | "classifier"
  std::vector<int64_t> image_shape;   // (C, H, W)
  std::vector<int64_t> low_res_shape;  // upsampler: (C, h, w)
  std::optional<int64_t> num_classes;  // conditional model; classifier: its classes
  Variance variance = Variance::LearnedRange;
  Prediction prediction = Prediction::Eps;  // manifest diffusion.predict_xstart
  std::map<std::string, StepPlan> plans;
  std::shared_ptr<Denoiser> denoiser;         // model, upsampler
  std::shared_ptr<ClassifierGrad> gradient;   // classifier
  // Runs the compiled unit on its inputs (x_t, t, y[, low_res]); for checks and tests.
  std::function<at::Tensor(const std::vector<at::Tensor>&)> run;
};

// The model handle: manifest.json and the AOTInductor units of a package folder, loaded once.
class Package {
 public:
  // device: where to run ("cpu", "cuda", "cuda:1"; empty: the device type it was compiled for);
  // the package must have been compiled for that device type. Throws naming the folder and what
  // is wrong with it.
  static std::shared_ptr<Package> load(const std::string& folder, const std::string& device = "");

  const std::string& folder() const { return folder_; }
  at::Device device() const { return device_; }
  const std::string& dtype() const { return dtype_; }
  int64_t max_batch() const { return max_batch_; }
  const std::string& default_steps() const { return default_steps_; }
  const std::string& default_upsampler_steps() const { return default_upsampler_steps_; }
  const std::string& seeded_noise() const { return seeded_noise_; }
  // The exported weights' fingerprint (manifest "weights"; empty for packages made before it):
  // run records compare it, so a package re-exported with other weights is not resumed into.
  const std::string& weights() const { return weights_; }
  const Stage& base() const { return *base_; }
  const Stage* classifier() const { return classifier_.get(); }
  const Stage* upsampler() const { return upsampler_.get(); }
  const Stage& stage(const std::string& role) const;
  // Labels a run accepts: the classifier's classes if it has one, else the model's (none:
  // unconditional and unguided).
  std::optional<int64_t> num_classes() const;

 private:
  Package() = default;
  std::string folder_, dtype_, default_steps_, default_upsampler_steps_, seeded_noise_, weights_;
  at::Device device_ = at::kCPU;
  int64_t max_batch_ = 1;
  std::shared_ptr<Stage> base_, classifier_, upsampler_;
};

// One AOTInductor unit (.pt2 of admrt.export.aoti) as the sampler calls it: a denoiser
// (x_t, t, y[, low_res]) or a classifier gradient (x_t, t, y). Throws naming a missing or damaged file.
std::shared_ptr<Denoiser> load_aoti_denoiser(const std::string& path, at::Device device);
std::shared_ptr<ClassifierGrad> load_aoti_gradient(const std::string& path, at::Device device);

// Everything a context is built for.
struct ContextParams {
  std::string steps;              // a step plan of the package ("ddim25"); empty: its default
  std::string upsampler_steps;    // the upsampler's; empty: the package's default
  int64_t batch_size = 16;        // images per network call (<= the package's max batch)
  std::string dtype;              // empty, or the package's dtype (precision is fixed at export)
  bool cuda_graphs = true;        // CUDA: capture one whole step, replay it
  double eta = 0.0;               // DDIM eta
  bool clip_denoised = true;
  bool check_finite = true;
  bool keep_float = false;        // also return the float x_0 of the final stage (Result::samples)
};

struct Result {
  at::Tensor images;       // uint8 (N, H, W, C), the final stage
  at::Tensor labels;       // int64 (N,), undefined for an unconditional, unguided run
  at::Tensor base_images;  // uint8 low-res stage of a cascade, else undefined
  at::Tensor samples;      // float32 (N, C, H, W) x_0 of the final stage (keep_float), else undefined
};

// Per-run state over a package: its Sampler contexts (one per stage, batch size and guidance
// on/off), kept between sample() calls so buffers and captured graphs are reused.
class Context {
 public:
  static ContextParams default_params();
  Context(std::shared_ptr<Package> package, ContextParams params);
  ~Context();

  // classes: one label per image (empty: `num` images labelled 0, 1, ... cycling, or unlabelled
  // when the run is unconditional); guidance: one scale for all or one per image (empty: 1 with
  // a classifier, 0 without); seeds: one per image (the same seed gives the same image at any
  // batch size and position). progress(done, total) after each step of the run; may throw.
  Result sample(const std::vector<int64_t>& classes, const std::vector<double>& guidance,
                const std::vector<uint64_t>& seeds, const ProgressFn& progress = nullptr, int64_t num = -1);

  // Checks classes, guidance and num as sample() would, without sampling (before a run writes
  // anything); throws std::invalid_argument.
  void validate(const std::vector<int64_t>& classes, const std::vector<double>& guidance, int64_t num = -1) const;

  // Steps of one batch (both stages): for progress totals.
  int64_t steps_per_batch() const;
  const Package& package() const { return *package_; }
  const ContextParams& params() const { return params_; }

 private:
  struct Request {
    int64_t n = 0;
    std::vector<int64_t> labels;  // empty: unconditional
    std::vector<double> scales;
    std::vector<uint64_t> seeds;
    bool guided = false;
  };
  Request request(const std::vector<int64_t>& classes, const std::vector<double>& guidance,
                  const std::vector<uint64_t>& seeds, int64_t num) const;
  Sampler& sampler(const Stage& stage, const StepPlan& plan, int64_t batch, bool guided);

  std::shared_ptr<Package> package_;
  ContextParams params_;
  const StepPlan* base_plan_ = nullptr;
  const StepPlan* up_plan_ = nullptr;
  // One Sampler per stage, kept while its batch size and guidance stay the same (as admrt.Engine).
  struct Cached {
    int64_t batch = 0;
    bool guided = false;
    std::unique_ptr<Sampler> sampler;
  };
  std::map<std::string, Cached> samplers_;
};

}  // namespace admrt
