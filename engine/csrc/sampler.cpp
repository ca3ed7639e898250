// The DDPM / DDIM loops; see sampler.h for what each piece matches in guided-diffusion.
#include "sampler.h"

#include <ATen/Context.h>
#include <c10/core/GradMode.h>

#include <mutex>

#include <cmath>
#include <sstream>
#include <stdexcept>

namespace admrt {
namespace {

template <typename... Args>
std::string cat(const Args&... args) {
  std::ostringstream s;
  (s << ... << args);
  return s.str();
}

std::vector<double> host_table(const std::map<std::string, at::Tensor>& tables, const char* name,
                               int64_t n) {
  auto it = tables.find(name);
  if (it == tables.end()) throw std::invalid_argument(cat("tables: missing table '", name, "'"));
  at::Tensor t = it->second.detach().to(at::kCPU, at::kDouble).contiguous();
  if (t.dim() != 1 || (n >= 0 && t.size(0) != n))
    throw std::invalid_argument(cat("tables['", name, "']: expected shape (", n, ",), got ", t.sizes()));
  return std::vector<double>(t.data_ptr<double>(), t.data_ptr<double>() + t.size(0));
}

// Per-step float32 coefficients; arithmetic on them is float32, in the reference's order.
struct Step {
  int64_t model_t;          // original timestep fed to the network
  float sqrt_recip_ac;      // 1/sqrt(abar_t)
  float sqrt_recipm1_ac;    // sqrt(1/abar_t - 1)
  float coef1, coef2;       // posterior mean coefficients of x_0 and x_t
  float min_log, max_log;   // learned range: log beta~_t and log beta_t
  float fixed_var, fixed_log_var;  // fixed small / large variance and its log
  float sqrt_1m_ac;         // sqrt(1 - abar_t) (condition_score)
  float ddim_sigma;         // eta * sqrt((1-abar_prev)/(1-abar)) * sqrt(1 - abar/abar_prev)
  float ddim_sqrt_acp;      // sqrt(abar_prev)
  float ddim_dir;           // sqrt(1 - abar_prev - sigma^2)
};

std::vector<Step> make_steps(const Schedule& s, const SamplerOptions& o) {
  std::vector<Step> steps(s.num_steps);
  const float eta = static_cast<float>(o.eta);
  for (int64_t i = 0; i < s.num_steps; ++i) {
    Step& st = steps[i];
    st.model_t = s.timestep_map[i];
    st.sqrt_recip_ac = static_cast<float>(s.sqrt_recip_alphas_cumprod[i]);
    st.sqrt_recipm1_ac = static_cast<float>(s.sqrt_recipm1_alphas_cumprod[i]);
    st.coef1 = static_cast<float>(s.posterior_mean_coef1[i]);
    st.coef2 = static_cast<float>(s.posterior_mean_coef2[i]);
    st.min_log = static_cast<float>(s.posterior_log_variance_clipped[i]);
    st.max_log = static_cast<float>(s.log_betas[i]);
    const bool small = o.variance == Variance::FixedSmall;
    st.fixed_var = static_cast<float>(small ? s.posterior_variance[i] : s.fixed_large_variance[i]);
    st.fixed_log_var = static_cast<float>(small ? s.posterior_log_variance_clipped[i]
                                                : s.fixed_large_log_variance[i]);
    const float ab = static_cast<float>(s.alphas_cumprod[i]);
    const float abp = static_cast<float>(s.alphas_cumprod_prev[i]);
    st.sqrt_1m_ac = std::sqrt(1.0f - ab);
    st.ddim_sigma = eta * std::sqrt((1.0f - abp) / (1.0f - ab)) * std::sqrt(1.0f - ab / abp);
    st.ddim_sqrt_acp = std::sqrt(abp);
    st.ddim_dir = std::sqrt(1.0f - abp - st.ddim_sigma * st.ddim_sigma);
  }
  return steps;
}

uint64_t splitmix64(uint64_t z) {
  z += 0x9E3779B97F4A7C15ULL;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

// The noise of one batch: draw k of sample b (seeded) or the next draw of one generator.
class Noise {
 public:
  Noise(const SamplerOptions& o, const SampleRequest& r, at::TensorOptions opts)
      : mode_(o.noise), shape_(r.shape), opts_(opts) {
    if (mode_ == NoiseMode::Seeded) {
      if (static_cast<int64_t>(r.seeds.size()) != shape_[0])
        throw std::invalid_argument(cat("seeds: expected ", shape_[0], " (one per sample), got ", r.seeds.size()));
      seeds_ = r.seeds;
      at::Generator base = at::globalContext().defaultGenerator(r.device);
      for (size_t b = 0; b < seeds_.size(); ++b) gens_.push_back(base.clone());
    } else if (r.generator.has_value()) {
      gens_.push_back(*r.generator);
    }
  }

  at::Tensor draw(uint64_t k) {
    if (mode_ == NoiseMode::Reference) {
      // th.randn(*shape) / th.randn_like(x): the global generator unless one was given.
      std::optional<at::Generator> g;
      if (!gens_.empty()) g = gens_[0];
      return at::randn(shape_, g, opts_);
    }
    at::Tensor out = at::empty(shape_, opts_);
    for (size_t b = 0; b < seeds_.size(); ++b) {
      at::Generator& g = gens_[b];
      {
        std::lock_guard<std::mutex> lock(g.mutex());
        g.set_current_seed(noise_seed(seeds_[b], k));
      }
      out[b].normal_(0.0, 1.0, g);
    }
    return out;
  }

 private:
  NoiseMode mode_;
  std::vector<int64_t> shape_;
  at::TensorOptions opts_;
  std::vector<uint64_t> seeds_;
  std::vector<at::Generator> gens_;
};

void check_finite(const at::Tensor& t, const char* what, int64_t i, int64_t model_t) {
  if (!at::isfinite(t).all().item<bool>())
    throw std::runtime_error(cat(what, " contains NaN or Inf at step index ", i, " (timestep t=", model_t,
                                 "); check the weights, the dtype (fp16 overflow?) and the inputs"));
}

}  // namespace

uint64_t noise_seed(uint64_t seed, uint64_t draw) {
  return splitmix64(splitmix64(seed) ^ (draw * 0xD1B54A32D192ED03ULL));
}

Schedule Schedule::from_tables(const std::map<std::string, at::Tensor>& tables,
                               int64_t original_num_steps, bool rescale_timesteps) {
  Schedule s;
  s.alphas_cumprod = host_table(tables, "alphas_cumprod", -1);
  const int64_t n = static_cast<int64_t>(s.alphas_cumprod.size());
  if (n == 0) throw std::invalid_argument("tables: empty schedule");
  s.num_steps = n;
  s.original_num_steps = original_num_steps;
  s.rescale_timesteps = rescale_timesteps;
  s.alphas_cumprod_prev = host_table(tables, "alphas_cumprod_prev", n);
  s.log_betas = host_table(tables, "log_betas", n);
  s.sqrt_recip_alphas_cumprod = host_table(tables, "sqrt_recip_alphas_cumprod", n);
  s.sqrt_recipm1_alphas_cumprod = host_table(tables, "sqrt_recipm1_alphas_cumprod", n);
  s.posterior_variance = host_table(tables, "posterior_variance", n);
  s.posterior_log_variance_clipped = host_table(tables, "posterior_log_variance_clipped", n);
  s.posterior_mean_coef1 = host_table(tables, "posterior_mean_coef1", n);
  s.posterior_mean_coef2 = host_table(tables, "posterior_mean_coef2", n);
  s.fixed_large_variance = host_table(tables, "fixed_large_variance", n);
  s.fixed_large_log_variance = host_table(tables, "fixed_large_log_variance", n);
  auto it = tables.find("timestep_map");
  if (it == tables.end()) throw std::invalid_argument("tables: missing table 'timestep_map'");
  at::Tensor m = it->second.to(at::kCPU, at::kLong).contiguous();
  if (m.dim() != 1 || m.size(0) != n)
    throw std::invalid_argument(cat("tables['timestep_map']: expected shape (", n, ",), got ", m.sizes()));
  s.timestep_map.assign(m.data_ptr<int64_t>(), m.data_ptr<int64_t>() + n);
  if (original_num_steps <= 0)
    throw std::invalid_argument(cat("original_num_steps=", original_num_steps, ": expected a positive int"));
  return s;
}

at::Tensor sample(Denoiser& model, ClassifierGrad* classifier, const Schedule& schedule,
                  const SamplerOptions& options, const SampleRequest& request,
                  const ProgressFn& progress) {
  const auto& shape = request.shape;
  if (shape.size() != 4 || shape[0] <= 0 || shape[1] <= 0)
    throw std::invalid_argument(cat("shape: expected (B, C, H, W) with B, C > 0, got ", at::IntArrayRef(shape)));
  if (schedule.num_steps <= 0) throw std::invalid_argument("schedule: no steps");
  if (options.method == Method::DDIM && options.eta < 0)
    throw std::invalid_argument(cat("eta=", options.eta, ": expected eta >= 0"));
  const int64_t B = shape[0], C = shape[1];
  const auto opts = at::TensorOptions().dtype(at::kFloat).device(request.device);

  std::optional<at::Tensor> y, low_res;
  if (request.y) {
    if (request.y->dim() != 1 || request.y->size(0) != B)
      throw std::invalid_argument(cat("y: expected shape (", B, ",), got ", request.y->sizes()));
    y = request.y->to(request.device, at::kLong);
  }
  if (request.low_res) {
    if (request.low_res->dim() != 4 || request.low_res->size(0) != B)
      throw std::invalid_argument(cat("low_res: expected (", B, ", C, h, w), got ", request.low_res->sizes()));
    low_res = request.low_res->to(request.device, at::kFloat);
  }
  // Guidance scales (B,1,1,1); guided only when some scale is non-zero.
  at::Tensor scale;
  bool guided = false;
  if (request.guidance) {
    if (request.guidance->numel() != B)
      throw std::invalid_argument(cat("guidance: expected ", B, " scales (one per sample), got ", request.guidance->numel()));
    scale = request.guidance->to(request.device, at::kFloat).reshape({B, 1, 1, 1});
    guided = scale.ne(0).any().item<bool>();
  }
  if (guided && classifier == nullptr)
    throw std::invalid_argument("guidance != 0 needs a classifier: pass one, or set guidance to 0");
  if (guided && !y) throw std::invalid_argument("guidance needs class labels y");

  const std::vector<Step> steps = make_steps(schedule, options);
  Noise noise(options, request, opts);
  at::Tensor x;
  if (request.x_T) {
    if (request.x_T->sizes() != at::IntArrayRef(shape))
      throw std::invalid_argument(cat("x_T: expected shape ", at::IntArrayRef(shape), ", got ", request.x_T->sizes()));
    x = request.x_T->to(opts);
  } else {
    x = noise.draw(0);
  }

  c10::NoGradGuard no_grad;
  const int64_t n = schedule.num_steps;
  for (int64_t k = 1; k <= n; ++k) {
    const int64_t i = n - k;  // step index, from N-1 down to 0
    const Step& st = steps[i];
    at::Tensor t = at::full({B}, st.model_t, opts.dtype(at::kLong));
    if (schedule.rescale_timesteps)
      t = t.to(at::kFloat) * (1000.0 / static_cast<double>(schedule.original_num_steps));

    at::Tensor out = model(x, t, y, low_res);
    const bool learned = options.variance == Variance::LearnedRange;
    if (out.dim() != 4 || out.size(0) != B || out.size(2) != shape[2] || out.size(3) != shape[3] ||
        !(out.size(1) == 2 * C || (!learned && out.size(1) == C)))
      throw std::runtime_error(cat("model output: expected shape (", B, ", ", (learned ? 2 * C : C), ", ", shape[2],
                                   ", ", shape[3], ")", (learned ? " (eps and variance values)" : ""), ", got ",
                                   out.sizes()));
    if (options.check_finite) check_finite(out, "model output", i, st.model_t);
    out = out.to(at::kFloat);
    at::Tensor eps = out.narrow(1, 0, C);

    // x_0 prediction (p_mean_variance / _predict_xstart_from_eps), clipped.
    at::Tensor x0 = x * st.sqrt_recip_ac - eps * st.sqrt_recipm1_ac;
    if (options.clip_denoised) x0 = x0.clamp(-1, 1);

    at::Tensor g;
    if (guided) {
      g = (*classifier)(x, t, *y);
      if (g.sizes() != x.sizes())
        throw std::runtime_error(cat("classifier gradient: expected shape ", x.sizes(), ", got ", g.sizes()));
      g = g.to(at::kFloat) * scale;
      if (options.check_finite) check_finite(g, "classifier gradient", i, st.model_t);
    }

    if (options.method == Method::DDPM) {
      // p_sample: mean of q(x_{t-1} | x_t, x_0), variance Sigma_t.
      at::Tensor mean = x0 * st.coef1 + x * st.coef2;
      at::Tensor noise_i = noise.draw(k);
      if (learned) {
        at::Tensor frac = (out.narrow(1, C, C) + 1) / 2;
        at::Tensor log_var = frac * st.max_log + (1 - frac) * st.min_log;
        if (guided) mean = mean + at::exp(log_var) * g;  // condition_mean: mu + Sigma g
        x = i > 0 ? mean + at::exp(0.5 * log_var) * noise_i : mean;
      } else {
        if (guided) mean = mean + g * st.fixed_var;
        x = i > 0 ? mean + noise_i * std::exp(0.5f * st.fixed_log_var) : mean;
      }
    } else {
      // ddim_sample (eq. 12 of Song et al.), with condition_score guidance.
      if (guided) {
        at::Tensor e = (x * st.sqrt_recip_ac - x0) / st.sqrt_recipm1_ac;
        e = e - g * st.sqrt_1m_ac;
        x0 = x * st.sqrt_recip_ac - e * st.sqrt_recipm1_ac;  // not clipped again (as the reference)
      }
      at::Tensor e = (x * st.sqrt_recip_ac - x0) / st.sqrt_recipm1_ac;
      at::Tensor noise_i = noise.draw(k);  // drawn even at eta = 0 (reference order)
      at::Tensor mean_pred = x0 * st.ddim_sqrt_acp + e * st.ddim_dir;
      x = i > 0 && st.ddim_sigma != 0.0f ? mean_pred + noise_i * st.ddim_sigma : mean_pred;
    }
    if (progress) progress(k, n);
  }
  if (options.check_finite) check_finite(x, "sample", 0, steps[0].model_t);
  return x;
}

at::Tensor to_uint8_nhwc(const at::Tensor& x) {
  if (x.dim() != 4) throw std::invalid_argument(cat("x: expected (B, C, H, W), got ", x.sizes()));
  return ((x.to(at::kFloat) + 1) * 127.5).clamp(0, 255).to(at::kByte).permute({0, 2, 3, 1}).contiguous();
}

}  // namespace admrt
