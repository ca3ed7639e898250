// The step plan: which sampler runs over which respacing of a model's process, parsed from its
// string once, here, for every front end (admrt.Engine, admrt sample, admrt-sample, packages).
//
// Grammar (whitespace around items ignored):
//
//   plan      := [method ":"] respacing
//              | solver N ["-logsnr"]      shorthand of "solver:tN" / "solver:logsnrN"
//   method    := "ddpm" | "ddim" | solver
//   solver    := "dpmpp2m" | "dpmpp3m" | "dpmpp2m-sde" | "unipc2m" | "unipc3m"
//   respacing := "ddim" N                 the DDIM paper's integer stride giving exactly N steps
//              | N ("," N)*               N steps strided over the process, or the process cut
//                                         into equal sections with a, b, c, ... steps each
//              | "t" N | "logsnr" N       a solver grid: N+1 points from t = T-1 to t = 0, uniform
//                                         in t or in log-SNR, rounded to the model's discrete
//                                         timesteps; the model is called at the first N and the
//                                         last step lands on clean data (sigma = 0)
//   N         := a positive integer
//
// The method defaults to the one the respacing implies: "ddimN", "tN", "logsnrN" -> DDIM,
// counts -> DDPM (guided-diffusion's timestep_respacing with use_ddim). "ddim:250" is DDIM over the
// 250-step respacing (guided-diffusion's --use_ddim True --timestep_respacing 250); "ddpm:ddim25"
// is DDPM over the DDIM stride; "dpmpp2m10" is DPM-Solver++(2M) over "t10", "unipc3m8-logsnr"
// UniPC-3 over "logsnr8". Canonical text (str()): a solver over a solver grid in its shorthand,
// else the respacing alone when the method is the one it implies ("ddim25", "250", "10,10,5"),
// else "method:respacing". Packages key their tables by the respacing.
//
// Which timesteps a respacing keeps is computed once, in Python (admrt.diffusion.space_timesteps,
// the reference's respace.space_timesteps, and the solver grids), from spacing() and count(); the
// core and the packages receive the resulting tables.
//
// A new sampling method touches two files: here, its enum value and its row of kMethods (the
// parser, the run records and the Python binding read that table), and sampler.cpp, its per-step
// coefficients (coefficient_rows) and, unless it is a linear multistep update over x_0
// predictions like the solvers, its step function (Sampler::step).
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace admrt {

// The samplers of the core (sampler.cpp). DDPM and DDIM are guided-diffusion's p_sample and
// ddim_sample; the solvers are multistep and predict data (x_0): DPM-Solver++(2M), (3M) and
// SDE-DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2 and its SDE form) and UniPC with B(h) = h
// (Zhao et al. 2023), order 2 and 3, predictor plus corrector.
enum class Method { DDPM, DDIM, DPMPP2M, DPMPP3M, DPMPP2M_SDE, UNIPC2M, UNIPC3M };
// Each method's name in step plans, records and Python (upper-cased there, '-' as '_':
// admrt.core.Method.DPMPP2M_SDE).
inline constexpr std::pair<Method, const char*> kMethods[] = {
    {Method::DDPM, "ddpm"},       {Method::DDIM, "ddim"},
    {Method::DPMPP2M, "dpmpp2m"}, {Method::DPMPP3M, "dpmpp3m"}, {Method::DPMPP2M_SDE, "dpmpp2m-sde"},
    {Method::UNIPC2M, "unipc2m"}, {Method::UNIPC3M, "unipc3m"}};
// Whether a method is one of the multistep solvers (not guided-diffusion's own two).
inline constexpr bool is_solver(Method m) { return m != Method::DDPM && m != Method::DDIM; }

// How a respacing picks its timesteps (plan.h's grammar).
enum class Spacing { Sections, DdimStride, UniformT, UniformLogSnr };

class StepPlan {
 public:
  // Parses `text`; throws std::invalid_argument naming `arg`, the text and the grammar.
  static StepPlan parse(const std::string& text, const std::string& arg = "steps");

  Method method() const { return method_; }
  Spacing spacing() const { return spacing_; }
  // Respacing: DDPM-style section counts ({250}, {10, 10, 5}), else empty.
  const std::vector<int64_t>& sections() const { return sections_; }
  int64_t ddim_steps() const { return spacing_ == Spacing::DdimStride ? count_ : 0; }  // N of "ddimN", else 0
  int64_t grid_steps() const { return spacing_ == Spacing::UniformT || spacing_ == Spacing::UniformLogSnr ? count_ : 0; }  // N of "tN" / "logsnrN"
  std::string respacing() const;                        // "ddim25" | "250" | "10,10,5" | "t10" | "logsnr10"
  std::string str() const;                              // canonical text (see above)
  std::string method_name() const;                      // its kMethods name
  StepPlan with_method(Method method) const;           // the same respacing, another sampler
  bool operator==(const StepPlan& other) const { return str() == other.str(); }

 private:
  Method method_ = Method::DDIM;
  Spacing spacing_ = Spacing::Sections;
  std::vector<int64_t> sections_;
  int64_t count_ = 0;  // N of "ddimN", "tN", "logsnrN"
};

// A name of kMethods -> Method; throws naming `arg` and the names.
Method parse_method(const std::string& name, const std::string& arg = "method");
std::string method_name(Method method);

}  // namespace admrt
