// Packages: manifest.json + AOTInductor units of a folder (admrt export aoti) loaded as a Stack
// (admrt.h); the Context that runs them is context.cpp.
//
// A package is code: each .pt2 unit carries a compiled shared library that is loaded and run, so
// a package must come from a trusted source (as a pickle must). What loading checks, before any
// unit is loaded and before a run writes anything:
//   - every manifest field's type and range (one line naming manifest.json, the field, its value
//     and what was expected), and the coefficient tables (finite, in range, one length);
//   - each unit's `file` is a plain name inside the package folder (no absolute path, no "..", no
//     symlink leading out of it);
//   - each unit's bytes against the sha256 the manifest records: damage or an accidental
//     replacement is refused naming the unit (an author who edits the manifest too is not caught:
//     that is the trust above);
//   - each unit's output shape, by one call at batch 1.
// The stack's weights fingerprint (run records) is a digest of the manifest's fingerprint and the
// verified units' hashes: it names what actually runs, so a resume over another unit is refused.
//
// torch's loader extracts each unit into TMPDIR/aotinductor_XXXXXX and removes it when the unit is
// freed; a killed process leaves it. Units are therefore extracted under a folder of this process,
// TMPDIR/admrt-aoti-units-XXXXXX, holding a lock file locked for the life of the package; each load
// removes the folders whose lock is free (their process is gone).
#include "admrt.h"

#include <torch/csrc/inductor/aoti_package/model_package_loader.h>

#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <mutex>
#include <set>
#include <sstream>
#include <stdexcept>

#include "json.h"
#include "sha256.h"
#include "text.h"

#ifdef ADMRT_WITH_CUDA
#include <c10/cuda/CUDAFunctions.h>
#endif

namespace admrt {
namespace {

namespace fs = std::filesystem;
using torch::inductor::AOTIModelPackageLoader;

// ---------------------------------------------------------------------------------------------
// Where units are extracted.

constexpr const char* kScratchPrefix = "admrt-aoti-units-";
constexpr const char* kScratchLock = ".owner.lock";

// TMPDIR is pointed at a package's scratch folder while its units load (Scratch::load): reads and
// that swap are serialised by this mutex, so a package made in another thread never takes another
// package's scratch folder for the temporary root. (A getenv of TMPDIR elsewhere in the process,
// outside admrt, during a load is not covered: torch's loader offers no other way to choose where
// it extracts.)
std::mutex& tmpdir_mutex() {
  static std::mutex m;
  return m;
}

// The temporary root as the user set it; call with tmpdir_mutex() held.
fs::path temp_root() {
  for (const char* name : {"TMPDIR", "TMP", "TEMP", "TEMPDIR"})
    if (const char* v = std::getenv(name); v && *v) return v;
  return "/tmp";
}

// Removes TMPDIR/admrt-aoti-units-* folders of processes that are gone: their lock can be taken (a
// folder without a lock file is left alone: one being made, or not ours).
void remove_stale_scratch(const fs::path& root) {
  std::error_code ec;
  for (fs::directory_iterator it(root, ec), end; !ec && it != end; it.increment(ec)) {
    const std::string name = it->path().filename().string();
    if (name.rfind(kScratchPrefix, 0) != 0) continue;
    struct stat st {};
    if (::lstat(it->path().c_str(), &st) != 0 || !S_ISDIR(st.st_mode) || st.st_uid != ::geteuid()) continue;
    const fs::path lock = it->path() / kScratchLock;
    const int fd = ::open(lock.c_str(), O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0) continue;
    const bool free = ::flock(fd, LOCK_EX | LOCK_NB) == 0;
    ::close(fd);
    if (!free) continue;
    std::error_code ignored;
    fs::remove_all(it->path(), ignored);
  }
}

// A folder of this process that torch's loader extracts into (TMPDIR pointed at it while a unit
// loads); removed with the package.
class Scratch {
 public:
  Scratch() {
    const fs::path root = [] {
      std::lock_guard<std::mutex> lock(tmpdir_mutex());
      return temp_root();
    }();
    remove_stale_scratch(root);
    std::string tmpl = (root / (std::string(kScratchPrefix) + "XXXXXX")).string();
    if (!::mkdtemp(tmpl.data())) return;  // unwritable: torch's own place
    dir_ = tmpl;
    // Locked before it takes the name the cleaners look for (the lock stays with the file).
    const fs::path unnamed = dir_ / (std::string(kScratchLock) + ".new");
    fd_ = ::open(unnamed.c_str(), O_RDWR | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
    if (fd_ < 0 || ::flock(fd_, LOCK_EX) != 0 || ::rename(unnamed.c_str(), (dir_ / kScratchLock).c_str()) != 0) {
      release();
      dir_.clear();
    }
  }
  ~Scratch() { release(); }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;

  // Constructs a loader with TMPDIR set to the folder (restored afterwards).
  std::unique_ptr<AOTIModelPackageLoader> load(const std::string& path, bool single_threaded, at::Device device) {
    std::lock_guard<std::mutex> lock(tmpdir_mutex());  // loads of several packages in one process
    const char* old = std::getenv("TMPDIR");
    const std::string saved = old ? old : "";
    if (!dir_.empty()) ::setenv("TMPDIR", dir_.c_str(), 1);
    struct Restore {
      bool had;
      const std::string& value;
      bool changed;
      ~Restore() {
        if (!changed) return;
        if (had) ::setenv("TMPDIR", value.c_str(), 1);
        else ::unsetenv("TMPDIR");
      }
    } restore{old != nullptr, saved, !dir_.empty()};
    return std::make_unique<AOTIModelPackageLoader>(path, "model", single_threaded, 1,
                                                    device.is_cuda() ? device.index() : -1);
  }

 private:
  void release() {
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
    if (!dir_.empty()) {
      std::error_code ignored;
      fs::remove_all(dir_, ignored);
    }
  }
  fs::path dir_;
  int fd_ = -1;
};

// ---------------------------------------------------------------------------------------------
// Units

// One AOTInductor unit; inputs are made contiguous with the dtypes it was exported with.
class AotiUnit {
 public:
  AotiUnit(const std::string& path, at::Device device, std::shared_ptr<Scratch> scratch = nullptr)
      : scratch_(scratch ? std::move(scratch) : std::make_shared<Scratch>()) {
    if (!fs::is_regular_file(path)) throw std::runtime_error(cat(path, ": missing (the package is incomplete)"));
    // Single-threaded runners take no locks or events, so the CUDA step can be graph-captured;
    // a package's units are run by one thread at a time.
    const bool single_threaded = device.is_cuda();
    try {
      loader_ = scratch_->load(path, single_threaded, device);
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
  std::shared_ptr<Scratch> scratch_;  // outlives the loader, which removes its folder first
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

// ---------------------------------------------------------------------------------------------
// The manifest, field by field: each error is one line naming manifest.json, the field's path,
// its value and what was expected.

std::string value_text(const json::Value& v) {
  using T = json::Value::Type;
  switch (v.type) {
    case T::Null: return "null";
    case T::Bool: return v.boolean ? "true" : "false";
    case T::Number: return v.is_integer ? std::to_string(v.integer) : json::number_text(v.number);
    case T::String: return v.string.size() <= 40 ? json::quote(v.string) : json::quote(v.string.substr(0, 40)) + "...";
    case T::Array: return cat("an array of ", v.array.size());
    case T::Object: return "an object";
  }
  return "?";
}

struct Manifest {
  std::string path;  // of manifest.json

  [[noreturn]] void bad(const std::string& field, const json::Value& v, const std::string& expected) const {
    throw std::runtime_error(cat(path, ": ", field, "=", value_text(v), ": expected ", expected));
  }
  [[noreturn]] void fail(const std::string& field, const std::string& why) const {
    throw std::runtime_error(cat(path, ": ", field, ": ", why));
  }
  static std::string join(const std::string& parent, const std::string& key) {
    return parent.empty() ? key : parent + "." + key;
  }
  const json::Value& get(const json::Value& obj, const std::string& parent, const std::string& key,
                         const std::string& expected) const {
    if (obj.type != json::Value::Type::Object) bad(parent.empty() ? "(top level)" : parent, obj, "an object");
    auto it = obj.object.find(key);
    if (it == obj.object.end()) fail(join(parent, key), cat("missing; expected ", expected));
    return it->second;
  }
  const json::Value& object(const json::Value& obj, const std::string& parent, const std::string& key) const {
    const json::Value& v = get(obj, parent, key, "an object");
    if (v.type != json::Value::Type::Object) bad(join(parent, key), v, "an object");
    return v;
  }
  int64_t integer(const json::Value& obj, const std::string& parent, const std::string& key, int64_t lo,
                  int64_t hi) const {
    const std::string expected = cat("an integer from ", lo, " to ", hi);
    const json::Value& v = get(obj, parent, key, expected);
    if (v.type != json::Value::Type::Number || !v.is_integer || v.integer < lo || v.integer > hi)
      bad(join(parent, key), v, expected);
    return v.integer;
  }
  std::optional<int64_t> optional_integer(const json::Value& obj, const std::string& parent, const std::string& key,
                                          int64_t lo, int64_t hi) const {
    const std::string expected = cat("null or an integer from ", lo, " to ", hi);
    const json::Value& v = get(obj, parent, key, expected);
    if (v.is_null()) return std::nullopt;
    if (v.type != json::Value::Type::Number || !v.is_integer || v.integer < lo || v.integer > hi)
      bad(join(parent, key), v, expected);
    return v.integer;
  }
  const std::string& string(const json::Value& obj, const std::string& parent, const std::string& key) const {
    const json::Value& v = get(obj, parent, key, "a string");
    if (v.type != json::Value::Type::String) bad(join(parent, key), v, "a string");
    return v.string;
  }
  const std::string& one_of(const json::Value& obj, const std::string& parent, const std::string& key,
                            const std::vector<std::string>& names) const {
    std::string expected = "one of (";
    for (size_t i = 0; i < names.size(); ++i) expected += (i ? ", '" : "'") + names[i] + "'";
    expected += ")";
    const json::Value& v = get(obj, parent, key, expected);
    if (v.type != json::Value::Type::String || std::find(names.begin(), names.end(), v.string) == names.end())
      bad(join(parent, key), v, expected);
    return v.string;
  }
  bool boolean(const json::Value& obj, const std::string& parent, const std::string& key) const {
    const json::Value& v = get(obj, parent, key, "true or false");
    if (v.type != json::Value::Type::Bool) bad(join(parent, key), v, "true or false");
    return v.boolean;
  }
};

// Bounds of the manifest's numbers: generous for any real model, small enough that nothing sized
// from them overflows or allocates without bound.
constexpr int64_t kMaxBatch = 1 << 16, kMaxImageSize = 1 << 14, kMaxChannels = 1 << 12,
                  kMaxClasses = 1 << 20, kMaxDiffusionSteps = 1 << 20, kMaxImageElements = int64_t{1} << 28;

// A manifest schedule entry: the tables of one respacing, each finite and in range.
Schedule manifest_schedule(const Manifest& mf, const json::Value& v, const std::string& field) {
  const int64_t T = mf.integer(v, field, "original_num_steps", 1, kMaxDiffusionSteps);
  const bool rescale = mf.boolean(v, field, "rescale_timesteps");
  const json::Value& tables_v = mf.object(v, field, "tables");
  const std::string tf = field + ".tables";
  std::map<std::string, at::Tensor> tables;
  int64_t n = -1;
  for (const auto& [name, values] : tables_v.object) {
    const std::string f = tf + "." + name;
    if (values.type != json::Value::Type::Array || values.array.empty())
      mf.bad(f, values, "a non-empty array of numbers");
    if (n < 0) n = static_cast<int64_t>(values.array.size());
    if (static_cast<int64_t>(values.array.size()) != n)
      mf.fail(f, cat(values.array.size(), " entries, the other tables' ", n));
    if (n > T) mf.fail(f, cat(n, " steps, more than original_num_steps=", T));
    if (name == "timestep_map") {
      std::vector<int64_t> ints;
      for (size_t i = 0; i < values.array.size(); ++i) {
        const json::Value& x = values.array[i];
        if (x.type != json::Value::Type::Number || !x.is_integer || x.integer < 0 || x.integer >= T ||
            (i > 0 && x.integer <= ints.back()))
          mf.bad(cat(f, "[", i, "]"), x, cat("increasing integers from 0 to ", T - 1, " (original_num_steps - 1)"));
        ints.push_back(x.integer);
      }
      tables[name] = at::tensor(ints, at::kLong);
      continue;
    }
    // The range a table's values must lie in (the variances and cumulative alphas are
    // probabilities; the logs of positive numbers are at most 0 for those).
    double lo = -INFINITY, hi = INFINITY;
    std::string range = "finite numbers";
    if (name == "alphas_cumprod" || name == "alphas_cumprod_prev" || name == "alphas_cumprod_next" ||
        name == "betas" || name == "posterior_variance" || name == "fixed_large_variance" ||
        name == "sqrt_alphas_cumprod" || name == "sqrt_one_minus_alphas_cumprod") {
      lo = 0, hi = 1, range = "numbers from 0 to 1";
    } else if (name == "sqrt_recip_alphas_cumprod") {
      lo = 1, range = "finite numbers >= 1";
    } else if (name == "sqrt_recipm1_alphas_cumprod") {
      lo = 0, range = "finite numbers >= 0";
    }
    std::vector<double> xs;
    for (size_t i = 0; i < values.array.size(); ++i) {
      const json::Value& x = values.array[i];
      if (x.type != json::Value::Type::Number || !std::isfinite(x.number) || x.number < lo || x.number > hi)
        mf.bad(cat(f, "[", i, "]"), x, range);
      xs.push_back(x.number);
    }
    tables[name] = at::tensor(xs, at::kDouble);
  }
  try {
    return Schedule::from_tables(tables, T, rescale);
  } catch (const std::invalid_argument& e) {
    mf.fail(tf, first_line(e.what()));
  }
}

const char* kRoles[] = {"model", "classifier", "upsampler"};

// The unit file a model entry names: a plain name inside the package folder, with the content the
// manifest records. Returns its path and sha256.
std::pair<std::string, std::string> verified_unit(const Manifest& mf, const fs::path& folder,
                                                  const json::Value& m, const std::string& field) {
  const std::string& file = mf.string(m, field, "file");
  const fs::path rel(file);
  const std::string ff = field + ".file";
  const std::string expected = "a file name inside the package folder";
  if (file.empty() || rel.is_absolute() || rel.has_root_name() || rel.has_root_directory())
    mf.bad(ff, m.at("file", ff), expected);
  for (const auto& part : rel)
    if (part == ".." || part == ".") mf.bad(ff, m.at("file", ff), expected);
  const fs::path path = folder / rel;
  std::error_code ec;
  const fs::path real = fs::canonical(path, ec);
  if (ec) throw std::runtime_error(cat(path.string(), ": missing (the package is incomplete)"));
  const fs::path root = fs::canonical(folder);
  const auto [r_end, _] = std::mismatch(root.begin(), root.end(), real.begin(), real.end());
  if (r_end != root.end() || real == root) mf.bad(ff, m.at("file", ff), cat(expected, " (it leads to ", real.string(), ")"));
  if (!fs::is_regular_file(real)) mf.bad(ff, m.at("file", ff), cat(expected, " (it is not a regular file)"));
  const std::string hash_expected = "the unit's sha256 (64 hex digits)";
  const json::Value& h = mf.get(m, field, "sha256", hash_expected);
  if (h.type != json::Value::Type::String || h.string.size() != 64 ||
      h.string.find_first_not_of("0123456789abcdef") != std::string::npos)
    mf.bad(field + ".sha256", h, hash_expected);
  const std::string got = sha256::of_file(real.string());
  if (got != h.string)
    throw std::runtime_error(cat(path.string(), ": content differs from manifest.json's sha256 (damaged or ",
                                 "replaced); re-export the package"));
  return {real.string(), got};
}

// One call of the unit at batch 1 on zeros: its output shape must be what the stage is declared to give.
void check_output_shape(const Stage& stage, const std::string& file, at::Device device) {
  const auto f32 = at::TensorOptions().dtype(at::kFloat).device(device);
  std::vector<int64_t> xs = {1};
  xs.insert(xs.end(), stage.image_shape.begin(), stage.image_shape.end());
  std::vector<at::Tensor> in = {at::zeros(xs, f32), at::zeros({1}, f32),
                                at::zeros({1}, at::TensorOptions().dtype(at::kLong).device(device))};
  if (!stage.low_res_shape.empty()) {
    std::vector<int64_t> ls = {1};
    ls.insert(ls.end(), stage.low_res_shape.begin(), stage.low_res_shape.end());
    in.push_back(at::zeros(ls, f32));
  }
  std::vector<int64_t> want = xs;
  if (stage.kind != "classifier") want[1] = stage.out_channels;
  at::Tensor out;
  try {
    out = stage.run(in);
  } catch (const std::exception& e) {
    throw std::runtime_error(cat(file, ": fails on a batch of 1 (a unit of another model?): ", first_line(e.what())));
  }
  if (out.sizes() != at::IntArrayRef(want))
    throw std::runtime_error(cat(file, ": gives shape ", out.sizes(), " for a batch of 1, but manifest.json's ",
                                 stage.role, " entry says ", at::IntArrayRef(want), "; re-export the package"));
}

// A model entry's fields as a Stage without its unit (attach_unit loads it once every field is checked).
Stage load_stage(const Manifest& mf, const fs::path& folder, const std::string& role, const json::Value& m) {
  const std::string field = "models." + role;
  Stage stage;
  stage.role = role;
  const std::string expected = role == "model" ? "unet" : role == "classifier" ? "classifier" : "superres";
  stage.kind = mf.one_of(m, field, "kind", {expected});
  const int64_t c = mf.integer(m, field, "in_channels", 1, kMaxChannels);
  const int64_t size = mf.integer(m, field, "image_size", 1, kMaxImageSize);
  if (c * size * size > kMaxImageElements)
    mf.bad(field + ".image_size", m.at("image_size", field),
           cat("in_channels x image_size^2 at most ", kMaxImageElements, " (in_channels is ", c, ")"));
  stage.image_shape = {c, size, size};
  stage.out_channels = mf.integer(m, field, "out_channels", 1, stage.kind == "classifier" ? kMaxClasses : kMaxChannels);
  stage.num_classes = mf.optional_integer(m, field, "num_classes", 1, kMaxClasses);
  if (stage.kind == "classifier") stage.num_classes = stage.out_channels;
  if (stage.kind == "superres") {
    const auto low = mf.optional_integer(m, field, "low_res_size", 1, size);
    stage.low_res_shape = {c, low.value_or(size), low.value_or(size)};  // the base's size fills null (load_package)
  }
  if (stage.kind != "classifier") {
    if (stage.out_channels != c && stage.out_channels != 2 * c)
      mf.bad(field + ".out_channels", m.at("out_channels", field),
             cat("in_channels (", c, ") or twice it (eps and variance values)"));
    stage.variance = parse_variance(mf.one_of(m, field, "variance", {"learned_range", "fixed_small", "fixed_large"}));
    if (stage.variance == Variance::LearnedRange && stage.out_channels != 2 * c)
      mf.bad(field + ".variance", m.at("variance", field), cat("fixed_small or fixed_large: out_channels is ", c));
    // diffusion.predict_xstart: absent in packages written before it was recorded (eps models).
    const json::Value& diffusion = mf.object(m, field, "diffusion");
    if (diffusion.has("predict_xstart") && mf.boolean(diffusion, field + ".diffusion", "predict_xstart"))
      stage.prediction = Prediction::XStart;
    // The tables of every respacing it carries, keyed by the respacing's canonical text (plan.h):
    // DDPM and DDIM over one respacing share its tables, so the context's method picks the step.
    auto plans = std::make_shared<std::map<std::string, Schedule>>();
    const json::Value& schedules = mf.object(m, field, "schedules");
    if (schedules.object.empty()) mf.bad(field + ".schedules", schedules, "the tables of at least one step plan");
    for (const auto& [name, plan] : schedules.object) {
      const std::string entry = cat(field, ".schedules.", name);
      std::string respacing;
      try {
        respacing = StepPlan::parse(name, entry).respacing();
      } catch (const std::invalid_argument& e) {
        mf.fail(entry, "not a step plan's respacing");
      }
      if (plan.type != json::Value::Type::Object) mf.bad(entry, plan, "an object");
      (*plans)[respacing] = manifest_schedule(mf, plan, entry);
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
  }
  return stage;
}

void attach_unit(Stage& stage, const std::string& path, at::Device device, const std::shared_ptr<Scratch>& scratch) {
  auto unit = std::make_shared<AotiUnit>(path, device, scratch);
  stage.run = [unit](const std::vector<at::Tensor>& in) { return (*unit)(in); };
  if (stage.kind == "classifier") stage.gradient = std::make_shared<AotiGradient>(unit);
  else stage.denoiser = std::make_shared<AotiDenoiser>(unit);
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
  const Manifest mf{manifest_path.string()};
  const std::string& what = mf.path;
  if (m.type != json::Value::Type::Object || !m.has("format") || m.at("format", what).type != json::Value::Type::String ||
      m.at("format", what).string != "admrt-aoti")
    throw std::runtime_error(cat(what, ": not an admrt AOTInductor package manifest"));
  const json::Value& version_v = mf.get(m, "", "format_version", "an integer");
  if (version_v.type != json::Value::Type::Number || !version_v.is_integer) mf.bad("format_version", version_v, "an integer");
  const int64_t version = version_v.integer;
  if (version != kPackageFormatVersion)
    throw std::runtime_error(cat(what, ": format_version ", version, ", but this admrt reads version ",
                                 kPackageFormatVersion, "; export the package again with this admrt"));
  const std::string& built_for = mf.one_of(m, "", "device", {"cpu", "cuda"});
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
  options.dtype = mf.one_of(m, "", "dtype", {"fp32", "fp16", "bf16"});
  const json::Value& batch = mf.object(m, "", "batch");
  options.max_batch = mf.integer(batch, "batch", "max", 1, kMaxBatch);
  const json::Value& min = mf.get(batch, "batch", "min", "1");
  if (min.type != json::Value::Type::Number || !min.is_integer || min.integer != 1)
    mf.bad("batch.min", min, "1 (the units take batches of 1 to batch.max)");
  const std::string& noise = mf.string(m, "", "seeded_noise");
  if (noise != kSeededNoiseFormat)
    throw std::runtime_error(cat(what, ": seeded_noise='", noise, "': this admrt draws '", kSeededNoiseFormat,
                                 "'; export the package again with this admrt"));
  const std::string& weights = mf.string(m, "", "weights");
  const json::Value& models = mf.object(m, "", "models");
  for (const auto& [role, _] : models.object)
    if (std::find(std::begin(kRoles), std::end(kRoles), role) == std::end(kRoles))
      mf.fail("models." + role, "unknown role; expected model, classifier or upsampler");
  for (const auto& role : kRoles)
    if (models.has(role)) mf.object(models, "models", role);

  // The default plans must be ones the package carries tables for.
  auto plan_field = [&](const std::string& key, bool nullable) -> std::string {
    const json::Value& v = mf.get(m, "", key, nullable ? "null or a step plan" : "a step plan");
    if (nullable && v.is_null()) return "";
    if (v.type != json::Value::Type::String) mf.bad(key, v, "a step plan");
    try {
      return StepPlan::parse(v.string, key).str();
    } catch (const std::invalid_argument&) {
      mf.bad(key, v, "a step plan such as 'ddim25'");
    }
  };
  options.default_steps = plan_field("default_steps", false);
  options.default_upsampler_steps = plan_field("default_upsampler_steps", true);

  // Every field of every entry, then every unit's path and content, before any unit's code is loaded.
  mf.object(models, "models", "model");
  std::map<std::string, Stage> stages;
  for (const char* role : kRoles)
    if (models.has(role)) stages[role] = load_stage(mf, dir, role, models.at(role, what));
  std::map<std::string, std::pair<std::string, std::string>> units;  // role -> (path, sha256)
  for (const auto& [role, _] : stages) units[role] = verified_unit(mf, dir, models.at(role, what), "models." + role);
  auto scratch = std::make_shared<Scratch>();
  for (auto& [role, stage] : stages) attach_unit(stage, units[role].first, device, scratch);
  Stage base = std::move(stages.at("model"));
  std::optional<Stage> classifier, upsampler;
  if (stages.count("classifier")) classifier = std::move(stages.at("classifier"));
  if (stages.count("upsampler")) {
    upsampler = std::move(stages.at("upsampler"));
    if (models.at("upsampler", what).at("low_res_size", what).is_null())
      upsampler->low_res_shape = {upsampler->image_shape[0], base.image_shape[1], base.image_shape[2]};
  }
  // The fingerprint run records compare: the manifest's (the weights exported) and the hash of
  // each unit (what runs).
  std::string identity = "admrt-aoti weights " + weights;
  for (const auto& [role, unit] : units) identity += cat("\n", role, " ", unit.second);
  options.weights = "sha256:" + sha256::of(identity).substr(0, 16);
  std::shared_ptr<Stack> stack;
  try {
    stack = std::make_shared<Stack>(std::move(base), std::move(classifier), std::move(upsampler), options);
  } catch (const std::invalid_argument& e) {
    throw std::runtime_error(cat(what, ": ", e.what()));
  }
  // The units' output shapes, one call each at batch 1, before a run writes anything.
  for (const auto& role : kRoles) {
    if (!models.has(role)) continue;
    const Stage& st = stack->stage(role);
    check_output_shape(st, units[role].first, device);
  }
  // The default plans' tables exist.
  const std::vector<std::array<std::string, 3>> defaults = {
      {"default_steps", options.default_steps, "model"},
      {"default_upsampler_steps", options.default_upsampler_steps, "upsampler"}};
  for (const auto& [key, text, role] : defaults) {
    if (text.empty() || !models.has(role)) continue;
    try {
      stack->stage(role).schedule(StepPlan::parse(text, key));
    } catch (const std::invalid_argument& e) {
      mf.fail(key, first_line(e.what()));
    }
  }
  return stack;
}

}  // namespace admrt
