// libadmrt's public API: the one driver of a sampling request, for every front end
// (admrt.Engine, Engine.from_package, admrt sample, admrt-sample, a C++ program of your own), and
// StepBatcher, the same requests batched step by step (admrt serve).
//
//   auto stack = admrt::Stack::load_package("stack.aoti", "cpu");  // the model handle (weights)
//   auto params = admrt::Context::default_params();                // step plan, batch size, noise
//   params.steps = "ddim25";                                       // a StepPlan (plan.h)
//   admrt::Context ctx(stack, params);                             // per-run state
//   admrt::Result r = ctx.sample({1, 2, 3}, {1.0}, {7, 8, 9});     // classes, guidance, seeds
//   // r.images: uint8 (N, H, W, C); r.labels: int64 (N,)
//
// The ggml pattern: the model handle (Stack) is separate from the context, which owns one Sampler
// context (sampler.h) per stage: fixed buffers, device tables, and on CUDA the captured graph of a
// whole step. A Stack is an exported AOTInductor package (load_package) or units given from
// Python (eager, torch.compile, onnxruntime, TensorRT backends, guided-diffusion modules:
// admrt.engine.Engine builds one). The Context is the only code that runs a request: it validates
// it (labels, guidance, seeds, num, batch bounds, the step plan), expands per-image seeds, runs
// fixed-size batches (the last one padded), the cascade (guided base, then the upsampler
// conditioned on its uint8 output, each image's upsampler seed derived from its seed), progress,
// and a cancel flag checked between steps. Errors are exceptions: std::invalid_argument for a
// bad argument (naming it, the value, and what was expected), std::runtime_error for a missing or
// damaged package or a failed step, Cancelled for a cancelled request.
#pragma once

#include <ATen/ATen.h>

#include <atomic>
#include <cstdint>
#include <functional>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "plan.h"
#include "sampler.h"

namespace admrt {

constexpr int64_t kPackageFormatVersion = 2;   // export/aoti.py reads it from admrt.core (one source)
// The upsampler stage's seed of an image is derive_seed(seed, kUpsamplerStream).
constexpr uint64_t kUpsamplerStream = (uint64_t{1} << 63) + 1;
// What an image's seed means under seeded noise (philox.h); run records carry it.
constexpr const char* kSeededNoiseFormat = "philox4x32-10 box-muller keyed (seed, draw, element)";

// A network of the stack with what the driver needs to know about it.
struct Stage {
  std::string role;                    // "model" | "classifier" | "upsampler"
  std::string kind;                    // "unet" | "superres" | "classifier"
  std::vector<int64_t> image_shape;    // (C, H, W)
  std::vector<int64_t> low_res_shape;  // upsampler: (C, h, w)
  std::optional<int64_t> num_classes;  // conditional model; classifier: its classes
  int64_t out_channels = 0;            // C (eps or x_0) or 2C (learned sigma: [eps | v])
  Variance variance = Variance::LearnedRange;  // the default (guided-diffusion's create_gaussian_diffusion)
  Prediction prediction = Prediction::Eps;
  std::shared_ptr<Denoiser> denoiser;         // model, upsampler
  std::shared_ptr<ClassifierGrad> gradient;   // classifier
  // The coefficient tables of a step plan: a package looks them up among those it carries (and
  // throws naming the ones it has); Python builds them (admrt.diffusion.build_tables).
  std::function<Schedule(const StepPlan&)> schedule;
  // Runs the unit on its inputs (x_t, t, y[, low_res]); for checks and tests.
  std::function<at::Tensor(const std::vector<at::Tensor>&)> run;

  bool learn_sigma() const { return !image_shape.empty() && out_channels == 2 * image_shape[0]; }
};

// "learned_range" | "fixed_small" | "fixed_large" -> Variance; throws std::invalid_argument naming
// `arg`, the value and the names.
Variance parse_variance(const std::string& name, const std::string& arg = "variance");

// How a Stack was made, and what identifies its weights in run records.
struct StackOptions {
  at::Device device = at::kCPU;
  std::string dtype = "fp32";          // precision of the networks' bodies
  int64_t max_batch = 0;               // largest batch the units take; 0: no bound
  std::string default_steps = "ddim25";
  std::string default_upsampler_steps;  // empty: the base model's plan
  bool capturable = true;              // the units may be captured in a CUDA graph
  std::string package;                 // the package folder it was loaded from, else empty
  std::string weights;                 // fingerprint of the weights (a package's manifest), else empty
};

// The model handle: the base model, and optionally the noisy classifier and the upsampler.
class Stack {
 public:
  // An exported package folder (manifest.json + AOTInductor units), loaded once. device: where to
  // run ("cpu", "cuda", "cuda:1"; empty: the device type it was compiled for); the package must
  // have been compiled for that device type. Throws naming the folder and what is wrong with it.
  static std::shared_ptr<Stack> load_package(const std::string& folder, const std::string& device = "");
  // Units given by the caller (each stage's denoiser / gradient and schedule set). Checks that the
  // stages fit together (kinds, image sizes, channels, classes).
  Stack(Stage base, std::optional<Stage> classifier, std::optional<Stage> upsampler, StackOptions options);

  const StackOptions& options() const { return options_; }
  at::Device device() const { return options_.device; }
  const std::string& dtype() const { return options_.dtype; }
  int64_t max_batch() const { return options_.max_batch; }
  const Stage& base() const { return base_; }
  const Stage* classifier() const { return classifier_ ? &*classifier_ : nullptr; }
  const Stage* upsampler() const { return upsampler_ ? &*upsampler_ : nullptr; }
  const Stage& stage(const std::string& role) const;
  // Labels a run accepts: the classifier's classes if it has one, else the model's (none:
  // unconditional and unguided).
  std::optional<int64_t> num_classes() const;
  // Where the stack came from, for messages: "the package DIR" or "this engine".
  std::string describe() const;

 private:
  Stage base_;
  std::optional<Stage> classifier_, upsampler_;
  StackOptions options_;
};

// One AOTInductor unit (.pt2 of admrt.export.aoti) as the sampler calls it: a denoiser
// (x_t, t, y[, low_res]) or a classifier gradient (x_t, t, y). Throws naming a missing or damaged file.
std::shared_ptr<Denoiser> load_aoti_denoiser(const std::string& path, at::Device device);
std::shared_ptr<ClassifierGrad> load_aoti_gradient(const std::string& path, at::Device device);

// Everything a context is built for.
struct ContextParams {
  std::string steps;              // the base model's step plan (plan.h); empty: the stack's default
  std::string upsampler_steps;    // the upsampler's; empty: the stack's default, else `steps`
  std::string method;             // a kMethods name (plan.h) over both plans' respacings; empty: as they imply
  std::string variance;           // the base model's: learned_range | fixed_small | fixed_large; empty: its default
  std::string noise = "seeded";   // "seeded" (per-image counter-based) | "reference" (guided-diffusion's order)
  int64_t batch_size = 16;        // images per network call (<= the stack's max batch)
  std::string dtype;              // empty, or the stack's dtype (a package's precision is fixed at export)
  bool cuda_graphs = true;        // CUDA, seeded noise, capturable units: capture one whole step, replay it
  double eta = 0.0;               // DDIM eta
  bool clip_denoised = true;
  double dynamic_threshold = 0.0; // Imagen's percentile rule instead of the clamp (0: off); both stages
  // Guidance on part of the trajectory (SamplerParams): the classifier runs at model timesteps in
  // [guidance_t_min, guidance_t_max] (max < 0: up to T-1) on every guidance_every-th call.
  int64_t guidance_t_min = 0;
  int64_t guidance_t_max = -1;
  int64_t guidance_every = 1;
  bool check_finite = true;
  bool keep_float = false;        // also return the float x_0 of the final stage (Result::samples)
};

struct Result {
  at::Tensor images;            // uint8 (N, H, W, C), the final stage
  at::Tensor labels;            // int64 (N,), undefined for an unconditional, unguided run
  at::Tensor base_images;       // uint8 low-res stage of a cascade, else undefined
  at::Tensor samples;           // float32 (N, C, H, W) x_0 of the final stage (keep_float), else undefined
  std::vector<uint64_t> seeds;  // each image's seed
};

// A request stopped by Context::cancel() (between two steps).
struct Cancelled : std::runtime_error {
  Cancelled() : std::runtime_error("cancelled") {}
};

// Per-run state over a stack: its Sampler contexts (one per stage, batch size and guidance
// on/off), kept between sample() calls so buffers and captured graphs are reused.
class Context {
 public:
  static ContextParams default_params();
  // Validates the params (batch bound, plans, eta, noise, method, variance, dtype) and looks up or
  // builds the plans' tables.
  Context(std::shared_ptr<Stack> stack, ContextParams params);
  ~Context();

  // classes: one label per image (empty: `num` images labelled 0, 1, ... cycling, or unlabelled
  // when the run is unconditional); guidance: one scale for all or one per image (empty: 1 with
  // a classifier, 0 without); seeds: one per image, or one s for s, s+1, ... (empty: 0, 1, ...);
  // under seeded noise the same seed gives the same image at any batch size and position; under
  // reference noise one generator seeded with the first seed (empty: the device's default
  // generator) draws in guided-diffusion's order. num: the number of images (none: len(classes)).
  // progress(done, total) after each step of the run; it may throw to stop the run.
  Result sample(const std::vector<int64_t>& classes, const std::vector<double>& guidance,
                const std::vector<uint64_t>& seeds, const ProgressFn& progress = nullptr,
                std::optional<int64_t> num = std::nullopt);

  // Checks classes, guidance, seeds and num as sample() would, without sampling (before a run
  // writes anything); throws std::invalid_argument.
  void validate(const std::vector<int64_t>& classes, const std::vector<double>& guidance,
                const std::vector<uint64_t>& seeds = {}, std::optional<int64_t> num = std::nullopt) const;
  // Checks that `num` is positive and that a run of num images fits in this machine's memory (its
  // results are held there: the images of every stage, labels, seeds, scales, keep_float's x_0),
  // before anything is allocated for them; throws std::invalid_argument naming num. validate and
  // sample call it first; a front end that sizes anything by num calls it before doing so.
  void check_num(int64_t num) const;

  // Stops a running sample() at its next step boundary (it throws Cancelled); thread-safe. The
  // flag is cleared when sample() returns or throws, so a cancel() while none runs stops the
  // next one at its first step.
  void cancel() { cancel_requested_ = true; }

  // Steps of one batch (both stages): for progress totals.
  int64_t steps_per_batch() const;
  // Whether the stage's ("model", "upsampler") steps run captured in a CUDA graph, and whether
  // that graph exists (after its first batch's second step).
  bool uses_graph(const std::string& role) const;
  bool captured(const std::string& role) const;
  const Stack& stack() const { return *stack_; }
  const std::shared_ptr<Stack>& stack_handle() const { return stack_; }
  const ContextParams& params() const { return params_; }   // steps / upsampler_steps canonical
  const StepPlan& plan() const { return base_plan_; }
  const StepPlan* upsampler_plan() const { return up_plan_ ? &*up_plan_ : nullptr; }

 private:
  struct Request {
    int64_t n = 0;
    std::vector<int64_t> labels;  // empty: unconditional
    std::vector<double> scales;
    std::vector<uint64_t> seeds;
    bool guided = false;
  };
  Request request(const std::vector<int64_t>& classes, const std::vector<double>& guidance,
                  const std::vector<uint64_t>& seeds, std::optional<int64_t> num) const;
  Sampler& sampler(const Stage& stage, int64_t batch, bool guided);
  SamplerParams sampler_params(const Stage& stage, int64_t batch) const;
  friend class StepBatcher;

  std::shared_ptr<Stack> stack_;
  ContextParams params_;
  NoiseMode noise_ = NoiseMode::Seeded;
  Variance variance_ = Variance::LearnedRange;
  StepPlan base_plan_;
  std::optional<StepPlan> up_plan_;
  Schedule base_schedule_, up_schedule_;
  std::atomic<bool> cancel_requested_{false};
  // One Sampler per stage, kept while its batch size and guidance stay the same.
  struct Cached {
    int64_t batch = 0;
    bool guided = false;
    std::unique_ptr<Sampler> sampler;
  };
  std::map<std::string, Cached> samplers_;
};

// Step batching (admrt serve): requests join and leave a running batch at step boundaries.
//
// Each stage is one Sampler of `slots` slots (sampler.h: enter / iterate / take), each slot one
// image at its own step of its own plan; a base image that is done enters the upsampler's pool (a
// cascade). iterate() admits queued images into free slots -- "step" batching: at every step
// boundary; "static": only when both pools are empty, the whole batch then moving to the upsampler
// together (request-level batching, the baseline) -- then runs one batched step of each occupied
// pool. Requests are validated as Context::sample validates them, and an image equals what
// Context::sample gives for the same seed, label, scale and plan (seeded noise).
//
// Thread-safe: submit, cancel, progress, stats and take may be called from any thread while one
// thread calls iterate(); the networks run outside the lock.
class StepBatcher {
 public:
  // params: as for a Context (params.batch_size: the slots of each stage; seeded noise). plans: the
  // base model's step plans served (the first is the default of a request; empty: params.steps);
  // they share one method (the slots share one step function).
  StepBatcher(std::shared_ptr<Stack> stack, ContextParams params, const std::vector<std::string>& plans,
              bool step_batching = true);
  ~StepBatcher();

  // Validates a request (Context::sample's arguments; plan: one of plans(), empty: the first) and
  // queues its images; returns its id. Throws std::invalid_argument.
  int64_t submit(const std::vector<int64_t>& classes, const std::vector<double>& guidance,
                 const std::vector<uint64_t>& seeds, std::optional<int64_t> num, const std::string& plan);
  // Drops the request's queued images and frees its slots at the next step boundary; take() then
  // throws Cancelled. Unknown or finished ids are ignored.
  void cancel(int64_t id);
  // One iteration: cancellations, admission, one step of each occupied pool, harvest. Returns the
  // ids of the requests that finished in it (done, failed or cancelled).
  std::vector<int64_t> iterate();
  // Whether anything is queued or in a slot.
  bool busy() const;
  // A finished request's result, removed; throws its error (std::runtime_error), Cancelled, or
  // std::invalid_argument for an unknown or unfinished id.
  Result take(int64_t id);

  struct Progress {
    int64_t images = 0, images_done = 0, steps = 0, steps_done = 0;
    bool finished = false;
  };
  Progress progress(int64_t id) const;
  struct Stats {
    int64_t queued_images = 0;             // waiting for a base slot
    int64_t base_slots = 0, upsampler_slots = 0;  // occupied
    std::vector<int64_t> base_steps;       // the step each occupied base slot is at
    int64_t iterations = 0, requests = 0;  // iterations run, requests not yet taken
  };
  Stats stats() const;
  const std::vector<std::string>& plans() const { return plans_; }
  int64_t slots() const { return context_.params().batch_size; }
  const Context& context() const { return context_; }

 private:
  struct Job;
  struct Pool;
  void compact(Pool& pool);  // busy slots to the front: the step runs over fewer slots
  void admit(Pool& pool, bool upsampler);
  void harvest(Pool& pool, const std::vector<int64_t>& done, bool upsampler);
  void fail_pool(Pool& pool, const std::string& error);
  void drop_gone(const std::vector<Pool*>& pools);
  void finish_if_complete(int64_t id, Job& job, std::vector<int64_t>& finished);
  void update_stats();  // from the iterating thread only (it reads the samplers' slots)

  Context context_;
  std::vector<std::string> plans_;
  std::vector<int64_t> plan_steps_;  // base steps (+ upsampler steps) per image, per plan
  bool step_batching_ = true;
  mutable std::mutex mutex_;
  std::map<int64_t, std::unique_ptr<Job>> jobs_;
  int64_t next_id_ = 1;
  std::unique_ptr<Pool> base_, up_;
  Stats stats_;
};

}  // namespace admrt
