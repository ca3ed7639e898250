// admrt-sample: sample from an exported package (admrt export aoti) with no Python, into the
// same run folder as `admrt sample` (engine/csrc/runfolder.h, run_samples: one implementation for
// both): OUT/shards/shard_NNNNN.npz written atomically, a rerun with the same arguments resuming
// from the finished shards (whichever front end started the run), OUT/run.json recording the
// arguments, and OUT/samples_NxHxWxC.npz (arr_0 uint8 NHWC, arr_1 labels) at the end. This file
// parses the options and prints the errors.
//
//   admrt-sample --package stack.aoti --num 64 --batch-size 16 --seed 0 --out samples
#include <algorithm>
#include <atomic>
#include <csignal>
#include <iostream>
#include <map>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "admrt.h"
#include "runfolder.h"

namespace {

const char* kUsage =
    "usage: admrt-sample --package DIR [options]\n"
    "Samples images from an admrt AOTInductor package (made by `admrt export aoti`) with no Python.\n"
    "  --package DIR        the package folder (manifest.json + .pt2 units)\n"
    "  --num N              number of images (default 16)\n"
    "  --classes a,b,...    labels, cycled over the images (default 0,1,2,... cycling)\n"
    "  --batch-size B       images per network call (default 16, or the package's bound if smaller)\n"
    "  --shard-size S       images per shard file (default 4 batches); a rerun resumes from finished shards\n"
    "  --seed S             image i gets seed S + i (S from 0 to 2^64-1, default 0); an image depends only\n"
    "                       on its seed\n"
    "  --steps PLAN         a step plan over a respacing the package carries, e.g. ddim25, 250, dpmpp2m10\n"
    "                       (over t10), unipc3m8-logsnr (over logsnr8) (default: its first)\n"
    "  --upsampler-steps P  the upsampler's step plan (default: the package's)\n"
    "  --guidance G         classifier scale (default 1 with a classifier, 0 without)\n"
    "  --eta E              DDIM eta (default 0)\n"
    "  --guidance-interval A,B  run the classifier only at model timesteps A..B\n"
    "  --guidance-every K   run the classifier on every K-th model call only (default 1)\n"
    "  --dynamic-threshold P  Imagen's dynamic thresholding of x_0 at percentile P instead of the clamp\n"
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

// A seed: exactly the integers 0..2^64-1 (as `admrt sample` takes them).
uint64_t to_seed(const std::string& v) {
  const std::string expected = "--seed=" + v + ": expected an integer from 0 to 18446744073709551615";
  if (v.empty() || v.size() > 20 || v.find_first_not_of("0123456789") != std::string::npos) throw UsageError(expected);
  try {
    size_t used = 0;
    const unsigned long long x = std::stoull(v, &used);
    if (used == v.size()) return x;
  } catch (const std::exception&) {
  }
  throw UsageError(expected);
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
                                                      "--guidance", "--eta", "--device", "--out",
                                                      "--guidance-interval", "--guidance-every",
                                                      "--dynamic-threshold"};
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
    const int64_t num = to_int("--num", opt["--num"]);  // its value is the driver's to check (run_samples)
    int64_t batch = opt.count("--batch-size") ? to_int("--batch-size", opt["--batch-size"]) : 0;
    if (opt.count("--batch-size") && batch <= 0)
      throw UsageError("--batch-size=" + opt["--batch-size"] + ": expected a positive int");
    std::vector<double> guidance;
    if (opt.count("--guidance")) guidance.push_back(to_double("--guidance", opt["--guidance"]));
    const uint64_t seed = to_seed(opt["--seed"]);
    // An empty value is refused, not taken for the default.
    for (const char* flag : {"--steps", "--upsampler-steps", "--device", "--package", "--out"})
      if (opt.count(flag) && opt[flag].empty())
        throw UsageError(std::string(flag) + "='': expected a value (leave the option out for its default)");

    auto package = admrt::Stack::load_package(opt["--package"], opt.count("--device") ? opt["--device"] : "");
    if (batch == 0) batch = std::min<int64_t>(16, package->max_batch());
    const int64_t shard = opt.count("--shard-size") ? to_int("--shard-size", opt["--shard-size"]) : 0;
    if (opt.count("--shard-size") && shard <= 0)
      throw UsageError("--shard-size=" + std::to_string(shard) + ": expected a positive int");
    auto params = admrt::Context::default_params();
    params.steps = opt.count("--steps") ? opt["--steps"] : "";
    params.upsampler_steps = opt.count("--upsampler-steps") ? opt["--upsampler-steps"] : "";
    params.batch_size = batch;
    params.eta = to_double("--eta", opt["--eta"]);
    if (opt.count("--guidance-interval")) {
      const std::string& v = opt["--guidance-interval"];
      const size_t comma = v.find(',');
      if (comma == std::string::npos)
        throw UsageError("--guidance-interval='" + v + "': expected T_MIN,T_MAX (two model timesteps)");
      params.guidance_t_min = to_int("--guidance-interval", v.substr(0, comma));
      params.guidance_t_max = to_int("--guidance-interval", v.substr(comma + 1));
    }
    if (opt.count("--guidance-every")) params.guidance_every = to_int("--guidance-every", opt["--guidance-every"]);
    if (opt.count("--dynamic-threshold"))
      params.dynamic_threshold = to_double("--dynamic-threshold", opt["--dynamic-threshold"]);
    params.cuda_graphs = graphs;
    admrt::Context ctx(package, params);
    ctx.check_num(num);  // before anything is sized by it

    admrt::SampleRun run;
    run.out = opt["--out"];
    run.command = "admrt-sample";
    run.num = num;
    if (opt.count("--classes")) {
      std::stringstream ss(opt["--classes"]);
      std::string item;
      while (std::getline(ss, item, ',')) run.classes.push_back(to_int("--classes", item));
      if (run.classes.empty()) throw UsageError("--classes='': expected comma-separated ints");
    }
    if (opt.count("--guidance")) run.guidance = to_double("--guidance", opt["--guidance"]);
    run.seed = static_cast<int64_t>(seed);  // the uint64's bits (runfolder.h)
    run.shard_size = shard;
    run.progress = [&](int64_t done, int64_t total) {
      if (interrupted) throw Interrupted();
      if (!progress || (done != total && done % 10 != 0)) return;
      std::cerr << "\radmrt-sample: " << done << "/" << total << " steps" << (done == total ? "\n" : "") << std::flush;
      line_open = done != total;
    };
    const std::string final_path = admrt::run_samples(ctx, run);
    std::cerr << "admrt-sample: wrote " << final_path << "\n";
    return 0;
  } catch (const UsageError& e) {
    std::cerr << "admrt-sample: " << e.what() << "\n";
    return 2;
  } catch (const admrt::RunFolderError& e) {  // a refused folder
    if (line_open) std::cerr << "\n";
    std::cerr << "admrt-sample: " << std::string(e.what()).substr(0, std::string(e.what()).find('\n')) << "\n";
    return 1;
  } catch (const std::invalid_argument& e) {  // a bad argument, as the driver words it
    if (line_open) std::cerr << "\n";
    const std::string msg = e.what();
    std::cerr << "admrt-sample: " << msg.substr(0, msg.find('\n')) << "\n";
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
