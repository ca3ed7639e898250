// admrt-sample: sample from an exported package (admrt export aoti) with no Python, into the
// same run folder as `admrt sample`: OUT/shards/shard_NNNNN.npz written atomically, a rerun with
// the same arguments resuming from the finished shards, OUT/run.json recording the arguments, and
// OUT/samples_NxHxWxC.npz (arr_0 uint8 NHWC, arr_1 labels) at the end.
//
//   admrt-sample --package stack.aoti --num 64 --batch-size 16 --seed 0 --out samples
#include <algorithm>
#include <atomic>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

#include "admrt.h"
#include "json.h"
#include "npz.h"

namespace fs = std::filesystem;

namespace {

const char* kUsage =
    "usage: admrt-sample --package DIR [options]\n"
    "Samples images from an admrt AOTInductor package (made by `admrt export aoti`) with no Python.\n"
    "  --package DIR        the package folder (manifest.json + .pt2 units)\n"
    "  --num N              number of images (default 16)\n"
    "  --classes a,b,...    labels, cycled over the images (default 0,1,2,... cycling)\n"
    "  --batch-size B       images per network call (default 16, or the package's bound if smaller)\n"
    "  --shard-size S       images per shard file (default 4 batches); a rerun resumes from finished shards\n"
    "  --seed S             image i gets seed S + i (default 0); an image depends only on its seed\n"
    "  --steps PLAN         a step plan of the package, e.g. ddim25 or 250 (default: its first)\n"
    "  --upsampler-steps P  the upsampler's step plan (default: the package's)\n"
    "  --guidance G         classifier scale (default 1 with a classifier, 0 without)\n"
    "  --eta E              DDIM eta (default 0)\n"
    "  --device D           cpu, cuda, cuda:N (default: what the package was compiled for)\n"
    "  --no-cuda-graphs     run CUDA steps uncaptured\n"
    "  --out DIR            output folder (default samples)\n"
    "  --no-progress        no progress on stderr\n";

struct UsageError : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};

// Ctrl-C: the step in flight finishes, then the run stops with one line; finished shards stay.
std::atomic<bool> interrupted{false};
struct Interrupted : std::runtime_error {
  Interrupted() : std::runtime_error("interrupted; the finished shards are kept: rerun the same command to resume") {}
};

int64_t to_int(const std::string& flag, const std::string& v) {
  try {
    size_t used = 0;
    long long x = std::stoll(v, &used);
    if (used == v.size()) return x;
  } catch (const std::exception&) {
  }
  throw UsageError(flag + "='" + v + "': expected an integer");
}

double to_double(const std::string& flag, const std::string& v) {
  try {
    size_t used = 0;
    double x = std::stod(v, &used);
    if (used == v.size()) return x;
  } catch (const std::exception&) {
  }
  throw UsageError(flag + "='" + v + "': expected a number");
}

std::string number(double x) {
  std::ostringstream s;
  s.precision(17);
  s << x;
  std::string t = s.str();
  if (t.find_first_of(".eEn") == std::string::npos) t += ".0";  // as Python's json writes floats
  return t;
}

bool same(const admrt::json::Value& a, const admrt::json::Value& b) {
  using T = admrt::json::Value::Type;
  if (a.type != b.type) return false;
  switch (a.type) {
    case T::Null: return true;
    case T::Bool: return a.boolean == b.boolean;
    case T::Number: return a.is_integer && b.is_integer ? a.integer == b.integer : a.number == b.number;
    case T::String: return a.string == b.string;
    default: return false;  // the record holds scalars only
  }
}

// A recorded value as the run-folder messages show it (Python's admrt.runfolder: 'text', 3, 0.5, null).
std::string show(const admrt::json::Value* v) {
  using T = admrt::json::Value::Type;
  if (v == nullptr) return "null";
  switch (v->type) {
    case T::Null: return "null";
    case T::Bool: return v->boolean ? "true" : "false";
    case T::Number: return v->is_integer ? std::to_string(v->integer) : number(v->number);
    case T::String: return "'" + v->string + "'";
    default: return "...";
  }
}

// The run folder's lock (admrt/runfolder.py): OUT/.lock held with flock while this process works
// in OUT (the OS releases it at exit, however the process ends); a second process is refused,
// naming the holder. Then the temporary files of atomic writes a killed run left are removed.
void lock_run_folder(const fs::path& out) {
  fs::create_directories(out);
  const fs::path path = out / ".lock";
  const int fd = ::open(path.c_str(), O_RDWR | O_CREAT, 0644);
  if (fd < 0) throw std::runtime_error(path.string() + ": cannot be opened");
  if (::flock(fd, LOCK_EX | LOCK_NB) != 0) {
    std::ifstream in(path);
    std::string holder;
    std::getline(in, holder);
    ::close(fd);
    throw std::invalid_argument("--out='" + out.string() + "' is in use by " +
                                (holder.empty() ? std::string("another process") : holder) +
                                "; wait for it to finish, or stop it (its finished work is kept)");
  }
  char when[32];
  const std::time_t now = std::time(nullptr);
  std::strftime(when, sizeof when, "%Y-%m-%d %H:%M:%S", std::localtime(&now));
  const std::string line = "process " + std::to_string(::getpid()) + " (admrt-sample, since " + when + ")\n";
  if (::ftruncate(fd, 0) != 0 || ::write(fd, line.data(), line.size()) < 0) {
    // the lock holds without the note; only the message of a refused second process is poorer
  }
  // fd stays open (and locked) until the process exits.
  for (const fs::path& dir : {out, out / "shards"}) {
    if (!fs::is_directory(dir)) continue;
    for (const auto& entry : fs::directory_iterator(dir)) {
      const std::string name = entry.path().filename().string();
      if (entry.is_regular_file() && name.size() > 5 && name[0] == '.' && name.substr(name.size() - 4) == ".tmp")
        fs::remove(entry.path());
    }
  }
}

int64_t finished_shards(const fs::path& out) {
  int64_t n = 0;
  if (!fs::is_directory(out / "shards")) return 0;
  for (const auto& entry : fs::directory_iterator(out / "shards")) {
    const std::string name = entry.path().filename().string();
    n += name.rfind("shard_", 0) == 0 && entry.path().extension() == ".npz";
  }
  return n;
}

}  // namespace

int main(int argc, char** argv) {
  std::map<std::string, std::string> opt = {{"--num", "16"}, {"--seed", "0"}, {"--eta", "0"},
                                            {"--out", "samples"}};
  bool progress = true, graphs = true;
  bool line_open = false;  // a progress line waiting for its newline
  try {
    for (int i = 1; i < argc; ++i) {
      const std::string a = argv[i];
      if (a == "-h" || a == "--help") {
        std::cout << kUsage;
        return 0;
      }
      if (a == "--no-progress") { progress = false; continue; }
      if (a == "--no-cuda-graphs") { graphs = false; continue; }
      static const std::vector<std::string> valued = {"--package", "--num", "--classes", "--batch-size",
                                                      "--shard-size", "--seed", "--steps", "--upsampler-steps",
                                                      "--guidance", "--eta", "--device", "--out"};
      std::string key = a, value;
      const size_t eq = a.find('=');
      if (eq != std::string::npos) {
        key = a.substr(0, eq);
        value = a.substr(eq + 1);
      } else if (std::find(valued.begin(), valued.end(), a) != valued.end()) {
        if (i + 1 >= argc) throw UsageError(a + ": expected a value");
        value = argv[++i];
      }
      if (std::find(valued.begin(), valued.end(), key) == valued.end())
        throw UsageError("unknown argument '" + a + "' (see --help)");
      opt[key] = value;
    }
    if (!opt.count("--package")) throw UsageError("--package: required (a folder made by `admrt export aoti`)");
  } catch (const UsageError& e) {
    std::cerr << "admrt-sample: " << e.what() << "\n";
    return 2;
  }

  std::signal(SIGINT, [](int) { interrupted = true; });
  try {
    const int64_t num = to_int("--num", opt["--num"]);
    if (num <= 0) throw UsageError("--num=" + opt["--num"] + ": expected a positive int");
    int64_t batch = opt.count("--batch-size") ? to_int("--batch-size", opt["--batch-size"]) : 0;
    if (opt.count("--batch-size") && batch <= 0)
      throw UsageError("--batch-size=" + opt["--batch-size"] + ": expected a positive int");
    std::vector<double> guidance;
    if (opt.count("--guidance")) guidance.push_back(to_double("--guidance", opt["--guidance"]));
    const int64_t seed = to_int("--seed", opt["--seed"]);

    auto package = admrt::Stack::load_package(opt["--package"], opt.count("--device") ? opt["--device"] : "");
    if (batch == 0) batch = std::min<int64_t>(16, package->max_batch());
    const int64_t shard = opt.count("--shard-size") ? to_int("--shard-size", opt["--shard-size"]) : 4 * batch;
    if (shard <= 0) throw UsageError("--shard-size=" + std::to_string(shard) + ": expected a positive int");
    auto params = admrt::Context::default_params();
    params.steps = opt.count("--steps") ? opt["--steps"] : "";
    params.upsampler_steps = opt.count("--upsampler-steps") ? opt["--upsampler-steps"] : "";
    params.batch_size = batch;
    params.eta = to_double("--eta", opt["--eta"]);
    params.cuda_graphs = graphs;
    admrt::Context ctx(package, params);

    // Labels of the whole run: --classes cycled, else 0, 1, ... cycling (none: unconditional).
    std::vector<int64_t> labels;
    if (opt.count("--classes")) {
      std::vector<int64_t> chosen;
      std::stringstream ss(opt["--classes"]);
      std::string item;
      while (std::getline(ss, item, ',')) chosen.push_back(to_int("--classes", item));
      if (chosen.empty()) throw UsageError("--classes='': expected comma-separated ints");
      for (int64_t i = 0; i < num; ++i) labels.push_back(chosen[i % chosen.size()]);
    } else if (package->num_classes()) {
      for (int64_t i = 0; i < num; ++i) labels.push_back(i % *package->num_classes());
    }
    ctx.validate(labels, guidance, {}, num);  // before anything is written
    const admrt::Stage& last = package->upsampler() ? *package->upsampler() : package->base();
    const double bytes = static_cast<double>(num) * last.image_shape[0] * last.image_shape[1] * last.image_shape[2];
    if (bytes + 9.0 * num >= static_cast<double>(admrt::kMaxNpzBytes))
      throw UsageError("--num=" + std::to_string(num) + ": the final .npz would reach 4 GiB, more than admrt-sample "
                       "writes (no zip64); sample fewer images per run, or use `admrt sample --package`");

    // The run record: a rerun resumes only with the same arguments (as `admrt sample --package`).
    const fs::path out(opt["--out"]);
    std::ostringstream rec;
    rec << "{\n \"package\": " << admrt::json::quote(fs::weakly_canonical(opt["--package"]).string())
        << ",\n \"steps\": " << admrt::json::quote(ctx.params().steps) << ",\n \"upsampler_steps\": "
        << (package->upsampler() ? admrt::json::quote(ctx.params().upsampler_steps) : "null")
        << ",\n \"guidance\": " << (guidance.empty() ? "null" : number(guidance[0]))
        << ",\n \"classes\": " << (opt.count("--classes") ? admrt::json::quote(opt["--classes"]) : "null")
        << ",\n \"num\": " << num << ",\n \"seed\": " << seed << ",\n \"eta\": " << number(params.eta)
        << ",\n \"noise\": \"seeded\",\n \"shard_size\": " << shard
        << ",\n \"seeded_noise\": " << admrt::json::quote(std::string(admrt::kSeededNoiseFormat))
        << ",\n \"weights\": " << admrt::json::quote(package->options().weights)
        << ",\n \"device\": " << admrt::json::quote(package->device().is_cuda() ? "cuda" : "cpu") << "\n}\n";
    const fs::path record_path = out / "run.json";
    const admrt::json::Value record = admrt::json::parse(rec.str(), "run record");
    lock_run_folder(out);
    bool write_record = !fs::exists(record_path);
    if (!write_record) {
      const admrt::json::Value previous = admrt::json::parse_file(record_path.string());
      // Each changed field with its recorded and new value (keys in sorted order, as Python's).
      std::map<std::string, std::pair<const admrt::json::Value*, const admrt::json::Value*>> fields;
      for (const auto& [key, value] : previous.as_object(record_path.string())) fields[key].first = &value;
      for (const auto& [key, value] : record.object) fields[key].second = &value;
      // A key the record lacks (written by an older admrt) is not a change: it is added.
      std::string changed;
      for (const auto& [key, pair] : fields) {
        if (!pair.first) {
          write_record = true;
          continue;
        }
        if (!pair.second || !same(*pair.first, *pair.second))
          changed += (changed.empty() ? "" : "; ") + key + ": " + show(pair.first) + " -> " + show(pair.second);
      }
      if (!changed.empty() && finished_shards(out) > 0)
        throw std::invalid_argument("--out='" + out.string() + "' holds a run with other arguments (" + changed +
                                    "); rerun with the recorded values to resume it, or use another --out (or "
                                    "delete that folder) to start over");
      if (!changed.empty()) {
        std::cerr << "admrt-sample: " << out.string() << " held a run that finished nothing; starting over\n";
        write_record = true;
      }
    }
    if (write_record) admrt::write_atomic(record_path.string(), rec.str());
    fs::create_directories(out / "shards");

    const int64_t n_shards = num / shard + (num % shard != 0);
    std::vector<fs::path> shard_paths;
    std::vector<int64_t> todo;
    for (int64_t s = 0; s < n_shards; ++s) {
      char name[32];
      std::snprintf(name, sizeof name, "shard_%05lld.npz", static_cast<long long>(s));
      shard_paths.push_back(out / "shards" / name);
      if (!fs::exists(shard_paths.back())) todo.push_back(s);
    }
    if (static_cast<int64_t>(todo.size()) < n_shards)
      std::cerr << "admrt-sample: resuming: " << n_shards - static_cast<int64_t>(todo.size()) << " of " << n_shards
                << " shards already done\n";
    int64_t total = 0, done = 0;
    for (int64_t s : todo) {
      const int64_t count = std::min(shard, num - s * shard);
      total += (count + batch - 1) / batch * ctx.steps_per_batch();
    }
    for (int64_t s : todo) {
      const int64_t lo = s * shard, hi = lo + std::min(shard, num - lo);
      std::vector<int64_t> shard_labels;
      if (!labels.empty()) shard_labels.assign(labels.begin() + lo, labels.begin() + hi);
      std::vector<uint64_t> seeds;
      for (int64_t i = lo; i < hi; ++i) seeds.push_back(static_cast<uint64_t>(seed) + static_cast<uint64_t>(i));
      admrt::ProgressFn on_step = [&](int64_t, int64_t) {
          if (interrupted) throw Interrupted();
          ++done;
          if (!progress) return;
          if (done == total || done % 10 == 0) {
            std::cerr << "\radmrt-sample: " << done << "/" << total << " steps" << (done == total ? "\n" : "")
                      << std::flush;
            line_open = done != total;
          }
        };
      admrt::Result r = ctx.sample(shard_labels, guidance, seeds, on_step, hi - lo);
      std::vector<at::Tensor> arrays = {r.images};
      if (r.labels.defined()) arrays.push_back(r.labels);
      admrt::write_npz(shard_paths[s].string(), arrays);
    }

    std::vector<at::Tensor> images, out_labels;
    for (const auto& p : shard_paths) {
      std::vector<at::Tensor> parts = admrt::read_npz(p.string());
      images.push_back(parts[0]);
      if (parts.size() > 1) out_labels.push_back(parts[1]);
    }
    std::vector<at::Tensor> arrays = {at::cat(images)};
    if (!out_labels.empty()) arrays.push_back(at::cat(out_labels));
    std::string shape;
    for (int64_t d : arrays[0].sizes()) shape += (shape.empty() ? "" : "x") + std::to_string(d);
    const fs::path final_path = out / ("samples_" + shape + ".npz");
    admrt::write_npz(final_path.string(), arrays);
    std::cerr << "admrt-sample: wrote " << final_path.string() << "\n";
    return 0;
  } catch (const UsageError& e) {
    std::cerr << "admrt-sample: " << e.what() << "\n";
    return 2;
  } catch (const Interrupted& e) {
    std::cerr << (line_open ? "\n" : "") << "admrt-sample: " << e.what() << "\n";
    return 130;
  } catch (const std::exception& e) {
    if (line_open) std::cerr << "\n";
    const std::string msg = e.what();  // one line (c10 errors append a C++ stack)
    std::cerr << "admrt-sample: " << msg.substr(0, msg.find('\n')) << "\n";
    return 1;
  }
}
