// Packages (manifest.json + AOTInductor units) and the Context that samples from them: the
// cascade and batching of admrt.Engine.sample, in C++ (see admrt.h).
#include "admrt.h"

#include <torch/csrc/inductor/aoti_package/model_package_loader.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <mutex>
#include <sstream>
#include <stdexcept>

#include "json.h"

#ifdef ADMRT_WITH_CUDA
#include <c10/cuda/CUDAFunctions.h>
#endif

namespace admrt {
namespace {

namespace fs = std::filesystem;
using torch::inductor::AOTIModelPackageLoader;

template <typename... Args>
std::string cat(const Args&... args) {
  std::ostringstream s;
  (s << ... << args);
  return s.str();
}

std::string first_line(const std::string& text) { return text.substr(0, text.find('\n')); }

// One AOTInductor unit; inputs are made contiguous with the dtypes it was exported with.
class AotiUnit {
 public:
  AotiUnit(const std::string& path, at::Device device) {
    if (!fs::is_regular_file(path)) throw std::runtime_error(cat(path, ": missing (the package is incomplete)"));
    // Single-threaded runners take no locks or events, so the CUDA step can be graph-captured;
    // a package's units are run by one thread at a time.
    const bool single_threaded = device.is_cuda();
    try {
      loader_ = std::make_unique<AOTIModelPackageLoader>(path, "model", single_threaded, 1,
                                                         device.is_cuda() ? device.index() : -1);
    } catch (const std::exception& e) {
      throw std::runtime_error(cat(path, ": cannot be loaded as an AOTInductor package (damaged, or built by ",
                                   "another torch): ", first_line(e.what())));
    }
  }
  at::Tensor operator()(std::vector<at::Tensor> inputs) {
    for (auto& t : inputs) t = t.contiguous();
    std::lock_guard<std::mutex> lock(mutex_);  // contexts on one package may run in several threads
    std::vector<at::Tensor> out = loader_->run(inputs);
    return out.at(0);
  }

 private:
  std::unique_ptr<AOTIModelPackageLoader> loader_;
  std::mutex mutex_;
};

class AotiDenoiser final : public Denoiser {
 public:
  explicit AotiDenoiser(std::shared_ptr<AotiUnit> unit) : unit_(std::move(unit)) {}
  at::Tensor operator()(const at::Tensor& x_t, const at::Tensor& t, const at::Tensor& y,
                        const std::optional<at::Tensor>& low_res) override {
    if (low_res) return (*unit_)({x_t, t, y, *low_res});
    return (*unit_)({x_t, t, y});
  }

 private:
  std::shared_ptr<AotiUnit> unit_;
};

class AotiGradient final : public ClassifierGrad {
 public:
  explicit AotiGradient(std::shared_ptr<AotiUnit> unit) : unit_(std::move(unit)) {}
  at::Tensor operator()(const at::Tensor& x_t, const at::Tensor& t, const at::Tensor& y) override {
    return (*unit_)({x_t, t, y});
  }

 private:
  std::shared_ptr<AotiUnit> unit_;
};

StepPlan step_plan(const json::Value& v, const std::string& what) {
  StepPlan plan;
  const std::string& method = v.at("method", what).as_string(what + ".method");
  if (method == "ddim") plan.method = Method::DDIM;
  else if (method == "ddpm") plan.method = Method::DDPM;
  else throw std::runtime_error(cat(what, ".method='", method, "': expected 'ddim' or 'ddpm'"));
  std::map<std::string, at::Tensor> tables;
  for (const auto& [name, values] : v.at("tables", what).as_object(what + ".tables")) {
    const auto& arr = values.as_array(cat(what, ".tables.", name));
    if (name == "timestep_map") {
      std::vector<int64_t> ints;
      for (const auto& x : arr) ints.push_back(x.as_int(cat(what, ".tables.timestep_map")));
      tables[name] = at::tensor(ints, at::kLong);
    } else {
      std::vector<double> xs;
      for (const auto& x : arr) xs.push_back(x.as_number(cat(what, ".tables.", name)));
      tables[name] = at::tensor(xs, at::kDouble);
    }
  }
  plan.schedule = Schedule::from_tables(tables, v.at("original_num_steps", what).as_int(what),
                                        v.at("rescale_timesteps", what).as_bool(what));
  return plan;
}

std::shared_ptr<Stage> load_stage(const fs::path& folder, const std::string& role, const json::Value& m,
                                  at::Device device) {
  const std::string what = cat(role, " in ", (folder / "manifest.json").string());
  auto stage = std::make_shared<Stage>();
  stage->role = role;
  stage->kind = m.at("kind", what).as_string(what + ".kind");
  const char* expected = role == "model" ? "unet" : role == "classifier" ? "classifier" : "superres";
  if (stage->kind != expected)
    throw std::runtime_error(cat(what, ": kind '", stage->kind, "', expected '", expected, "'"));
  const int64_t c = m.at("in_channels", what).as_int(what), size = m.at("image_size", what).as_int(what);
  stage->image_shape = {c, size, size};
  if (!m.at("num_classes", what).is_null()) stage->num_classes = m.at("num_classes", what).as_int(what);
  if (stage->kind == "classifier") stage->num_classes = m.at("out_channels", what).as_int(what);
  auto unit = std::make_shared<AotiUnit>((folder / m.at("file", what).as_string(what + ".file")).string(), device);
  stage->run = [unit](const std::vector<at::Tensor>& in) { return (*unit)(in); };
  if (stage->kind == "classifier") {
    stage->gradient = std::make_shared<AotiGradient>(unit);
    return stage;
  }
  stage->denoiser = std::make_shared<AotiDenoiser>(unit);
  const std::string& variance = m.at("variance", what).as_string(what + ".variance");
  if (variance == "learned_range") stage->variance = Variance::LearnedRange;
  else if (variance == "fixed_small") stage->variance = Variance::FixedSmall;
  else if (variance == "fixed_large") stage->variance = Variance::FixedLarge;
  else throw std::runtime_error(cat(what, ".variance='", variance, "': expected learned_range, fixed_small or fixed_large"));
  // diffusion.predict_xstart: absent in packages written before it was recorded (eps models).
  const json::Value& diffusion = m.at("diffusion", what);
  if (diffusion.has("predict_xstart") && diffusion.at("predict_xstart", what).as_bool(what + ".diffusion.predict_xstart"))
    stage->prediction = Prediction::XStart;
  for (const auto& [name, plan] : m.at("schedules", what).as_object(what + ".schedules"))
    stage->plans[name] = step_plan(plan, cat(what, ".schedules.", name));
  return stage;
}

const StepPlan& find_plan(const Stage& stage, const std::string& steps, const char* arg) {
  auto it = stage.plans.find(steps);
  if (it != stage.plans.end()) return it->second;
  std::string have;
  for (const auto& [name, _] : stage.plans) have += (have.empty() ? "" : ", ") + name;
  throw std::invalid_argument(cat(arg, "='", steps, "': the package has the ", stage.role, "'s tables for ", have,
                                  " only; export it again with --steps including it"));
}

at::Tensor seed_tensor(const std::vector<uint64_t>& seeds, at::Device device) {
  std::vector<int64_t> bits(seeds.begin(), seeds.end());  // uint64 bit patterns, as the core takes
  return at::tensor(bits, at::kLong).to(device);
}

std::string join(const std::vector<int64_t>& xs) {
  std::string s;
  for (size_t i = 0; i < xs.size() && i < 5; ++i) s += (i ? ", " : "") + std::to_string(xs[i]);
  return "[" + s + "]";
}

}  // namespace

// ---------------------------------------------------------------------------------------------

std::shared_ptr<Denoiser> load_aoti_denoiser(const std::string& path, at::Device device) {
  return std::make_shared<AotiDenoiser>(std::make_shared<AotiUnit>(path, device));
}

std::shared_ptr<ClassifierGrad> load_aoti_gradient(const std::string& path, at::Device device) {
  return std::make_shared<AotiGradient>(std::make_shared<AotiUnit>(path, device));
}

std::shared_ptr<Package> Package::load(const std::string& folder, const std::string& device_arg) {
  const fs::path dir(folder);
  if (!fs::is_directory(dir))
    throw std::runtime_error(cat(folder, ": no such package folder (make one with `admrt export aoti`)"));
  const fs::path manifest_path = dir / "manifest.json";
  if (!fs::is_regular_file(manifest_path))
    throw std::runtime_error(cat(folder, ": has no manifest.json; not an admrt package (make one with `admrt export aoti`)"));
  const json::Value m = json::parse_file(manifest_path.string());
  const std::string what = manifest_path.string();
  if (!m.has("format") || m.at("format", what).type != json::Value::Type::String ||
      m.at("format", what).string != "admrt-aoti")
    throw std::runtime_error(cat(what, ": not an admrt AOTInductor package manifest"));
  const int64_t version = m.at("format_version", what).as_int(what + ".format_version");
  if (version != kPackageFormatVersion)
    throw std::runtime_error(cat(what, ": format_version ", version, ", but this admrt reads version ",
                                 kPackageFormatVersion, "; export the package again with this admrt"));
  const std::string& built_for = m.at("device", what).as_string(what + ".device");
  const std::string device_str = device_arg.empty() ? built_for : device_arg;
  at::Device device = at::kCPU;
  try {
    device = at::Device(device_str);
  } catch (const std::exception&) {
    throw std::invalid_argument(cat("device='", device_str, "': expected cpu, cuda or cuda:N"));
  }
  if (built_for != c10::DeviceTypeName(device.type(), /*lower_case=*/true))
    throw std::invalid_argument(cat("device='", device_str, "': the package ", folder, " was compiled for '",
                                    built_for, "'; use device '", built_for, "' or export it again on ",
                                    device_str));
#ifdef ADMRT_WITH_CUDA
  // One device for the weights, the buffers and the graph pool: "cuda" means the current one.
  if (device.is_cuda() && !device.has_index()) device = at::Device(at::kCUDA, c10::cuda::current_device());
#else
  if (device.is_cuda())
    throw std::invalid_argument(cat("device='", device_str, "': this admrt was built without CUDA"));
#endif
  auto p = std::shared_ptr<Package>(new Package());
  p->folder_ = folder;
  p->device_ = device;
  p->dtype_ = m.at("dtype", what).as_string(what + ".dtype");
  p->max_batch_ = m.at("batch", what).at("max", what + ".batch").as_int(what + ".batch.max");
  p->default_steps_ = m.at("default_steps", what).as_string(what + ".default_steps");
  if (!m.at("default_upsampler_steps", what).is_null())
    p->default_upsampler_steps_ = m.at("default_upsampler_steps", what).as_string(what);
  p->seeded_noise_ = m.at("seeded_noise", what).as_string(what + ".seeded_noise");
  if (m.has("weights")) p->weights_ = m.at("weights", what).as_string(what + ".weights");
  const json::Value& models = m.at("models", what);
  p->base_ = load_stage(dir, "model", models.at("model", what + ".models"), device);
  if (models.has("classifier")) p->classifier_ = load_stage(dir, "classifier", models.at("classifier", what), device);
  if (models.has("upsampler")) {
    p->upsampler_ = load_stage(dir, "upsampler", models.at("upsampler", what), device);
    const json::Value& low = models.at("upsampler", what).at("low_res_size", what);
    const int64_t low_size = low.is_null() ? p->base_->image_shape[1] : low.as_int(what);
    if (low_size != p->base_->image_shape[1] || p->upsampler_->image_shape[0] != p->base_->image_shape[0])
      throw std::runtime_error(cat(what, ": the upsampler takes ", p->upsampler_->image_shape[0], "x", low_size, "px ",
                                   "images, but the model samples ", p->base_->image_shape[0], "x",
                                   p->base_->image_shape[1], "px"));
    p->upsampler_->low_res_shape = {p->base_->image_shape[0], low_size, low_size};
  }
  return p;
}

const Stage& Package::stage(const std::string& role) const {
  if (role == "model") return *base_;
  if (role == "classifier" && classifier_) return *classifier_;
  if (role == "upsampler" && upsampler_) return *upsampler_;
  throw std::invalid_argument(cat("role='", role, "': the package ", folder_, " has no such model"));
}

std::optional<int64_t> Package::num_classes() const {
  return classifier_ ? classifier_->num_classes : base_->num_classes;
}

// ---------------------------------------------------------------------------------------------

ContextParams Context::default_params() { return ContextParams{}; }

Context::Context(std::shared_ptr<Package> package, ContextParams params)
    : package_(std::move(package)), params_(std::move(params)) {
  if (!package_) throw std::invalid_argument("package: expected a loaded package, got null");
  if (params_.batch_size < 1 || params_.batch_size > package_->max_batch())
    throw std::invalid_argument(cat("batch_size=", params_.batch_size, ": the package ", package_->folder(),
                                    " was exported for batches of 1..", package_->max_batch()));
  if (!params_.dtype.empty() && params_.dtype != package_->dtype())
    throw std::invalid_argument(cat("dtype='", params_.dtype, "': the package was exported in ", package_->dtype(),
                                    " (precision is fixed at export)"));
  if (!(params_.eta >= 0 && std::isfinite(params_.eta)))
    throw std::invalid_argument(cat("eta=", params_.eta, ": expected a finite eta >= 0"));
  if (params_.steps.empty()) params_.steps = package_->default_steps();
  base_plan_ = &find_plan(package_->base(), params_.steps, "steps");
  if (package_->upsampler()) {
    if (params_.upsampler_steps.empty()) params_.upsampler_steps = package_->default_upsampler_steps();
    up_plan_ = &find_plan(*package_->upsampler(), params_.upsampler_steps, "upsampler_steps");
  }
}

Context::~Context() = default;

int64_t Context::steps_per_batch() const {
  return base_plan_->schedule.num_steps + (up_plan_ ? up_plan_->schedule.num_steps : 0);
}

Sampler& Context::sampler(const Stage& stage, const StepPlan& plan, int64_t batch, bool guided) {
  Cached& cached = samplers_[stage.role];
  if (cached.sampler && cached.batch == batch && cached.guided == guided) return *cached.sampler;
  cached.sampler.reset();  // free the old buffers and graph first
  SamplerParams p = admrt::default_params();
  p.method = plan.method;
  p.variance = stage.variance;
  p.prediction = stage.prediction;
  p.eta = params_.eta;
  p.clip_denoised = params_.clip_denoised;
  p.check_finite = params_.check_finite;
  p.noise = NoiseMode::Seeded;
  p.cuda_graphs = params_.cuda_graphs;
  p.batch_size = batch;
  p.image_shape = stage.image_shape;
  p.low_res_shape = stage.low_res_shape;
  p.device = package_->device();
  std::shared_ptr<ClassifierGrad> grad = guided ? package_->classifier()->gradient : nullptr;
  cached.sampler = std::make_unique<Sampler>(stage.denoiser, grad, plan.schedule, p);
  cached.batch = batch;
  cached.guided = guided;
  return *cached.sampler;
}

Context::Request Context::request(const std::vector<int64_t>& classes, const std::vector<double>& guidance,
                                  const std::vector<uint64_t>& seeds, int64_t num) const {
  const Package& pkg = *package_;
  const std::optional<int64_t> k = pkg.num_classes();
  Request r;
  // Labels, validated once on the host (nothing checks them per step).
  if (classes.empty()) {
    if (num <= 0) throw std::invalid_argument(cat("num=", num, ": give classes or a positive num"));
    r.n = num;
    if (k) for (int64_t i = 0; i < r.n; ++i) r.labels.push_back(i % *k);
  } else {
    if (num >= 0 && num != static_cast<int64_t>(classes.size()))
      throw std::invalid_argument(cat("num=", num, ": differs from the number of classes, ", classes.size()));
    if (!k) throw std::invalid_argument("classes: the model is unconditional and the package has no classifier");
    std::vector<int64_t> bad;
    for (int64_t c : classes)
      if (c < 0 || c >= *k) bad.push_back(c);
    if (!bad.empty())
      throw std::invalid_argument(cat("classes: ", join(bad), " out of range; expected ids in [0, ", *k, ")"));
    const auto& model_k = pkg.base().num_classes;
    if (model_k && *model_k < *k)
      for (int64_t c : classes)
        if (c >= *model_k)
          throw std::invalid_argument(cat("classes: ", c, " out of range for the model; expected ids in [0, ",
                                          *model_k, ")"));
    r.labels = classes;
    r.n = static_cast<int64_t>(classes.size());
  }
  const int64_t n = r.n;
  // Guidance scales, one per image.
  if (guidance.empty()) r.scales.assign(n, pkg.classifier() ? 1.0 : 0.0);
  else if (guidance.size() == 1) r.scales.assign(n, guidance[0]);
  else if (static_cast<int64_t>(guidance.size()) == n) r.scales = guidance;
  else throw std::invalid_argument(cat("guidance: expected one scale or ", n, " (one per image), got ", guidance.size()));
  bool any = false;
  for (double s : r.scales) {
    if (!std::isfinite(s)) throw std::invalid_argument(cat("guidance=", s, ": expected finite scales"));
    any = any || s != 0.0;
  }
  if (any && !pkg.classifier())
    throw std::invalid_argument("guidance: non-zero scales need a classifier, and the package has none (use 0)");
  r.guided = any;  // decided once, on the host
  // Seeds: one per image, or s for s, s+1, ....
  r.seeds.resize(n);
  if (seeds.empty()) for (int64_t i = 0; i < n; ++i) r.seeds[i] = static_cast<uint64_t>(i);  // as admrt.Engine
  else if (seeds.size() == 1) for (int64_t i = 0; i < n; ++i) r.seeds[i] = seeds[0] + static_cast<uint64_t>(i);
  else if (static_cast<int64_t>(seeds.size()) == n) r.seeds = seeds;
  else throw std::invalid_argument(cat("seeds: expected ", n, " (one per image) or one, got ", seeds.size()));
  return r;
}

void Context::validate(const std::vector<int64_t>& classes, const std::vector<double>& guidance, int64_t num) const {
  request(classes, guidance, {0}, num);
}

Result Context::sample(const std::vector<int64_t>& classes, const std::vector<double>& guidance,
                       const std::vector<uint64_t>& seeds, const ProgressFn& progress, int64_t num) {
  const Package& pkg = *package_;
  const Request req = request(classes, guidance, seeds, num);
  const int64_t n = req.n;
  const auto& labels = req.labels;
  const auto& scales = req.scales;
  const auto& seed_of = req.seeds;
  const bool guided = req.guided;
  const at::Device dev = pkg.device();
  const int64_t bsz = std::min(params_.batch_size, n);
  const int64_t batches = (n + bsz - 1) / bsz;
  const int64_t total = batches * steps_per_batch();
  int64_t done = 0;
  ProgressFn on_step;
  if (progress) on_step = [&](int64_t, int64_t) { progress(++done, total); };

  std::vector<at::Tensor> images, base_images, floats;
  for (int64_t start = 0; start < n; start += bsz) {
    const int64_t real = std::min(bsz, n - start);
    std::vector<int64_t> idx(bsz);  // the last batch repeats its last image
    for (int64_t i = 0; i < bsz; ++i) idx[i] = start + std::min(i, real - 1);
    BatchInputs in;
    if (!labels.empty()) {
      std::vector<int64_t> y;
      for (int64_t i : idx) y.push_back(labels[i]);
      in.y = at::tensor(y, at::kLong).to(dev);
    }
    std::vector<uint64_t> b_seeds;
    for (int64_t i : idx) b_seeds.push_back(seed_of[i]);
    in.seeds = seed_tensor(b_seeds, dev);
    if (guided) {
      std::vector<float> g;
      for (int64_t i : idx) g.push_back(static_cast<float>(scales[i]));
      in.guidance = at::tensor(g, at::kFloat).to(dev);
    }
    at::Tensor x = sampler(pkg.base(), *base_plan_, bsz, guided).sample(in, on_step);
    at::Tensor img = to_uint8_nhwc(x);
    if (pkg.upsampler()) {
      base_images.push_back(img.slice(0, 0, real).cpu());
      // ADM-U is conditioned on the saved low-res samples (uint8 -> [-1, 1]).
      BatchInputs up;
      up.y = in.y;
      up.low_res = img.permute({0, 3, 1, 2}).to(at::kFloat) / 127.5 - 1;
      std::vector<uint64_t> up_seeds;
      for (uint64_t s : b_seeds) up_seeds.push_back(derive_seed(s, kUpsamplerStream));
      up.seeds = seed_tensor(up_seeds, dev);
      x = sampler(*pkg.upsampler(), *up_plan_, bsz, false).sample(up, on_step);
      img = to_uint8_nhwc(x);
    }
    images.push_back(img.slice(0, 0, real).cpu());
    if (params_.keep_float) floats.push_back(x.slice(0, 0, real).cpu());
  }
  Result r;
  r.images = at::cat(images);
  if (!labels.empty()) r.labels = at::tensor(labels, at::kLong);
  if (!base_images.empty()) r.base_images = at::cat(base_images);
  if (!floats.empty()) r.samples = at::cat(floats);
  return r;
}

}  // namespace admrt
