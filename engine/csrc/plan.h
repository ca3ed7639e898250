// The step plan: which sampler runs over which respacing of a model's process, parsed from its
// string once, here, for every front end (admrt.Engine, admrt sample, admrt-sample, packages).
//
// Grammar (whitespace around items ignored):
//
//   plan      := [method ":"] respacing
//   method    := "ddpm" | "ddim"
//   respacing := "ddim" N                 the DDIM paper's integer stride giving exactly N steps
//              | N ("," N)*               N steps strided over the process, or the process cut
//                                         into equal sections with a, b, c, ... steps each
//   N         := a positive integer
//
// The method defaults to the one the respacing implies: "ddimN" -> DDIM, counts -> DDPM
// (guided-diffusion's timestep_respacing with use_ddim). "ddim:250" is DDIM over the 250-step
// respacing (guided-diffusion's --use_ddim True --timestep_respacing 250); "ddpm:ddim25" is DDPM
// over the DDIM stride. Canonical text (str()): the respacing alone when the method is the one it
// implies ("ddim25", "250", "10,10,5"), else "method:respacing". Packages key their tables by it.
//
// Which timesteps a respacing keeps is computed once, in Python (admrt.diffusion.space_timesteps,
// the reference's respace.space_timesteps), from sections() / ddim_steps(); the core and the
// packages receive the resulting tables.
//
// A new sampling method touches two files: here, its enum value and its row of kMethods (the
// parser, the run records and the Python binding read that table), and sampler.cpp, its per-step
// coefficients (coefficient_rows) and its step function (Sampler::step).
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace admrt {

// The samplers of the core (sampler.cpp has one step function for each).
enum class Method { DDPM, DDIM };
// Each method's name in step plans, records and Python (upper-cased there: admrt.core.Method.DDIM).
inline constexpr std::pair<Method, const char*> kMethods[] = {{Method::DDPM, "ddpm"}, {Method::DDIM, "ddim"}};

class StepPlan {
 public:
  // Parses `text`; throws std::invalid_argument naming `arg`, the text and the grammar.
  static StepPlan parse(const std::string& text, const std::string& arg = "steps");

  Method method() const { return method_; }
  // Respacing: DDPM-style section counts ({250}, {10, 10, 5}), or empty with ddim_steps() > 0.
  const std::vector<int64_t>& sections() const { return sections_; }
  int64_t ddim_steps() const { return ddim_steps_; }   // N of "ddimN", else 0
  std::string respacing() const;                        // "ddim25" | "250" | "10,10,5"
  std::string str() const;                              // canonical text (see above)
  std::string method_name() const;                      // its kMethods name
  StepPlan with_method(Method method) const;           // the same respacing, another sampler
  bool operator==(const StepPlan& other) const { return str() == other.str(); }

 private:
  Method method_ = Method::DDIM;
  std::vector<int64_t> sections_;
  int64_t ddim_steps_ = 0;
};

// A name of kMethods -> Method; throws naming `arg` and the names.
Method parse_method(const std::string& name, const std::string& arg = "method");
std::string method_name(Method method);

}  // namespace admrt
