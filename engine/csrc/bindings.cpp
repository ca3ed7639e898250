// pybind11 entry point of admrt.engine._core: the sampler loop with Python callables behind the
// Denoiser / ClassifierGrad interfaces (the eager and torch.compile backends). The loop itself
// runs with the GIL released; it is taken only to call back into Python.
#include <torch/extension.h>

#include <optional>
#include <stdexcept>
#include <string>

#include "sampler.h"

namespace py = pybind11;

namespace {

at::Tensor as_tensor(const py::object& result, const char* what) {
  if (!THPVariable_Check(result.ptr()))
    throw std::runtime_error(std::string(what) + ": expected a torch.Tensor, got " +
                             std::string(py::str(py::type::of(result).attr("__name__"))));
  return THPVariable_Unpack(result.ptr());
}

py::object opt(const std::optional<at::Tensor>& t) { return t ? py::cast(*t) : py::none(); }

// fn(x_t, t, y | None, low_res | None) -> Tensor
class PyDenoiser final : public admrt::Denoiser {
 public:
  explicit PyDenoiser(py::object fn) : fn_(std::move(fn)) {}
  at::Tensor operator()(const at::Tensor& x_t, const at::Tensor& t, const std::optional<at::Tensor>& y,
                        const std::optional<at::Tensor>& low_res) override {
    py::gil_scoped_acquire gil;
    return as_tensor(fn_(x_t, t, opt(y), opt(low_res)), "model output");
  }

 private:
  py::object fn_;
};

// fn(x_t, t, y) -> grad_x log p(y | x_t)
class PyClassifierGrad final : public admrt::ClassifierGrad {
 public:
  explicit PyClassifierGrad(py::object fn) : fn_(std::move(fn)) {}
  at::Tensor operator()(const at::Tensor& x_t, const at::Tensor& t, const at::Tensor& y) override {
    py::gil_scoped_acquire gil;
    return as_tensor(fn_(x_t, t, y), "classifier gradient");
  }

 private:
  py::object fn_;
};

admrt::Method parse_method(const std::string& s) {
  if (s == "ddpm") return admrt::Method::DDPM;
  if (s == "ddim") return admrt::Method::DDIM;
  throw std::invalid_argument("method='" + s + "': expected 'ddpm' or 'ddim'");
}

admrt::Variance parse_variance(const std::string& s) {
  if (s == "learned_range") return admrt::Variance::LearnedRange;
  if (s == "fixed_small") return admrt::Variance::FixedSmall;
  if (s == "fixed_large") return admrt::Variance::FixedLarge;
  throw std::invalid_argument("variance='" + s + "': expected 'learned_range', 'fixed_small' or 'fixed_large'");
}

admrt::NoiseMode parse_noise(const std::string& s) {
  if (s == "seeded") return admrt::NoiseMode::Seeded;
  if (s == "reference") return admrt::NoiseMode::Reference;
  throw std::invalid_argument("noise='" + s + "': expected 'seeded' or 'reference'");
}

at::Tensor sample_py(py::object model, py::object classifier, const admrt::Schedule& schedule,
                     std::vector<int64_t> shape, const std::string& method, const std::string& variance,
                     double eta, bool clip_denoised, bool check_finite, const std::string& noise,
                     std::optional<at::Tensor> y, std::optional<at::Tensor> low_res,
                     std::optional<at::Tensor> guidance, std::vector<uint64_t> seeds,
                     std::optional<at::Generator> generator, std::optional<at::Tensor> x_T,
                     std::optional<at::Device> device, py::object progress) {
  admrt::SamplerOptions options;
  options.method = parse_method(method);
  options.variance = parse_variance(variance);
  options.eta = eta;
  options.clip_denoised = clip_denoised;
  options.check_finite = check_finite;
  options.noise = parse_noise(noise);

  admrt::SampleRequest request;
  request.shape = std::move(shape);
  request.device = device.value_or(at::Device(at::kCPU));
  request.y = std::move(y);
  request.low_res = std::move(low_res);
  request.guidance = std::move(guidance);
  request.seeds = std::move(seeds);
  request.generator = std::move(generator);
  request.x_T = std::move(x_T);

  PyDenoiser den(std::move(model));
  std::optional<PyClassifierGrad> clf;
  if (!classifier.is_none()) clf.emplace(std::move(classifier));
  admrt::ProgressFn on_step;
  if (!progress.is_none()) {
    on_step = [&progress](int64_t done, int64_t total) {
      py::gil_scoped_acquire gil;
      progress(done, total);
    };
  }
  at::Tensor out;
  {
    py::gil_scoped_release nogil;
    out = admrt::sample(den, clf ? &*clf : nullptr, schedule, options, request, on_step);
  }
  return out;
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "admrt C++ sampling core: guided DDPM / DDIM loops (see engine/csrc/sampler.h)";
  m.def("torch_version", []() { return std::string(TORCH_VERSION); },
        "The libtorch version this core was built against.");

  py::class_<admrt::Schedule>(m, "Schedule",
                              "Host copy of admrt.diffusion.DiffusionTables (float64 tables by name).")
      .def(py::init(&admrt::Schedule::from_tables), py::arg("tables"), py::arg("original_num_steps"),
           py::arg("rescale_timesteps") = false)
      .def_readonly("num_steps", &admrt::Schedule::num_steps)
      .def_readonly("original_num_steps", &admrt::Schedule::original_num_steps)
      .def_readonly("timestep_map", &admrt::Schedule::timestep_map);

  m.def("sample", &sample_py,
        "Run the reverse process for one batch; returns x_0 (B, C, H, W) float32.\n"
        "model(x_t, t, y, low_res) -> eps or [eps | v]; classifier(x_t, t, y) -> grad log p(y|x_t) or None.",
        py::arg("model"), py::arg("classifier"), py::arg("schedule"), py::arg("shape"), py::kw_only(),
        py::arg("method") = "ddim", py::arg("variance") = "learned_range", py::arg("eta") = 0.0,
        py::arg("clip_denoised") = true, py::arg("check_finite") = true, py::arg("noise") = "seeded",
        py::arg("y") = py::none(), py::arg("low_res") = py::none(), py::arg("guidance") = py::none(),
        py::arg("seeds") = std::vector<uint64_t>{}, py::arg("generator") = py::none(),
        py::arg("x_T") = py::none(), py::arg("device") = py::none(), py::arg("progress") = py::none());
  m.def("to_uint8_nhwc", &admrt::to_uint8_nhwc, py::arg("x"),
        "((x + 1) * 127.5).clamp(0, 255) as uint8, NCHW -> NHWC.");
  m.def("noise_seed", &admrt::noise_seed, py::arg("seed"), py::arg("draw"),
        "Generator seed of a sample's noise draw (0: x_T, k: step k) in seeded mode.");
}
