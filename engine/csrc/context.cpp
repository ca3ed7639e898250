// The one driver of a sampling request (admrt.h): the Stack's consistency checks and the Context,
// which validates a request, expands seeds, batches with padding, runs the cascade and reports
// progress, for every front end. Its messages are the ones every front end shows.
#include "admrt.h"

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <sstream>
#include <stdexcept>

#include "json.h"
#include "text.h"

namespace admrt {
namespace {

// Up to five values as Python prints a list: "[1, 2]".
std::string join(const std::vector<int64_t>& xs) {
  std::string s;
  for (size_t i = 0; i < xs.size() && i < 5; ++i) s += (i ? ", " : "") + std::to_string(xs[i]);
  return "[" + s + "]";
}

at::Tensor seed_tensor(const std::vector<uint64_t>& seeds, at::Device device) {
  std::vector<int64_t> bits(seeds.begin(), seeds.end());  // uint64 bit patterns, as the core takes
  return at::tensor(bits, at::kLong).to(device);
}

NoiseMode parse_noise(const std::string& name) {
  if (name == "seeded") return NoiseMode::Seeded;
  if (name == "reference") return NoiseMode::Reference;
  throw std::invalid_argument(cat("noise='", name, "': expected one of ('seeded', 'reference')"));
}

std::string size_text(const std::vector<int64_t>& chw) { return cat(chw[1], "x", chw[2]); }

}  // namespace

// ---------------------------------------------------------------------------------------------
// Stack

Variance parse_variance(const std::string& name, const std::string& arg) {
  if (name == "learned_range") return Variance::LearnedRange;
  if (name == "fixed_small") return Variance::FixedSmall;
  if (name == "fixed_large") return Variance::FixedLarge;
  throw std::invalid_argument(cat(arg, "='", name, "': expected one of ('learned_range', 'fixed_small', ",
                                  "'fixed_large')"));
}

Stack::Stack(Stage base, std::optional<Stage> classifier, std::optional<Stage> upsampler, StackOptions options)
    : base_(std::move(base)), classifier_(std::move(classifier)), upsampler_(std::move(upsampler)),
      options_(std::move(options)) {
  if (base_.kind != "unet") throw std::invalid_argument(cat("model: expected a model of kind ('unet',), got '", base_.kind, "'"));
  if (base_.image_shape.size() != 3) throw std::invalid_argument("model: image_shape: expected (C, H, W)");
  if (!base_.denoiser || !base_.schedule) throw std::invalid_argument("model: expected a denoiser and its schedules");
  if (options_.max_batch < 0) throw std::invalid_argument(cat("max_batch=", options_.max_batch, ": expected >= 0"));
  if (classifier_) {
    const Stage& c = *classifier_;
    if (c.kind != "classifier")
      throw std::invalid_argument(cat("classifier: expected a noisy classifier (EncoderUNet), got a '", c.kind, "' model"));
    if (!c.gradient) throw std::invalid_argument("classifier: expected a gradient unit");
    if (c.image_shape.size() == 3 && c.image_shape[1] != base_.image_shape[1])
      throw std::invalid_argument(cat("classifier: it classifies ", size_text(c.image_shape), " images, but the model samples ",
                                      size_text(base_.image_shape)));
    if (c.image_shape.size() == 3 && c.image_shape[0] != base_.image_shape[0])
      throw std::invalid_argument(cat("classifier: in_channels=", c.image_shape[0], " differs from the model's ",
                                      base_.image_shape[0]));
  }
  if (upsampler_) {
    const Stage& u = *upsampler_;
    if (u.kind != "superres")
      throw std::invalid_argument(cat("upsampler: expected a model of kind ('superres',), got '", u.kind, "'"));
    if (!u.denoiser || !u.schedule) throw std::invalid_argument("upsampler: expected a denoiser and its schedules");
    if (u.low_res_shape.size() != 3 || u.low_res_shape[1] != base_.image_shape[1])
      throw std::invalid_argument(cat("upsampler: conditioned on ",
                                      u.low_res_shape.size() == 3 ? size_text(u.low_res_shape) : std::string("?"),
                                      " images, but the model samples ", size_text(base_.image_shape)));
    if (u.image_shape[0] != base_.image_shape[0])
      throw std::invalid_argument(cat("upsampler: in_channels=", u.image_shape[0], " differs from the model's ",
                                      base_.image_shape[0]));
  }
}

const Stage& Stack::stage(const std::string& role) const {
  if (role == "model") return base_;
  if (role == "classifier" && classifier_) return *classifier_;
  if (role == "upsampler" && upsampler_) return *upsampler_;
  throw std::invalid_argument(cat("role='", role, "': ", describe(), " has no such model"));
}

std::optional<int64_t> Stack::num_classes() const {
  return classifier_ ? classifier_->num_classes : base_.num_classes;
}

std::string Stack::describe() const {
  return options_.package.empty() ? std::string("this engine") : cat("the package ", options_.package);
}

// ---------------------------------------------------------------------------------------------
// Context

ContextParams Context::default_params() { return ContextParams{}; }

Context::Context(std::shared_ptr<Stack> stack, ContextParams params)
    : stack_(std::move(stack)), params_(std::move(params)) {
  if (!stack_) throw std::invalid_argument("stack: expected a loaded model stack, got null");
  const Stack& st = *stack_;
  if (params_.batch_size < 1)
    throw std::invalid_argument(cat("batch_size=", params_.batch_size, ": expected a positive int"));
  if (st.max_batch() > 0 && params_.batch_size > st.max_batch())
    throw std::invalid_argument(cat("batch_size=", params_.batch_size, ": ", st.describe(),
                                    " was exported for batches of 1..", st.max_batch()));
  if (!params_.dtype.empty() && params_.dtype != st.dtype())
    throw std::invalid_argument(cat("dtype='", params_.dtype, "': ", st.describe(), " runs in ", st.dtype(),
                                    st.options().package.empty() ? "" : " (precision is fixed at export)"));
  if (!(params_.eta >= 0 && std::isfinite(params_.eta)))
    throw std::invalid_argument(cat("eta=", json::number_text(params_.eta), ": expected a finite eta >= 0"));
  if (!(params_.dynamic_threshold >= 0 && params_.dynamic_threshold < 1))
    throw std::invalid_argument(cat("dynamic_threshold=", json::number_text(params_.dynamic_threshold),
                                    ": expected a percentile in (0, 1), e.g. 0.995, or 0 (off)"));
  if (params_.guidance_t_min < 0)
    throw std::invalid_argument(cat("guidance_interval=(", params_.guidance_t_min, ", ", params_.guidance_t_max,
                                    "): expected model timesteps 0 <= min <= max"));
  if (params_.guidance_t_max >= 0 && params_.guidance_t_max < params_.guidance_t_min)
    throw std::invalid_argument(cat("guidance_interval=(", params_.guidance_t_min, ", ", params_.guidance_t_max,
                                    "): expected min <= max"));
  if (params_.guidance_every < 1)
    throw std::invalid_argument(cat("guidance_every=", params_.guidance_every, ": expected a positive int"));
  noise_ = parse_noise(params_.noise);
  std::optional<Method> method;
  if (!params_.method.empty()) method = parse_method(params_.method);

  // The plans, parsed once; their canonical text replaces what was given.
  if (params_.steps.empty()) params_.steps = st.options().default_steps;
  base_plan_ = StepPlan::parse(params_.steps, "steps");
  if (method) base_plan_ = base_plan_.with_method(*method);
  params_.steps = base_plan_.str();
  const Stage& base = st.base();
  variance_ = params_.variance.empty() ? base.variance : parse_variance(params_.variance);
  if (variance_ == Variance::LearnedRange && !base.learn_sigma())
    throw std::invalid_argument(cat("variance='learned_range': the model outputs ", base.out_channels,
                                    " channels, not 2*", base.image_shape[0], " (eps and variance values)"));
  base_schedule_ = base.schedule(base_plan_);
  if (const Stage* up = st.upsampler()) {
    if (params_.upsampler_steps.empty())
      params_.upsampler_steps = st.options().default_upsampler_steps.empty() ? params_.steps
                                                                            : st.options().default_upsampler_steps;
    up_plan_ = StepPlan::parse(params_.upsampler_steps, "upsampler_steps");
    if (method) up_plan_ = up_plan_->with_method(*method);
    params_.upsampler_steps = up_plan_->str();
    up_schedule_ = up->schedule(*up_plan_);
  } else {
    params_.upsampler_steps.clear();
  }
}

Context::~Context() = default;

int64_t Context::steps_per_batch() const {
  return base_schedule_.num_steps + (up_plan_ ? up_schedule_.num_steps : 0);
}

bool Context::uses_graph(const std::string& role) const {
  auto it = samplers_.find(role);
  return it != samplers_.end() && it->second.sampler && it->second.sampler->uses_graph();
}

bool Context::captured(const std::string& role) const {
  auto it = samplers_.find(role);
  return it != samplers_.end() && it->second.sampler && it->second.sampler->captured();
}

SamplerParams Context::sampler_params(const Stage& stage, int64_t batch) const {
  const bool is_base = stage.role == "model";
  SamplerParams p = admrt::default_params();
  p.method = is_base ? base_plan_.method() : up_plan_->method();
  p.variance = is_base ? variance_ : stage.variance;
  p.prediction = stage.prediction;
  p.eta = params_.eta;
  p.clip_denoised = params_.clip_denoised;
  p.dynamic_threshold = params_.dynamic_threshold;
  p.guidance_t_min = params_.guidance_t_min;
  p.guidance_t_max = params_.guidance_t_max;
  p.guidance_every = params_.guidance_every;
  p.check_finite = params_.check_finite;
  p.noise = noise_;
  p.cuda_graphs = params_.cuda_graphs && stack_->options().capturable;
  p.batch_size = batch;
  p.image_shape = stage.image_shape;
  p.low_res_shape = stage.low_res_shape;
  p.device = stack_->device();
  return p;
}

Sampler& Context::sampler(const Stage& stage, int64_t batch, bool guided) {
  Cached& cached = samplers_[stage.role];
  if (cached.sampler && cached.batch == batch && cached.guided == guided) return *cached.sampler;
  cached.sampler.reset();  // free the old buffers and graph first
  const bool is_base = stage.role == "model";
  std::shared_ptr<ClassifierGrad> grad = guided ? stack_->classifier()->gradient : nullptr;
  cached.sampler = std::make_unique<Sampler>(stage.denoiser, grad, is_base ? base_schedule_ : up_schedule_,
                                             sampler_params(stage, batch));
  cached.batch = batch;
  cached.guided = guided;
  return *cached.sampler;
}

Context::Request Context::request(const std::vector<int64_t>& classes, const std::vector<double>& guidance,
                                  const std::vector<uint64_t>& seeds, std::optional<int64_t> num_arg) const {
  const Stack& st = *stack_;
  const std::optional<int64_t> k = st.num_classes();
  Request r;
  if (num_arg) check_num(*num_arg);
  else if (!classes.empty()) check_num(static_cast<int64_t>(classes.size()));
  const int64_t num = num_arg.value_or(-1);
  // Labels, validated once on the host (nothing checks them per step).
  if (classes.empty()) {
    if (!num_arg) throw std::invalid_argument("num: give classes=[...] (at least one) or a positive num");
    r.n = num;
    if (k) for (int64_t i = 0; i < r.n; ++i) r.labels.push_back(i % *k);
  } else {
    if (num_arg && num != static_cast<int64_t>(classes.size()))
      throw std::invalid_argument(cat("num=", num, ": differs from len(classes)=", classes.size()));
    if (!k)
      throw std::invalid_argument("classes: the model is unconditional and there is no classifier; pass num= instead");
    std::vector<int64_t> bad;
    for (int64_t c : classes)
      if ((c < 0 || c >= *k) && std::find(bad.begin(), bad.end(), c) == bad.end()) bad.push_back(c);
    std::sort(bad.begin(), bad.end());
    if (!bad.empty())
      throw std::invalid_argument(cat("classes: ", join(bad), " out of range; expected ids in [0, ", *k, ")"));
    const auto& model_k = st.base().num_classes;
    if (model_k && *model_k < *k) {
      std::vector<int64_t> over;
      for (int64_t c : classes)
        if (c >= *model_k) over.push_back(c);
      if (!over.empty())
        throw std::invalid_argument(cat("classes: ", join(over), " out of range for the model; expected ids in [0, ",
                                        *model_k, ")"));
    }
    r.labels = classes;
    r.n = static_cast<int64_t>(classes.size());
  }
  const int64_t n = r.n;
  // Guidance scales, one per image.
  if (guidance.empty()) r.scales.assign(n, st.classifier() ? 1.0 : 0.0);
  else if (guidance.size() == 1) r.scales.assign(n, guidance[0]);
  else if (static_cast<int64_t>(guidance.size()) == n) r.scales = guidance;
  else throw std::invalid_argument(cat("guidance: expected one scale or ", n, " (one per image), got ", guidance.size()));
  bool any = false;
  for (double s : r.scales) {
    if (!std::isfinite(s)) throw std::invalid_argument(cat("guidance=", json::number_text(s), ": expected finite scales"));
    any = any || s != 0.0;
  }
  if (any && !st.classifier())
    throw std::invalid_argument(cat("guidance=", json::number_text(*std::find_if(r.scales.begin(), r.scales.end(),
                                                                        [](double s) { return s != 0.0; })),
                                    " needs a classifier, and ", st.describe(), " has none",
                                    st.options().package.empty() ? " (Engine(..., classifier=...))" : "",
                                    "; or pass guidance=0"));
  r.guided = any;  // decided once, on the host
  // Seeds: one per image, or s for s, s+1, ... (uint64, wrapping).
  r.seeds.resize(n);
  if (seeds.empty()) for (int64_t i = 0; i < n; ++i) r.seeds[i] = static_cast<uint64_t>(i);
  else if (seeds.size() == 1) for (int64_t i = 0; i < n; ++i) r.seeds[i] = seeds[0] + static_cast<uint64_t>(i);
  else if (static_cast<int64_t>(seeds.size()) == n) r.seeds = seeds;
  else throw std::invalid_argument(cat("seeds: expected ", n, " (one per image) or one int, got ", seeds.size()));
  return r;
}

void Context::check_num(int64_t num) const {
  if (num <= 0) throw std::invalid_argument(cat("num=", num, ": expected a positive int"));
  const Stack& st = *stack_;
  auto pixels = [](const std::vector<int64_t>& chw) { return chw[0] * chw[1] * chw[2]; };
  const Stage& last = st.upsampler() ? *st.upsampler() : st.base();
  // Bytes held per image: uint8 images of each stage (and the run folder's copy of the final
  // ones), label, seed and scale, and the float x_0 when kept.
  int64_t per_image = 2 * pixels(last.image_shape) + 3 * 8;
  if (st.upsampler()) per_image += pixels(st.base().image_shape);
  if (params_.keep_float) per_image += 4 * pixels(last.image_shape);
  const long pages = ::sysconf(_SC_PHYS_PAGES), page = ::sysconf(_SC_PAGESIZE);
  const double memory = pages > 0 && page > 0 ? static_cast<double>(pages) * page : 0.0;
  if (memory > 0 && static_cast<double>(num) * per_image > memory) {
    auto size = [](double b) {
      const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"};
      int u = 0;
      for (; b >= 1024 && u < 6; ++u) b /= 1024;
      std::ostringstream s;
      s.precision(3);
      s << b << " " << units[u];
      return s.str();
    };
    throw std::invalid_argument(cat("num=", num, ": the run's images take ", size(static_cast<double>(num) * per_image),
                                    " of memory (", per_image, " B each), more than this machine's ", size(memory),
                                    "; expected at most ", static_cast<int64_t>(memory / per_image),
                                    " images (split the run over several --out folders or --seed ranges)"));
  }
}

void Context::validate(const std::vector<int64_t>& classes, const std::vector<double>& guidance,
                       const std::vector<uint64_t>& seeds, std::optional<int64_t> num) const {
  request(classes, guidance, seeds, num);
}

Result Context::sample(const std::vector<int64_t>& classes, const std::vector<double>& guidance,
                       const std::vector<uint64_t>& seeds, const ProgressFn& progress, std::optional<int64_t> num) {
  const Stack& st = *stack_;
  // The cancel flag is cleared when this request ends, however it ends.
  struct ClearCancel {
    std::atomic<bool>& flag;
    ~ClearCancel() { flag = false; }
  } clear_cancel{cancel_requested_};
  const Request req = request(classes, guidance, seeds, num);
  const int64_t n = req.n;
  const at::Device dev = st.device();
  const int64_t bsz = std::min(params_.batch_size, n);
  const int64_t batches = (n + bsz - 1) / bsz;
  const int64_t total = batches * steps_per_batch();
  int64_t done = 0;
  // Between two steps: the cancel flag, then the caller's progress (which may throw to stop).
  ProgressFn on_step = [&](int64_t, int64_t) {
    if (cancel_requested_) throw Cancelled();
    ++done;
    if (progress) progress(done, total);
  };
  // Reference noise: one generator for the whole request, as guided-diffusion's scripts draw.
  std::optional<at::Generator> generator;
  if (noise_ == NoiseMode::Reference && !seeds.empty()) {
    generator = at::globalContext().defaultGenerator(dev).clone();
    generator->set_current_seed(seeds[0]);
  }

  std::vector<at::Tensor> images, base_images, floats;
  for (int64_t start = 0; start < n; start += bsz) {
    const int64_t real = std::min(bsz, n - start);
    std::vector<int64_t> idx(bsz);  // the last batch repeats its last image
    for (int64_t i = 0; i < bsz; ++i) idx[i] = start + std::min(i, real - 1);
    BatchInputs in;
    in.generator = generator;
    if (!req.labels.empty()) {
      std::vector<int64_t> y;
      for (int64_t i : idx) y.push_back(req.labels[i]);
      in.y = at::tensor(y, at::kLong).to(dev);
    }
    std::vector<uint64_t> b_seeds;
    for (int64_t i : idx) b_seeds.push_back(req.seeds[i]);
    in.seeds = seed_tensor(b_seeds, dev);
    if (req.guided) {
      std::vector<float> g;
      for (int64_t i : idx) g.push_back(static_cast<float>(req.scales[i]));
      in.guidance = at::tensor(g, at::kFloat).to(dev);
    }
    at::Tensor x = sampler(st.base(), bsz, req.guided).sample(in, on_step);
    at::Tensor img = to_uint8_nhwc(x);
    if (const Stage* up = st.upsampler()) {
      base_images.push_back(img.slice(0, 0, real).cpu());
      // ADM-U is conditioned on the saved low-res samples (uint8 -> [-1, 1]).
      BatchInputs up_in;
      up_in.generator = generator;
      up_in.y = in.y;
      up_in.low_res = img.permute({0, 3, 1, 2}).to(at::kFloat) / 127.5 - 1;
      std::vector<uint64_t> up_seeds;
      for (uint64_t s : b_seeds) up_seeds.push_back(derive_seed(s, kUpsamplerStream));
      up_in.seeds = seed_tensor(up_seeds, dev);
      x = sampler(*up, bsz, false).sample(up_in, on_step);
      img = to_uint8_nhwc(x);
    }
    images.push_back(img.slice(0, 0, real).cpu());
    if (params_.keep_float) floats.push_back(x.slice(0, 0, real).cpu());
  }
  Result r;
  r.images = at::cat(images);
  if (!req.labels.empty()) r.labels = at::tensor(req.labels, at::kLong);
  if (!base_images.empty()) r.base_images = at::cat(base_images);
  if (!floats.empty()) r.samples = at::cat(floats);
  r.seeds = req.seeds;
  return r;
}

}  // namespace admrt
