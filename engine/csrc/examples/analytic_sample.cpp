// A Python-free program on libadmrt alone (libtorch, no libpython): a C++
// Denoiser (an analytic stand-in for a network: eps = 0.1 x, v = 0) sampled by a Sampler
// context with seeded noise. Prints the samples, one value per line, for the test that compares
// them with the same context driven from Python (tests/engine/test_core_library.py).
//   analytic_sample METHOD(ddim|ddpm) STEPS ETA SEED...
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

#include "sampler.h"

namespace {

class Analytic final : public admrt::Denoiser {
 public:
  at::Tensor operator()(const at::Tensor& x_t, const at::Tensor&, const at::Tensor&,
                        const std::optional<at::Tensor>&) override {
    return at::cat({x_t * 0.1, at::zeros_like(x_t)}, 1);
  }
};

// A linear-schedule process respaced to `steps` evenly strided timesteps (admrt.diffusion's
// space_timesteps(1000, "N") for the N that divide the schedule evenly is not needed here: the
// test passes the same tables to both sides through files is avoided by recomputing them).
std::map<std::string, at::Tensor> tables(int64_t steps) {
  const int64_t T = 1000;
  at::Tensor betas_full = at::linspace(1e-4, 0.02, T, at::kDouble);
  at::Tensor ac_full = at::cumprod(1 - betas_full, 0);
  std::vector<int64_t> keep;
  for (int64_t i = 0; i < steps; ++i) keep.push_back(i * (T - 1) / (steps - 1));
  at::Tensor idx = at::tensor(keep, at::kLong);
  at::Tensor ac = ac_full.index_select(0, idx);
  at::Tensor ac_prev = at::cat({at::ones({1}, at::kDouble), ac.slice(0, 0, steps - 1)});
  at::Tensor betas = 1 - ac / ac_prev;
  at::Tensor post_var = betas * (1 - ac_prev) / (1 - ac);
  at::Tensor post_log = at::log(at::cat({post_var.slice(0, 1, 2), post_var.slice(0, 1)}));
  return {{"alphas_cumprod", ac},
          {"alphas_cumprod_prev", ac_prev},
          {"log_betas", at::log(betas)},
          {"sqrt_recip_alphas_cumprod", at::sqrt(1 / ac)},
          {"sqrt_recipm1_alphas_cumprod", at::sqrt(1 / ac - 1)},
          {"posterior_variance", post_var},
          {"posterior_log_variance_clipped", post_log},
          {"posterior_mean_coef1", betas * at::sqrt(ac_prev) / (1 - ac)},
          {"posterior_mean_coef2", (1 - ac_prev) * at::sqrt(1 - betas) / (1 - ac)},
          {"fixed_large_variance", at::cat({post_var.slice(0, 1, 2), betas.slice(0, 1)})},
          {"fixed_large_log_variance", at::log(at::cat({post_var.slice(0, 1, 2), betas.slice(0, 1)}))},
          {"timestep_map", idx}};
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 5) {
    std::fprintf(stderr, "usage: %s ddim|ddpm STEPS ETA SEED...\n", argv[0]);
    return 2;
  }
  admrt::SamplerParams p = admrt::default_params();
  p.method = std::string(argv[1]) == "ddpm" ? admrt::Method::DDPM : admrt::Method::DDIM;
  const int64_t steps = std::atoll(argv[2]);
  p.eta = std::atof(argv[3]);
  std::vector<int64_t> seeds;
  for (int i = 4; i < argc; ++i) seeds.push_back(static_cast<int64_t>(std::strtoull(argv[i], nullptr, 10)));
  p.batch_size = static_cast<int64_t>(seeds.size());
  p.image_shape = {3, 4, 4};
  admrt::Sampler sampler(std::make_shared<Analytic>(), nullptr, admrt::Schedule::from_tables(tables(steps), 1000, false), p);
  admrt::BatchInputs in;
  in.seeds = at::tensor(seeds, at::kLong);
  at::Tensor x = sampler.sample(in).contiguous();
  for (int64_t i = 0; i < x.numel(); ++i) std::printf("%.9g\n", x.data_ptr<float>()[i]);
  return 0;
}
