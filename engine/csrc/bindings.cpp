// pybind11 module admrt.core on top of the Python-free libadmrt: Python
// callables behind the Denoiser / ClassifierGrad interfaces (the eager and torch.compile
// backends), the Sampler context, its parameters as real enums, and the seeded noise. The loop
// runs with the GIL released; it is taken only to call back into Python (on CUDA, only while a
// step is captured: replays run no Python).
#include <torch/extension.h>

#include <memory>
#include <optional>
#include <stdexcept>
#include <string>

#include "admrt.h"
#include "bindings_runfolder.h"
#include "noise.h"
#include "npz.h"
#include "philox.h"
#include "sampler.h"

namespace py = pybind11;

namespace {

at::Tensor as_tensor(const py::object& result, const char* what) {
  if (!THPVariable_Check(result.ptr()))
    throw std::runtime_error(std::string(what) + ": expected a torch.Tensor, got " +
                             std::string(py::str(py::type::of(result).attr("__name__"))));
  return THPVariable_Unpack(result.ptr());
}

// Holds a Python callable; takes the GIL to call it and to let it go.
class PyCallable {
 public:
  explicit PyCallable(py::object fn) : fn_(new py::object(std::move(fn))) {}
  ~PyCallable() {
    py::gil_scoped_acquire gil;
    delete fn_;
  }
  PyCallable(const PyCallable&) = delete;
  PyCallable& operator=(const PyCallable&) = delete;

 protected:
  py::object* fn_;
};

// fn(x_t, t, y, low_res | None) -> Tensor
class PyDenoiser final : public admrt::Denoiser, PyCallable {
 public:
  using PyCallable::PyCallable;
  at::Tensor operator()(const at::Tensor& x_t, const at::Tensor& t, const at::Tensor& y,
                        const std::optional<at::Tensor>& low_res) override {
    py::gil_scoped_acquire gil;
    py::object lr = low_res ? py::cast(*low_res) : py::none();
    return as_tensor((*fn_)(x_t, t, y, lr), "model output");
  }
};

// fn(x_t, t, y) -> grad_x log p(y | x_t)
class PyClassifierGrad final : public admrt::ClassifierGrad, PyCallable {
 public:
  using PyCallable::PyCallable;
  at::Tensor operator()(const at::Tensor& x_t, const at::Tensor& t, const at::Tensor& y) override {
    py::gil_scoped_acquire gil;
    return as_tensor((*fn_)(x_t, t, y), "classifier gradient");
  }
};

// model / classifier: a C++ unit (a package's, admrt.core.DenoiserUnit / GradientUnit), called with no
// Python in the loop, or any Python callable.
// schedule: one Schedule, or a list of them (the plans of a step-batching context).
std::unique_ptr<admrt::Sampler> make_sampler(py::object model, py::object classifier, py::object schedule,
                                             const admrt::SamplerParams& params) {
  std::vector<admrt::Schedule> schedules;
  if (py::isinstance<admrt::Schedule>(schedule)) schedules.push_back(schedule.cast<admrt::Schedule>());
  else schedules = schedule.cast<std::vector<admrt::Schedule>>();
  std::shared_ptr<admrt::ClassifierGrad> clf;
  if (py::isinstance<admrt::ClassifierGrad>(classifier)) clf = classifier.cast<std::shared_ptr<admrt::ClassifierGrad>>();
  else if (!classifier.is_none()) clf = std::make_shared<PyClassifierGrad>(std::move(classifier));
  std::shared_ptr<admrt::Denoiser> den;
  if (py::isinstance<admrt::Denoiser>(model)) den = model.cast<std::shared_ptr<admrt::Denoiser>>();
  else den = std::make_shared<PyDenoiser>(std::move(model));
  return std::make_unique<admrt::Sampler>(std::move(den), std::move(clf), schedules, params);
}

py::object optional_tensor(const at::Tensor& t) { return t.defined() ? py::cast(t) : py::none(); }

// schedule(plan: StepPlan) -> Schedule (admrt.diffusion.build_tables), called when a Context is built.
class PySchedule final : PyCallable {
 public:
  using PyCallable::PyCallable;
  admrt::Schedule operator()(const admrt::StepPlan& plan) {
    py::gil_scoped_acquire gil;
    return (*fn_)(plan).cast<admrt::Schedule>();
  }
};

admrt::Stage make_stage(std::string role, std::string kind, std::vector<int64_t> image_shape,
                        std::vector<int64_t> low_res_shape, std::optional<int64_t> num_classes, int64_t out_channels,
                        const std::string& variance, admrt::Prediction prediction, py::object unit, py::object schedule) {
  admrt::Stage stage;
  stage.role = std::move(role);
  stage.kind = std::move(kind);
  stage.image_shape = std::move(image_shape);
  stage.low_res_shape = std::move(low_res_shape);
  stage.num_classes = num_classes;
  stage.out_channels = out_channels;
  stage.variance = admrt::parse_variance(variance);
  stage.prediction = prediction;
  if (stage.kind == "classifier") {
    if (py::isinstance<admrt::ClassifierGrad>(unit)) stage.gradient = unit.cast<std::shared_ptr<admrt::ClassifierGrad>>();
    else stage.gradient = std::make_shared<PyClassifierGrad>(unit);
    auto grad = stage.gradient;
    stage.run = [grad](const std::vector<at::Tensor>& in) { return (*grad)(in.at(0), in.at(1), in.at(2)); };
  } else {
    if (py::isinstance<admrt::Denoiser>(unit)) stage.denoiser = unit.cast<std::shared_ptr<admrt::Denoiser>>();
    else stage.denoiser = std::make_shared<PyDenoiser>(unit);
    auto den = stage.denoiser;
    stage.run = [den](const std::vector<at::Tensor>& in) {
      return (*den)(in.at(0), in.at(1), in.at(2), in.size() > 3 ? std::optional<at::Tensor>(in[3]) : std::nullopt);
    };
    if (schedule.is_none()) throw std::invalid_argument(stage.role + ": expected schedule(plan) -> Schedule");
    auto fn = std::make_shared<PySchedule>(std::move(schedule));
    stage.schedule = [fn](const admrt::StepPlan& plan) { return (*fn)(plan); };
  }
  return stage;
}

py::tuple context_sample(admrt::Context& self, std::vector<int64_t> classes, std::vector<double> guidance,
                         std::vector<uint64_t> seeds, std::optional<int64_t> num, py::object progress) {
  // Between two steps: a pending Ctrl-C (raised as KeyboardInterrupt), then the caller's progress.
  admrt::ProgressFn on_step = [&progress](int64_t done, int64_t total) {
    py::gil_scoped_acquire gil;
    if (PyErr_CheckSignals() != 0) throw py::error_already_set();
    if (!progress.is_none()) progress(done, total);
  };
  admrt::Result r;
  {
    py::gil_scoped_release nogil;
    r = self.sample(classes, guidance, seeds, on_step, num);
  }
  return py::make_tuple(r.images, optional_tensor(r.labels), optional_tensor(r.base_images),
                        optional_tensor(r.samples), r.seeds);
}

at::Tensor sample_py(admrt::Sampler& self, std::optional<at::Tensor> y, std::optional<at::Tensor> low_res,
                     std::optional<at::Tensor> guidance, std::optional<at::Tensor> seeds,
                     std::optional<at::Generator> generator, std::optional<at::Tensor> x_T, py::object progress) {
  admrt::BatchInputs in;
  in.y = std::move(y);
  in.low_res = std::move(low_res);
  in.guidance = std::move(guidance);
  in.seeds = std::move(seeds);
  in.generator = std::move(generator);
  in.x_T = std::move(x_T);
  admrt::ProgressFn on_step;
  if (!progress.is_none()) {
    on_step = [&progress](int64_t done, int64_t total) {
      py::gil_scoped_acquire gil;
      progress(done, total);
    };
  }
  py::gil_scoped_release nogil;
  return self.sample(in, on_step);
}

}  // namespace

PYBIND11_MODULE(core, m) {
  m.doc() = "admrt C++ sampling core: the Sampler context for guided DDPM / DDIM (engine/csrc/sampler.h)";
  m.def("torch_version", []() { return std::string(TORCH_VERSION); },
        "The libtorch version this core was built against.");
  m.def("built_with_cuda", []() {
#ifdef ADMRT_WITH_CUDA
    return true;
#else
    return false;
#endif
  }, "Whether this core has its CUDA parts (seeded-noise kernel, graph capture).");

  py::enum_<admrt::Method> methods(m, "Method");
  for (const auto& [method, name] : admrt::kMethods) {
    std::string upper(name);
    for (char& c : upper) c = c == '-' ? '_' : static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
    methods.value(upper.c_str(), method);
  }
  py::enum_<admrt::Variance>(m, "Variance")
      .value("LEARNED_RANGE", admrt::Variance::LearnedRange)
      .value("FIXED_SMALL", admrt::Variance::FixedSmall)
      .value("FIXED_LARGE", admrt::Variance::FixedLarge);
  py::enum_<admrt::Prediction>(m, "Prediction")
      .value("EPS", admrt::Prediction::Eps)
      .value("XSTART", admrt::Prediction::XStart);
  py::enum_<admrt::NoiseMode>(m, "NoiseMode")
      .value("SEEDED", admrt::NoiseMode::Seeded)
      .value("REFERENCE", admrt::NoiseMode::Reference);

  py::class_<admrt::Schedule>(m, "Schedule", "Host copy of admrt.diffusion.DiffusionTables (float64 tables by name).")
      .def(py::init(&admrt::Schedule::from_tables), py::arg("tables"), py::arg("original_num_steps"),
           py::arg("rescale_timesteps") = false)
      .def_readonly("num_steps", &admrt::Schedule::num_steps)
      .def_readonly("original_num_steps", &admrt::Schedule::original_num_steps)
      .def_readonly("timestep_map", &admrt::Schedule::timestep_map);

  py::class_<admrt::SamplerParams>(m, "SamplerParams", "What a Sampler context is built for (sampler.h).")
      .def(py::init<>())
      .def_readwrite("method", &admrt::SamplerParams::method)
      .def_readwrite("variance", &admrt::SamplerParams::variance)
      .def_readwrite("prediction", &admrt::SamplerParams::prediction)
      .def_readwrite("eta", &admrt::SamplerParams::eta)
      .def_readwrite("clip_denoised", &admrt::SamplerParams::clip_denoised)
      .def_readwrite("dynamic_threshold", &admrt::SamplerParams::dynamic_threshold)
      .def_readwrite("guidance_t_min", &admrt::SamplerParams::guidance_t_min)
      .def_readwrite("guidance_t_max", &admrt::SamplerParams::guidance_t_max)
      .def_readwrite("guidance_every", &admrt::SamplerParams::guidance_every)
      .def_readwrite("check_finite", &admrt::SamplerParams::check_finite)
      .def_readwrite("noise", &admrt::SamplerParams::noise)
      .def_readwrite("cuda_graphs", &admrt::SamplerParams::cuda_graphs)
      .def_readwrite("batch_size", &admrt::SamplerParams::batch_size)
      .def_readwrite("image_shape", &admrt::SamplerParams::image_shape)
      .def_readwrite("low_res_shape", &admrt::SamplerParams::low_res_shape)
      .def_readwrite("device", &admrt::SamplerParams::device);
  m.def("default_params", &admrt::default_params, "SamplerParams with the defaults.");

  py::class_<admrt::Sampler>(m, "Sampler",
                             "Per-run context: fixed buffers, device tables and step counter, the captured step.\n"
                             "model(x_t, t, y, low_res) -> eps or [eps | v]; classifier(x_t, t, y) -> "
                             "grad log p(y|x_t), or None for no guidance.")
      .def(py::init(&make_sampler), py::arg("model"), py::arg("classifier"), py::arg("schedule"), py::arg("params"))
      .def("sample", &sample_py, "One batch of params.batch_size samples; returns x_0 (B, C, H, W) float32.",
           py::kw_only(), py::arg("y") = py::none(), py::arg("low_res") = py::none(),
           py::arg("guidance") = py::none(), py::arg("seeds") = py::none(), py::arg("generator") = py::none(),
           py::arg("x_T") = py::none(), py::arg("progress") = py::none())
      .def_property_readonly("params", &admrt::Sampler::params)
      .def_property_readonly("num_steps", &admrt::Sampler::num_steps)
      .def_property_readonly("guided", &admrt::Sampler::guided)
      .def_property_readonly("uses_graph", &admrt::Sampler::uses_graph)
      .def_property_readonly("captured", &admrt::Sampler::captured)
      .def_property_readonly("guided_steps", &admrt::Sampler::guided_steps,
                             "Per step (loop order): whether the classifier runs.")
      .def("enter", [](admrt::Sampler& self, int64_t slot, int64_t plan, int64_t label, double guidance, uint64_t seed,
                       std::optional<at::Tensor> low_res) {
             admrt::SlotInputs in{plan, label, guidance, seed, std::move(low_res)};
             py::gil_scoped_release nogil;
             self.enter(slot, in);
           }, py::arg("slot"), py::kw_only(), py::arg("plan") = 0, py::arg("label") = 0, py::arg("guidance") = 0.0,
           py::arg("seed") = 0, py::arg("low_res") = py::none(),
           "Step batching: put an image into a free slot (its x_T drawn from its seed).")
      .def("iterate", [](admrt::Sampler& self) {
             py::gil_scoped_release nogil;
             return self.iterate();
           }, "One batched step over the occupied slots; returns the slots whose image is done.")
      .def("take", [](admrt::Sampler& self, int64_t slot) {
             py::gil_scoped_release nogil;
             return self.take(slot);
           }, py::arg("slot"), "x_0 (C, H, W) of a done slot, which is freed.")
      .def("release", &admrt::Sampler::release, py::arg("slot"), "Free a slot at any step (cancel).")
      .def("move", &admrt::Sampler::move, py::arg("from_slot"), py::arg("to_slot"),
           "Move a busy slot's image and state into a free slot.")
      .def("slot_busy", &admrt::Sampler::slot_busy, py::arg("slot"))
      .def("slot_step", &admrt::Sampler::slot_step, py::arg("slot"))
      .def_property_readonly("occupied", &admrt::Sampler::occupied);

  // The driver (admrt.h, plan.h): the same objects admrt-sample uses.
  m.attr("UPSAMPLER_STREAM") = py::int_(admrt::kUpsamplerStream);
  m.attr("PACKAGE_FORMAT_VERSION") = py::int_(admrt::kPackageFormatVersion);
  m.attr("SEEDED_NOISE_FORMAT") = py::str(admrt::kSeededNoiseFormat);
  py::register_exception<admrt::Cancelled>(m, "Cancelled", PyExc_RuntimeError);
  py::class_<admrt::StepPlan>(m, "StepPlan", "A step plan parsed from its text (grammar: engine/csrc/plan.h).")
      .def_static("parse", &admrt::StepPlan::parse, py::arg("text"), py::arg("arg") = "steps")
      .def_property_readonly("method", &admrt::StepPlan::method_name)
      .def_property_readonly("sections", &admrt::StepPlan::sections)
      .def_property_readonly("ddim_steps", &admrt::StepPlan::ddim_steps)
      .def_property_readonly("grid_steps", &admrt::StepPlan::grid_steps)
      .def_property_readonly("spacing", [](const admrt::StepPlan& self) {
        switch (self.spacing()) {
          case admrt::Spacing::DdimStride: return "ddim";
          case admrt::Spacing::UniformT: return "t";
          case admrt::Spacing::UniformLogSnr: return "logsnr";
          default: return "sections";
        }
      }, "'sections' | 'ddim' | 't' | 'logsnr'")
      .def_property_readonly("solver", [](const admrt::StepPlan& self) { return admrt::is_solver(self.method()); })
      .def_property_readonly("respacing", &admrt::StepPlan::respacing)
      .def("with_method", [](const admrt::StepPlan& self, const std::string& method) {
        return self.with_method(admrt::parse_method(method));
      }, py::arg("method"))
      .def("__str__", &admrt::StepPlan::str)
      .def("__repr__", [](const admrt::StepPlan& self) { return "StepPlan('" + self.str() + "')"; })
      .def("__eq__", &admrt::StepPlan::operator==)
      .def("__hash__", [](const admrt::StepPlan& self) { return py::hash(py::str(self.str())); });
  py::class_<admrt::Denoiser, std::shared_ptr<admrt::Denoiser>>(m, "DenoiserUnit",
                                                                "A C++ network unit (a package's denoiser).")
      .def("__call__", [](admrt::Denoiser& self, at::Tensor x, at::Tensor t, at::Tensor y, std::optional<at::Tensor> low) {
        py::gil_scoped_release nogil;
        return self(x, t, y, low);
      }, py::arg("x_t"), py::arg("t"), py::arg("y"), py::arg("low_res") = py::none());
  py::class_<admrt::ClassifierGrad, std::shared_ptr<admrt::ClassifierGrad>>(m, "GradientUnit",
                                                                            "A C++ classifier-gradient unit.")
      .def("__call__", [](admrt::ClassifierGrad& self, at::Tensor x, at::Tensor t, at::Tensor y) {
        py::gil_scoped_release nogil;
        return self(x, t, y);
      }, py::arg("x_t"), py::arg("t"), py::arg("y"));
  m.def("aoti_denoiser", [](const std::string& path, const std::string& device) {
        return admrt::load_aoti_denoiser(path, at::Device(device));
      }, py::arg("path"), py::arg("device"), "A denoiser .pt2 (AOTInductor) as a C++ unit.");
  m.def("aoti_gradient", [](const std::string& path, const std::string& device) {
        return admrt::load_aoti_gradient(path, at::Device(device));
      }, py::arg("path"), py::arg("device"), "A classifier-gradient .pt2 (AOTInductor) as a C++ unit.");
  py::class_<admrt::Stage>(m, "Stage", "A network of a stack with its shapes, variance and schedules (admrt.h).")
      .def(py::init(&make_stage), py::kw_only(), py::arg("role"), py::arg("kind"), py::arg("image_shape"),
           py::arg("low_res_shape") = std::vector<int64_t>{}, py::arg("num_classes") = py::none(),
           py::arg("out_channels"), py::arg("variance") = "learned_range",
           py::arg("prediction") = admrt::Prediction::Eps, py::arg("unit"), py::arg("schedule") = py::none())
      .def_readonly("role", &admrt::Stage::role)
      .def_readonly("kind", &admrt::Stage::kind)
      .def_readonly("image_shape", &admrt::Stage::image_shape)
      .def_readonly("low_res_shape", &admrt::Stage::low_res_shape)
      .def_readonly("num_classes", &admrt::Stage::num_classes)
      .def_readonly("out_channels", &admrt::Stage::out_channels);
  py::class_<admrt::Stack, std::shared_ptr<admrt::Stack>>(m, "Stack",
                                                          "The model handle: base model, classifier, upsampler (admrt.h).")
      .def(py::init([](admrt::Stage base, std::optional<admrt::Stage> classifier, std::optional<admrt::Stage> upsampler,
                       const std::string& device, const std::string& dtype, int64_t max_batch,
                       const std::string& default_steps, const std::string& default_upsampler_steps, bool capturable) {
             admrt::StackOptions o;
             o.device = at::Device(device);
             o.dtype = dtype;
             o.max_batch = max_batch;
             o.default_steps = default_steps;
             o.default_upsampler_steps = default_upsampler_steps;
             o.capturable = capturable;
             return std::make_shared<admrt::Stack>(std::move(base), std::move(classifier), std::move(upsampler), o);
           }), py::arg("base"), py::arg("classifier") = py::none(), py::arg("upsampler") = py::none(), py::kw_only(),
           py::arg("device") = "cpu", py::arg("dtype") = "fp32", py::arg("max_batch") = 0,
           py::arg("default_steps") = "ddim25", py::arg("default_upsampler_steps") = "", py::arg("capturable") = true)
      .def_static("load_package", [](const std::string& folder, const std::string& device) {
             py::gil_scoped_release nogil;
             return admrt::Stack::load_package(folder, device);
           }, py::arg("folder"), py::arg("device") = "")
      .def("run", [](const admrt::Stack& self, const std::string& role, std::vector<at::Tensor> inputs) {
        const admrt::Stage& stage = self.stage(role);
        py::gil_scoped_release nogil;
        return stage.run(inputs);
      }, py::arg("role"), py::arg("inputs"), "Run one unit ('model', 'classifier', 'upsampler') on its inputs.")
      .def("stage", &admrt::Stack::stage, py::arg("role"), py::return_value_policy::reference_internal)
      .def_property_readonly("has_classifier", [](const admrt::Stack& s) { return s.classifier() != nullptr; })
      .def_property_readonly("has_upsampler", [](const admrt::Stack& s) { return s.upsampler() != nullptr; })
      .def_property_readonly("package", [](const admrt::Stack& s) { return s.options().package; })
      .def_property_readonly("device", [](const admrt::Stack& self) { return self.device().str(); })
      .def_property_readonly("dtype", &admrt::Stack::dtype)
      .def_property_readonly("max_batch", &admrt::Stack::max_batch)
      .def_property_readonly("default_steps", [](const admrt::Stack& s) { return s.options().default_steps; })
      .def_property_readonly("default_upsampler_steps", [](const admrt::Stack& s) { return s.options().default_upsampler_steps; })
      .def_property_readonly("weights", [](const admrt::Stack& s) { return s.options().weights; })
      .def_property_readonly("num_classes", &admrt::Stack::num_classes);
  py::class_<admrt::ContextParams>(m, "ContextParams", "What a Context is built for (admrt.h).")
      .def(py::init<>())
      .def_readwrite("steps", &admrt::ContextParams::steps)
      .def_readwrite("upsampler_steps", &admrt::ContextParams::upsampler_steps)
      .def_readwrite("method", &admrt::ContextParams::method)
      .def_readwrite("variance", &admrt::ContextParams::variance)
      .def_readwrite("noise", &admrt::ContextParams::noise)
      .def_readwrite("batch_size", &admrt::ContextParams::batch_size)
      .def_readwrite("dtype", &admrt::ContextParams::dtype)
      .def_readwrite("cuda_graphs", &admrt::ContextParams::cuda_graphs)
      .def_readwrite("eta", &admrt::ContextParams::eta)
      .def_readwrite("clip_denoised", &admrt::ContextParams::clip_denoised)
      .def_readwrite("dynamic_threshold", &admrt::ContextParams::dynamic_threshold)
      .def_readwrite("guidance_t_min", &admrt::ContextParams::guidance_t_min)
      .def_readwrite("guidance_t_max", &admrt::ContextParams::guidance_t_max)
      .def_readwrite("guidance_every", &admrt::ContextParams::guidance_every)
      .def_readwrite("check_finite", &admrt::ContextParams::check_finite)
      .def_readwrite("keep_float", &admrt::ContextParams::keep_float);
  py::class_<admrt::Context>(m, "Context", "The one driver of a request over a Stack (admrt.h).")
      .def(py::init([](std::shared_ptr<admrt::Stack> stack, admrt::ContextParams params) {
             return std::make_unique<admrt::Context>(std::move(stack), std::move(params));
           }), py::arg("stack"), py::arg("params"))
      .def_static("default_params", &admrt::Context::default_params)
      .def("sample", &context_sample, py::arg("classes"), py::arg("guidance"), py::arg("seeds"), py::arg("num") = py::none(),
           py::arg("progress") = py::none(),
           "-> (images uint8 NHWC, labels | None, base_images | None, samples float32 NCHW | None, seeds)")
      .def("validate", &admrt::Context::validate, py::arg("classes"), py::arg("guidance"),
           py::arg("seeds") = std::vector<uint64_t>{}, py::arg("num") = py::none())
      .def("check_num", &admrt::Context::check_num, py::arg("num"),
           "ValueError unless num is positive and a run of num images fits in this machine's memory.")
      .def("cancel", &admrt::Context::cancel, "Stop a running sample() at its next step boundary (thread-safe).")
      .def("steps_per_batch", &admrt::Context::steps_per_batch)
      .def("uses_graph", &admrt::Context::uses_graph, py::arg("role") = "model")
      .def("captured", &admrt::Context::captured, py::arg("role") = "model")
      .def_property_readonly("plan", &admrt::Context::plan)
      .def_property_readonly("upsampler_plan", [](const admrt::Context& c) -> py::object {
        return c.upsampler_plan() ? py::cast(*c.upsampler_plan()) : py::none();
      })
      .def_property_readonly("stack", &admrt::Context::stack_handle)
      .def_property_readonly("params", [](const admrt::Context& c) { return c.params(); },
                             "A copy of what the context was built for (steps in canonical text).");
  py::class_<admrt::StepBatcher>(m, "StepBatcher",
                                  "Step batching over a Stack (admrt.h): requests join and leave a running batch.")
      .def(py::init([](std::shared_ptr<admrt::Stack> stack, admrt::ContextParams params,
                       std::vector<std::string> plans, bool step_batching) {
             return std::make_unique<admrt::StepBatcher>(std::move(stack), std::move(params), plans, step_batching);
           }), py::arg("stack"), py::arg("params"), py::arg("plans") = std::vector<std::string>{},
           py::arg("step_batching") = true)
      .def("submit", &admrt::StepBatcher::submit, py::arg("classes"), py::arg("guidance"), py::arg("seeds"),
           py::arg("num") = py::none(), py::arg("steps") = "", "Validate and queue a request; returns its id.")
      .def("cancel", &admrt::StepBatcher::cancel, py::arg("id"))
      .def("iterate", [](admrt::StepBatcher& self) {
             py::gil_scoped_release nogil;
             return self.iterate();
           }, "Admission, one step of each occupied pool, harvest; returns the ids finished in it.")
      .def_property_readonly("busy", &admrt::StepBatcher::busy)
      .def("take", [](admrt::StepBatcher& self, int64_t id) {
             admrt::Result r;
             {
               py::gil_scoped_release nogil;
               r = self.take(id);
             }
             return py::make_tuple(r.images, optional_tensor(r.labels), optional_tensor(r.base_images), r.seeds);
           }, py::arg("id"), "-> (images uint8 NHWC, labels | None, base_images | None, seeds); raises its error")
      .def("progress", [](const admrt::StepBatcher& self, int64_t id) {
             const auto p = self.progress(id);
             py::dict d;
             d["images"] = p.images;
             d["images_done"] = p.images_done;
             d["steps"] = p.steps;
             d["steps_done"] = p.steps_done;
             d["finished"] = p.finished;
             return d;
           }, py::arg("id"))
      .def("stats", [](const admrt::StepBatcher& self) {
             const auto s = self.stats();
             py::dict d;
             d["queued_images"] = s.queued_images;
             d["base_slots"] = s.base_slots;
             d["upsampler_slots"] = s.upsampler_slots;
             d["base_steps"] = s.base_steps;
             d["iterations"] = s.iterations;
             d["requests"] = s.requests;
             return d;
           })
      .def_property_readonly("plans", &admrt::StepBatcher::plans)
      .def_property_readonly("slots", &admrt::StepBatcher::slots)
      .def_property_readonly("params", [](const admrt::StepBatcher& b) { return b.context().params(); });
  m.def("write_npz", &admrt::write_npz, py::arg("path"), py::arg("arrays"), "arr_0, arr_1, ... as np.savez, atomically.");
  m.def("read_npz", &admrt::read_npz, py::arg("path"), "arr_0, arr_1, ... of an uncompressed .npz.");

  m.def("seeded_normal", &admrt::seeded_normal, py::arg("seeds"), py::arg("sample_shape"), py::arg("draw"),
        "(B, *sample_shape) float32 normals of draw `draw` (0: x_T, k: step k) for int64 seeds (B,).");
  m.def("philox4x32_10", [](std::array<uint32_t, 4> ctr, std::array<uint32_t, 2> key) {
        admrt::philox::U4 c{{ctr[0], ctr[1], ctr[2], ctr[3]}};
        admrt::philox::U4 r = admrt::philox::philox4x32_10(c, key[0], key[1]);
        return std::array<uint32_t, 4>{r.x[0], r.x[1], r.x[2], r.x[3]};
      }, py::arg("counter"), py::arg("key"), "Philox4x32-10 of one counter (known-answer tests).");
  m.def("to_uint8_nhwc", &admrt::to_uint8_nhwc, py::arg("x"), "((x + 1) * 127.5).clamp(0, 255) as uint8, NCHW -> NHWC.");
  m.def("derive_seed", &admrt::derive_seed, py::arg("seed"), py::arg("stream"),
        "A seed derived from `seed` for another noise stream (the upsampler stage of a cascade).");
  bind_runfolder(m);
}
