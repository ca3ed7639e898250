// Packages: manifest.json + AOTInductor units of a folder (admrt export aoti) loaded as a Stack
// (admrt.h); the Context that runs them is context.cpp.
#include "admrt.h"

#include <torch/csrc/inductor/aoti_package/model_package_loader.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <mutex>
#include <sstream>
#include <stdexcept>

#include "text.h"

#include "json.h"

#ifdef ADMRT_WITH_CUDA
#include <c10/cuda/CUDAFunctions.h>
#endif

namespace admrt {
namespace {

namespace fs = std::filesystem;
using torch::inductor::AOTIModelPackageLoader;

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

// A manifest schedule entry: the tables of one respacing.
Schedule manifest_schedule(const json::Value& v, const std::string& what) {
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
  return Schedule::from_tables(tables, v.at("original_num_steps", what).as_int(what),
                               v.at("rescale_timesteps", what).as_bool(what));
}

Stage load_stage(const fs::path& folder, const std::string& role, const json::Value& m, at::Device device) {
  const std::string what = cat(role, " in ", (folder / "manifest.json").string());
  Stage stage;
  stage.role = role;
  stage.kind = m.at("kind", what).as_string(what + ".kind");
  const char* expected = role == "model" ? "unet" : role == "classifier" ? "classifier" : "superres";
  if (stage.kind != expected)
    throw std::runtime_error(cat(what, ": kind '", stage.kind, "', expected '", expected, "'"));
  const int64_t c = m.at("in_channels", what).as_int(what), size = m.at("image_size", what).as_int(what);
  stage.image_shape = {c, size, size};
  stage.out_channels = m.at("out_channels", what).as_int(what);
  if (!m.at("num_classes", what).is_null()) stage.num_classes = m.at("num_classes", what).as_int(what);
  if (stage.kind == "classifier") stage.num_classes = stage.out_channels;
  auto unit = std::make_shared<AotiUnit>((folder / m.at("file", what).as_string(what + ".file")).string(), device);
  stage.run = [unit](const std::vector<at::Tensor>& in) { return (*unit)(in); };
  if (stage.kind == "classifier") {
    stage.gradient = std::make_shared<AotiGradient>(unit);
    return stage;
  }
  stage.denoiser = std::make_shared<AotiDenoiser>(unit);
  try {
    stage.variance = parse_variance(m.at("variance", what).as_string(what + ".variance"), what + ".variance");
  } catch (const std::invalid_argument& e) {
    throw std::runtime_error(e.what());  // a damaged manifest, not a bad argument
  }
  // diffusion.predict_xstart: absent in packages written before it was recorded (eps models).
  const json::Value& diffusion = m.at("diffusion", what);
  if (diffusion.has("predict_xstart") && diffusion.at("predict_xstart", what).as_bool(what + ".diffusion.predict_xstart"))
    stage.prediction = Prediction::XStart;
  // The tables of every respacing it carries, keyed by the respacing's canonical text (plan.h):
  // DDPM and DDIM over one respacing share its tables, so the context's method picks the step.
  auto plans = std::make_shared<std::map<std::string, Schedule>>();
  for (const auto& [name, plan] : m.at("schedules", what).as_object(what + ".schedules")) {
    const std::string entry = cat(what, ".schedules.", name);
    (*plans)[StepPlan::parse(name, entry).respacing()] = manifest_schedule(plan, entry);
  }
  const std::string folder_name = folder.string();
  stage.schedule = [plans, role, folder_name](const StepPlan& plan) {
    auto it = plans->find(plan.respacing());
    if (it != plans->end()) return it->second;
    std::string have;
    for (const auto& [name, _] : *plans) have += (have.empty() ? "" : ", ") + name;
    throw std::invalid_argument(cat(role == "model" ? "steps" : "upsampler_steps", "='", plan.str(),
                                    "': the package ", folder_name, " has the ", role, "'s tables for ", have,
                                    " only; export it again with --steps including '", plan.respacing(), "'"));
  };
  return stage;
}

}  // namespace

// ---------------------------------------------------------------------------------------------

std::shared_ptr<Denoiser> load_aoti_denoiser(const std::string& path, at::Device device) {
  return std::make_shared<AotiDenoiser>(std::make_shared<AotiUnit>(path, device));
}

std::shared_ptr<ClassifierGrad> load_aoti_gradient(const std::string& path, at::Device device) {
  return std::make_shared<AotiGradient>(std::make_shared<AotiUnit>(path, device));
}

std::shared_ptr<Stack> Stack::load_package(const std::string& folder, const std::string& device_arg) {
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
  StackOptions options;
  options.device = device;
  options.package = fs::weakly_canonical(dir).string();
  options.dtype = m.at("dtype", what).as_string(what + ".dtype");
  options.max_batch = m.at("batch", what).at("max", what + ".batch").as_int(what + ".batch.max");
  options.default_steps = m.at("default_steps", what).as_string(what + ".default_steps");
  if (!m.at("default_upsampler_steps", what).is_null())
    options.default_upsampler_steps = m.at("default_upsampler_steps", what).as_string(what);
  const std::string& noise = m.at("seeded_noise", what).as_string(what + ".seeded_noise");
  if (noise != kSeededNoiseFormat)
    throw std::runtime_error(cat(what, ".seeded_noise='", noise, "': this admrt draws '", kSeededNoiseFormat,
                                 "'; export the package again with this admrt"));
  if (m.has("weights")) options.weights = m.at("weights", what).as_string(what + ".weights");
  const json::Value& models = m.at("models", what);
  Stage base = load_stage(dir, "model", models.at("model", what + ".models"), device);
  std::optional<Stage> classifier, upsampler;
  if (models.has("classifier")) classifier = load_stage(dir, "classifier", models.at("classifier", what), device);
  if (models.has("upsampler")) {
    upsampler = load_stage(dir, "upsampler", models.at("upsampler", what), device);
    const json::Value& low = models.at("upsampler", what).at("low_res_size", what);
    const int64_t low_size = low.is_null() ? base.image_shape[1] : low.as_int(what);
    upsampler->low_res_shape = {upsampler->image_shape[0], low_size, low_size};
  }
  try {
    return std::make_shared<Stack>(std::move(base), std::move(classifier), std::move(upsampler), options);
  } catch (const std::invalid_argument& e) {
    throw std::runtime_error(cat(what, ": ", e.what()));
  }
}

}  // namespace admrt
