// The DDPM / DDIM loops over a Sampler context; see sampler.h for what each piece matches in
// guided-diffusion.
#include "sampler.h"

#include <c10/core/GradMode.h>

#include <algorithm>
#include <cmath>
#include <set>
#include <sstream>
#include <stdexcept>

#include "text.h"

#include "noise.h"

#ifdef ADMRT_WITH_CUDA
#include <c10/cuda/CUDAStream.h>
#include <ATen/cuda/CUDAEvent.h>
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAGuard.h>
#endif

namespace admrt {
namespace {

std::vector<double> host_table(const std::map<std::string, at::Tensor>& tables, const char* name, int64_t n) {
  auto it = tables.find(name);
  if (it == tables.end()) throw std::invalid_argument(cat("tables: missing table '", name, "'"));
  at::Tensor t = it->second.detach().to(at::kCPU, at::kDouble).contiguous();
  if (t.dim() != 1 || (n >= 0 && t.size(0) != n))
    throw std::invalid_argument(cat("tables['", name, "']: expected shape (", n, ",), got ", t.sizes()));
  return std::vector<double>(t.data_ptr<double>(), t.data_ptr<double>() + t.size(0));
}

// Columns of the per-step coefficient table. Values are float32, computed on the host in the
// reference's order (it gathers float64 tables and casts them to float32 per step).
enum Coef : int64_t {
  kSqrtRecipAc,    // 1/sqrt(abar_t)
  kSqrtRecipm1Ac,  // sqrt(1/abar_t - 1)
  kPostCoef1,      // posterior mean coefficient of x_0
  kPostCoef2,      // posterior mean coefficient of x_t
  kMinLog,         // learned range: log beta~_t
  kMaxLog,         // learned range: log beta_t
  kFixedVar,       // fixed small / large variance Sigma_t (guidance: mu + Sigma g)
  kNoiseStd,       // fixed variance: exp(log Sigma_t / 2); DDIM: sigma_t; 0 at the last step
  kNonzero,        // 1, and 0 at the last step (t = 0): no noise there
  kSqrt1mAc,       // sqrt(1 - abar_t) (condition_score)
  kDdimSqrtAcp,    // sqrt(abar_{t-1})
  kDdimDir,        // sqrt(1 - abar_{t-1} - sigma_t^2)
  kNoiseGate,      // 1 when this step's noise has a non-zero coefficient, else 0 (nothing drawn)
  // Solvers. The corrected sample xc = kCx x_t + kCl last + kC0 m + kC1 h1 + kC2 h2 + kC3 h3 (UniPC's
  // corrector; xc = x_t for the others), then x_next = kPx xc + kP0 m + kP1 h1 + kP2 h2 + kPn noise,
  // with m this call's x_0 prediction and h1, h2, h3 the previous calls' (h1 the last).
  kCx, kCl, kC0, kC1, kC2, kC3,
  kPx, kP0, kP1, kP2, kPn,
  kGuide,          // 1 when the classifier runs at this step (guidance interval / every k-th call)
  kNumCoefs
};

// How many previous x_0 predictions a solver reads.
int64_t history_depth(Method m) {
  switch (m) {
    case Method::DPMPP2M: case Method::DPMPP2M_SDE: return 1;
    case Method::DPMPP3M: case Method::UNIPC2M: return 2;
    case Method::UNIPC3M: return 3;
    default: return 0;
  }
}

// lambda = log(alpha / sigma) of abar (+inf at abar = 1: clean data).
double log_snr(double abar) { return 0.5 * (std::log(abar) - std::log1p(-abar)); }

// Solves the small dense system a x = b (Gaussian elimination with partial pivoting).
std::vector<double> solve(std::vector<std::vector<double>> a, std::vector<double> b) {
  const size_t n = b.size();
  for (size_t c = 0; c < n; ++c) {
    size_t piv = c;
    for (size_t r = c + 1; r < n; ++r)
      if (std::abs(a[r][c]) > std::abs(a[piv][c])) piv = r;
    std::swap(a[c], a[piv]);
    std::swap(b[c], b[piv]);
    for (size_t r = c + 1; r < n; ++r) {
      const double f = a[r][c] / a[c][c];
      for (size_t j = c; j < n; ++j) a[r][j] -= f * a[c][j];
      b[r] -= f * b[c];
    }
  }
  std::vector<double> x(n);
  for (size_t r = n; r-- > 0;) {
    double v = b[r];
    for (size_t j = r + 1; j < n; ++j) v -= a[r][j] * x[j];
    x[r] = v / a[r][r];
  }
  return x;
}

// UniPC's weights rho for order p over the nodes rks (the last is 1), B(h) = h (Zhao et al. 2023,
// Algorithm 1 / 2): R[i][j] = rks[j]^i, b[i] = h phi_{i+1}(h) i! / B(h) with hh = -h (data
// prediction). Predictor (corrector = false): the first p-1 of the system without its last row
// and column (order 2: 1/2); corrector: all p (order 1: 1/2).
std::vector<double> unipc_rhos(const std::vector<double>& rks, double hh, bool corrector) {
  const size_t p = rks.size();
  if (!corrector && p == 2) return {0.5};
  if (corrector && p == 1) return {0.5};
  const double b_h = hh;
  double h_phi_k = std::expm1(hh) / hh - 1, factorial = 1;
  std::vector<std::vector<double>> r(p, std::vector<double>(p));
  std::vector<double> b(p);
  for (size_t i = 1; i <= p; ++i) {
    for (size_t j = 0; j < p; ++j) r[i - 1][j] = std::pow(rks[j], static_cast<double>(i - 1));
    b[i - 1] = h_phi_k * factorial / b_h;
    factorial *= static_cast<double>(i + 1);
    h_phi_k = h_phi_k / hh - 1 / factorial;
  }
  if (corrector) return solve(r, b);
  r.pop_back();
  for (auto& row : r) row.pop_back();
  b.pop_back();
  return solve(r, b);
}

// The solvers' columns of row k (loop order), from the grid's abar: step k goes from abar[k] to
// abar[k+1] (abar[N] = 1: the last step lands on clean data, first order, x_next = m, as
// diffusers' final_sigmas_type="zero"). Orders as diffusers' DPMSolverMultistepScheduler and
// UniPCMultistepScheduler (lower_order_final): DPM-Solver++ warms up from order 1 and lowers
// its last steps when N < 15; UniPC's order is min(order, N - k, k + 1).
void solver_coefficients(Method m, const std::vector<double>& abar, int64_t k, float* r) {
  const int64_t n = static_cast<int64_t>(abar.size()) - 1;
  auto alpha = [&](int64_t j) { return std::sqrt(abar[j]); };
  auto sigma = [&](int64_t j) { return std::sqrt(1 - abar[j]); };
  auto lam = [&](int64_t j) { return log_snr(abar[j]); };
  double cx = 1, cl = 0, c[4] = {0, 0, 0, 0}, px = 0, p[3] = {0, 0, 0}, pn = 0;
  const bool last = k == n - 1;  // lands on sigma = 0: x_next = m (every solver's first order there)
  if (m == Method::UNIPC2M || m == Method::UNIPC3M) {
    const int64_t order = m == Method::UNIPC2M ? 2 : 3;
    auto this_order = [&](int64_t j) { return std::min({order, n - j, j + 1}); };
    // Corrector (k >= 1): from point k-1 to k at the previous step's order, over last, h1, h2, ...
    if (k >= 1) {
      const int64_t q = this_order(k - 1);
      const double h = lam(k) - lam(k - 1), hh = -h;
      std::vector<double> rks;
      for (int64_t i = 1; i < q; ++i) rks.push_back((lam(k - 1 - i) - lam(k - 1)) / h);
      rks.push_back(1.0);
      const std::vector<double> rho = unipc_rhos(rks, hh, /*corrector=*/true);
      const double a = alpha(k), base = alpha(k) * hh;  // B(h) = hh
      cx = 0;
      cl = sigma(k) / sigma(k - 1);
      c[1] = -a * std::expm1(hh);
      for (int64_t i = 1; i < q; ++i) {  // D1_i = (h_{i+1} - h1) / rk_i
        c[i + 1] -= base * rho[i - 1] / rks[i - 1];
        c[1] += base * rho[i - 1] / rks[i - 1];
      }
      c[0] -= base * rho[q - 1];  // D1_t = m - h1
      c[1] += base * rho[q - 1];
    }
    // Predictor: from point k to k+1 over xc, m, h1, h2.
    const int64_t q = this_order(k);
    if (last) {
      p[0] = 1;
    } else {
      const double h = lam(k + 1) - lam(k), hh = -h;
      std::vector<double> rks;
      for (int64_t i = 1; i < q; ++i) rks.push_back((lam(k - i) - lam(k)) / h);
      rks.push_back(1.0);
      const double a = alpha(k + 1), base = a * hh;
      px = sigma(k + 1) / sigma(k);
      p[0] = -a * std::expm1(hh);
      if (q > 1) {
        const std::vector<double> rho = unipc_rhos(rks, hh, /*corrector=*/false);
        for (int64_t i = 1; i < q; ++i) {  // D1_i = (h_i - m) / rk_i
          p[i] -= base * rho[i - 1] / rks[i - 1];
          p[0] += base * rho[i - 1] / rks[i - 1];
        }
      }
    }
  } else {
    // DPM-Solver++ (data prediction, midpoint form), Lu et al. 2022; diffusers' orders.
    const int64_t order = m == Method::DPMPP3M ? 3 : 2;
    const bool sde = m == Method::DPMPP2M_SDE;
    const bool lower_second = k == n - 2 && n < 15;
    const int64_t q = (k < 1 || last) ? 1 : (order == 2 || k < 2 || lower_second) ? 2 : 3;
    if (last) {
      p[0] = 1;
    } else {
      const double h = lam(k + 1) - lam(k), a = alpha(k + 1), st = sigma(k + 1);
      // First-order part: x_next = px x + w m (+ pn noise); the D1 / D2 terms add to m, h1, h2.
      double w, d1, d2 = 0;
      if (sde) {
        px = st / sigma(k) * std::exp(-h);
        w = a * -std::expm1(-2 * h);
        d1 = 0.5 * w;
        pn = st * std::sqrt(-std::expm1(-2 * h));
      } else {
        px = st / sigma(k);
        w = -a * std::expm1(-h);
        d1 = q == 3 ? a * (std::expm1(-h) / h + 1) : 0.5 * w;
        d2 = -a * ((std::expm1(-h) + h) / (h * h) - 0.5);
      }
      p[0] = w;
      if (q == 2) {  // D1 = (m - h1) / r0
        const double r0 = (lam(k) - lam(k - 1)) / h;
        p[0] += d1 / r0;
        p[1] -= d1 / r0;
      } else if (q == 3) {  // D1 = D1_0 + r0/(r0+r1) (D1_0 - D1_1), D2 = (D1_0 - D1_1)/(r0+r1)
        const double r0 = (lam(k) - lam(k - 1)) / h, r1 = (lam(k - 1) - lam(k - 2)) / h;
        const double on_d10 = d1 * (1 + r0 / (r0 + r1)) + d2 / (r0 + r1);
        const double on_d11 = -d1 * r0 / (r0 + r1) - d2 / (r0 + r1);
        p[0] += on_d10 / r0;  // D1_0 = (m - h1) / r0, D1_1 = (h1 - h2) / r1
        p[1] += -on_d10 / r0 + on_d11 / r1;
        p[2] -= on_d11 / r1;
      }
    }
  }
  r[kCx] = static_cast<float>(cx);
  r[kCl] = static_cast<float>(cl);
  for (int j = 0; j < 4; ++j) r[kC0 + j] = static_cast<float>(c[j]);
  r[kPx] = static_cast<float>(px);
  for (int j = 0; j < 3; ++j) r[kP0 + j] = static_cast<float>(p[j]);
  r[kPn] = static_cast<float>(pn);
  r[kNoiseGate] = pn != 0 ? 1.0f : 0.0f;
}

// Rows in loop order: row k is step index i = N - 1 - k.
std::vector<float> coefficient_rows(const Schedule& s, const SamplerParams& p) {
  const int64_t n = s.num_steps;
  std::vector<float> rows(n * kNumCoefs, 0.0f);
  const float eta = static_cast<float>(p.eta);
  const bool small = p.variance == Variance::FixedSmall;
  for (int64_t k = 0; k < n; ++k) {
    const int64_t i = n - 1 - k;
    float* r = rows.data() + k * kNumCoefs;
    const float nonzero = i > 0 ? 1.0f : 0.0f;
    r[kSqrtRecipAc] = static_cast<float>(s.sqrt_recip_alphas_cumprod[i]);
    r[kSqrtRecipm1Ac] = static_cast<float>(s.sqrt_recipm1_alphas_cumprod[i]);
    r[kPostCoef1] = static_cast<float>(s.posterior_mean_coef1[i]);
    r[kPostCoef2] = static_cast<float>(s.posterior_mean_coef2[i]);
    r[kMinLog] = static_cast<float>(s.posterior_log_variance_clipped[i]);
    r[kMaxLog] = static_cast<float>(s.log_betas[i]);
    r[kFixedVar] = static_cast<float>(small ? s.posterior_variance[i] : s.fixed_large_variance[i]);
    r[kNonzero] = nonzero;
    const float ab = static_cast<float>(s.alphas_cumprod[i]);
    const float abp = static_cast<float>(s.alphas_cumprod_prev[i]);
    r[kSqrt1mAc] = std::sqrt(1.0f - ab);
    const float sigma = eta * std::sqrt((1.0f - abp) / (1.0f - ab)) * std::sqrt(1.0f - ab / abp);
    r[kDdimSqrtAcp] = std::sqrt(abp);
    r[kDdimDir] = std::sqrt(1.0f - abp - sigma * sigma);
    if (p.method == Method::DDIM) {
      r[kNoiseStd] = nonzero * sigma;
    } else {
      const float log_var = static_cast<float>(small ? s.posterior_log_variance_clipped[i]
                                                     : s.fixed_large_log_variance[i]);
      r[kNoiseStd] = nonzero * std::exp(0.5f * log_var);
    }
    const bool learned = p.method == Method::DDPM && p.variance == Variance::LearnedRange;
    r[kNoiseGate] = (learned ? nonzero : r[kNoiseStd]) != 0.0f ? 1.0f : 0.0f;
  }
  if (is_solver(p.method)) {
    std::vector<double> abar(n + 1);
    for (int64_t k = 0; k < n; ++k) abar[k] = s.alphas_cumprod[n - 1 - k];
    abar[n] = s.alphas_cumprod_prev[0];  // 1: the respaced process ends on clean data
    for (int64_t k = 0; k < n; ++k) solver_coefficients(p.method, abar, k, rows.data() + k * kNumCoefs);
  }
  return rows;
}

uint64_t splitmix64(uint64_t z) {
  z += 0x9E3779B97F4A7C15ULL;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

std::string shape_str(at::IntArrayRef s) { return cat(s); }

}  // namespace

// ---------------------------------------------------------------------------------------------

SamplerParams default_params() { return SamplerParams{}; }

uint64_t derive_seed(uint64_t seed, uint64_t stream) {
  return splitmix64(splitmix64(seed) ^ (stream * 0xD1B54A32D192ED03ULL));
}

Schedule Schedule::from_tables(const std::map<std::string, at::Tensor>& tables, int64_t original_num_steps,
                               bool rescale_timesteps) {
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

// ---------------------------------------------------------------------------------------------
// CUDA: a side stream for the loop (capture needs a non-default stream) and the captured steps.

#ifdef ADMRT_WITH_CUDA
struct Sampler::Graph {
  explicit Graph(at::Device device) : stream(c10::cuda::getStreamFromPool(false, device.index())) {}
  // Nothing queued on the side stream may outlive the buffers and the graph's pool.
  ~Graph() {
    try {
      stream.synchronize();
    } catch (...) {
    }
  }
  c10::cuda::CUDAStream stream;
  // One graph per (slots run, with the classifier): without / with it under a guidance interval,
  // and per power-of-two bucket of slots under step batching.
  std::map<std::pair<int64_t, bool>, std::unique_ptr<at::cuda::CUDAGraph>> steps;
  std::set<std::pair<int64_t, bool>> warmed;  // its eager warm-up step has run
  std::string capture_error;  // set once a capture failed: not tried again
};

namespace {

// Makes `caller` wait for everything queued on `side` when it goes out of scope, on every exit
// path (an exception from a step or from the progress callback included).
class JoinStreams {
 public:
  JoinStreams(c10::cuda::CUDAStream caller, c10::cuda::CUDAStream side) : caller_(caller), side_(side) {}
  ~JoinStreams() {
    try {
      at::cuda::CUDAEvent done;
      done.record(side_);
      done.block(caller_);
    } catch (...) {
      try {
        side_.synchronize();
      } catch (...) {
      }
    }
  }

 private:
  c10::cuda::CUDAStream caller_, side_;
};

// Runs the scope's work on the context's own stream, after what the caller queued; the caller's
// stream waits for it on every way out (join declared first: it runs after the guard has restored
// the caller's stream). No-op without a side stream.
struct LoopStream {
  LoopStream(c10::cuda::CUDAStream* side, at::Device device) {
    if (side == nullptr) return;
    c10::cuda::CUDAStream caller = c10::cuda::getCurrentCUDAStream(device.index());
    at::cuda::CUDAEvent ready;
    ready.record(caller);
    ready.block(*side);
    join.emplace(caller, *side);
    on_side.emplace(*side);
  }
  std::optional<JoinStreams> join;
  std::optional<c10::cuda::CUDAStreamGuard> on_side;
};

}  // namespace
#define ADMRT_ON_LOOP_STREAM LoopStream on_loop_stream(graph_ ? &graph_->stream : nullptr, params_.device)
#else
struct Sampler::Graph {};
#define ADMRT_ON_LOOP_STREAM
#endif

// The buffers' first m slots.
struct Sampler::Views {
  Views(const Sampler& s, int64_t m) : m(m) {
    auto v = [m](const at::Tensor& t) { return t.defined() ? t.narrow(0, 0, m) : t; };
    x = v(s.x_), y = v(s.y_), low_res = v(s.low_res_), scale = v(s.scale_), seeds = v(s.seeds_), t = v(s.t_);
    noise = v(s.noise_), step = v(s.step_), draw = v(s.draw_), active = v(s.active_), bad = v(s.bad_);
    last_sample = v(s.last_sample_);
    for (const at::Tensor& h : s.history_) history.push_back(v(h));
  }
  int64_t m;
  at::Tensor x, y, low_res, scale, seeds, t, noise, step, draw, active, bad, last_sample;
  std::vector<at::Tensor> history;
};

Sampler::Sampler(std::shared_ptr<Denoiser> model, std::shared_ptr<ClassifierGrad> classifier,
                 const std::vector<Schedule>& schedules, const SamplerParams& params)
    : model_(std::move(model)), classifier_(std::move(classifier)), params_(params) {
  if (!model_) throw std::invalid_argument("model: expected a Denoiser, got none");
  const auto& p = params_;
  if (p.batch_size <= 0) throw std::invalid_argument(cat("batch_size=", p.batch_size, ": expected a positive int"));
  if (p.image_shape.size() != 3 || p.image_shape[0] <= 0 || p.image_shape[1] <= 0 || p.image_shape[2] <= 0)
    throw std::invalid_argument(cat("image_shape=", shape_str(p.image_shape), ": expected (C, H, W), all positive"));
  if (!p.low_res_shape.empty() && p.low_res_shape.size() != 3)
    throw std::invalid_argument(cat("low_res_shape=", shape_str(p.low_res_shape), ": expected (C, h, w) or empty"));
  if (!(p.eta >= 0) || !std::isfinite(p.eta))
    throw std::invalid_argument(cat("eta=", p.eta, ": expected a finite eta >= 0"));
  if (schedules.empty()) throw std::invalid_argument("schedules: expected at least one step plan's schedule");
  for (const Schedule& schedule : schedules)
    if (schedule.num_steps <= 0) throw std::invalid_argument("schedule: no steps");
  if (!(p.device.is_cpu() || p.device.is_cuda()))
    throw std::invalid_argument(cat("device=", p.device, ": expected cpu or cuda"));
#ifndef ADMRT_WITH_CUDA
  if (p.device.is_cuda())
    throw std::invalid_argument("device=cuda: this admrt core was built without CUDA (rebuild it against a CUDA "
                                "build of torch with nvcc on the PATH)");
#endif
  if (!(p.dynamic_threshold >= 0 && p.dynamic_threshold < 1))
    throw std::invalid_argument(cat("dynamic_threshold=", p.dynamic_threshold, ": expected a percentile in (0, 1), or 0 (off)"));
  if (p.guidance_every < 1)
    throw std::invalid_argument(cat("guidance_every=", p.guidance_every, ": expected a positive int"));
  // Solvers draw only for the SDE variant (also under reference noise: guided-diffusion has no
  // draw order for them); DDPM and DDIM draw as the reference does.
  has_noise_ = is_solver(p.method) ? p.method == Method::DPMPP2M_SDE
                                   : !(p.noise == NoiseMode::Seeded && p.method == Method::DDIM && p.eta == 0.0);

  // The plans' rows, one after the other.
  std::vector<float> rows, t_rows;
  for (const Schedule& schedule : schedules) {
    const int64_t n = schedule.num_steps;
    plan_offset_.push_back(static_cast<int64_t>(t_rows.size()));
    plan_steps_.push_back(n);
    std::vector<float> plan_rows = coefficient_rows(schedule, p);
    for (int64_t k = 0; k < n; ++k) {
      const int64_t t = schedule.timestep_map[n - 1 - k];
      model_t_.push_back(t);
      const bool guide = classifier_ && t >= p.guidance_t_min && (p.guidance_t_max < 0 || t <= p.guidance_t_max) &&
                         k % p.guidance_every == 0;
      guided_rows_.push_back(guide);
      plan_rows[k * kNumCoefs + kGuide] = guide ? 1.0f : 0.0f;
      // _WrappedModel: the original timestep, or t * 1000 / T as float when rescaled.
      t_rows.push_back(schedule.rescale_timesteps
                           ? static_cast<float>(t) * static_cast<float>(1000.0 / schedule.original_num_steps)
                           : static_cast<float>(t));
    }
    rows.insert(rows.end(), plan_rows.begin(), plan_rows.end());
  }
  const int64_t R = static_cast<int64_t>(t_rows.size()), B = p.batch_size;
  const auto f32 = at::TensorOptions().dtype(at::kFloat).device(p.device);
  const auto i64 = at::TensorOptions().dtype(at::kLong).device(p.device);
  coef_ = at::from_blob(rows.data(), {R, kNumCoefs}, at::kFloat).to(p.device, /*non_blocking=*/false, /*copy=*/true);
  t_table_ = at::from_blob(t_rows.data(), {R}, at::kFloat).to(p.device, false, true);
  step_ = at::zeros({B}, i64);
  draw_ = at::zeros({B}, i64);
  active_ = at::zeros({B}, at::TensorOptions().dtype(at::kBool).device(p.device));
  std::vector<int64_t> shape{B};
  shape.insert(shape.end(), p.image_shape.begin(), p.image_shape.end());
  x_ = at::zeros(shape, f32);
  noise_ = at::zeros(shape, f32);
  y_ = at::zeros({B}, i64);
  t_ = at::zeros({B}, f32);
  scale_ = at::zeros({B, 1, 1, 1}, f32);
  seeds_ = at::zeros({B}, i64);
  bad_ = at::full({B, 3}, -1, i64);  // per slot, first non-finite step: model output, gradient; final sample
  for (int64_t j = 0; j < history_depth(p.method); ++j) history_.push_back(at::zeros(shape, f32));
  if (p.method == Method::UNIPC2M || p.method == Method::UNIPC3M) last_sample_ = at::zeros(shape, f32);
  if (!p.low_res_shape.empty()) {
    std::vector<int64_t> ls{B};
    ls.insert(ls.end(), p.low_res_shape.begin(), p.low_res_shape.end());
    low_res_ = at::zeros(ls, f32);
  }
  slot_plan_.assign(B, -1);
  slot_row_.assign(B, 0);
  slot_scale_.assign(B, 0.0);
#ifdef ADMRT_WITH_CUDA
  if (uses_graph()) graph_ = std::make_unique<Graph>(p.device);
#endif
}

Sampler::~Sampler() = default;

bool Sampler::uses_graph() const {
  return params_.device.is_cuda() && params_.cuda_graphs && params_.noise == NoiseMode::Seeded;
}

bool Sampler::captured() const {
#ifdef ADMRT_WITH_CUDA
  return graph_ && !graph_->steps.empty();
#else
  return false;
#endif
}

void Sampler::load_inputs(const BatchInputs& in) {
  const int64_t B = params_.batch_size;
  auto batch_of = [&](const std::optional<at::Tensor>& t, const char* name, at::Tensor& dst,
                      const std::vector<int64_t>& expect) {
    if (!t) return false;
    std::vector<int64_t> want{B};
    want.insert(want.end(), expect.begin(), expect.end());
    if (t->sizes() != at::IntArrayRef(want))
      throw std::invalid_argument(cat(name, ": expected shape ", shape_str(want), " (batch_size=", B, "), got ",
                                      t->sizes()));
    dst.copy_(t->reshape(dst.sizes()));
    return true;
  };
  if (!batch_of(in.y, "y", y_, {})) y_.zero_();
  if (params_.low_res_shape.empty()) {
    if (in.low_res) throw std::invalid_argument("low_res: this context has no low_res_shape (not an upsampler)");
  } else if (!batch_of(in.low_res, "low_res", low_res_, params_.low_res_shape)) {
    throw std::invalid_argument(cat("low_res: expected shape (", B, ", ", shape_str(params_.low_res_shape),
                                    ") for this upsampler, got none"));
  }
  if (guided()) {
    if (!batch_of(in.guidance, "guidance", scale_, {}))
      throw std::invalid_argument(cat("guidance: expected ", B, " scales (one per sample) for a guided context"));
  } else if (in.guidance) {
    throw std::invalid_argument("guidance: this context has no classifier; pass one, or no scales");
  }
  if (params_.noise == NoiseMode::Seeded) {
    if (!batch_of(in.seeds, "seeds", seeds_, {}))
      throw std::invalid_argument(cat("seeds: expected ", B, " (one per sample) for seeded noise, got none"));
  }
  if (in.x_T) {
    std::vector<int64_t> want{B};
    want.insert(want.end(), params_.image_shape.begin(), params_.image_shape.end());
    if (in.x_T->sizes() != at::IntArrayRef(want))
      throw std::invalid_argument(cat("x_T: expected shape ", shape_str(want), ", got ", in.x_T->sizes()));
  }
}

// x_0 as the loop uses it: Imagen's dynamic thresholding (Saharia et al. 2022: s = max(1, the
// percentile of |x_0| per image), clamp to [-s, s], divide by s), else the reference's clamp.
at::Tensor Sampler::denoised(const at::Tensor& x0) const {
  const auto& p = params_;
  if (p.dynamic_threshold > 0) {
    // The percentile as torch.quantile's linear interpolation, at positions fixed on the host
    // (no device-to-host read: capture-safe).
    at::Tensor flat = x0.reshape({x0.size(0), -1});
    const int64_t n = flat.size(1);
    const double pos = p.dynamic_threshold * static_cast<double>(n - 1);
    const int64_t lo = static_cast<int64_t>(std::floor(pos)), hi = std::min(lo + 1, n - 1);
    at::Tensor sorted = std::get<0>(flat.abs().sort(/*dim=*/1));
    at::Tensor a = sorted.narrow(1, lo, 1), b = sorted.narrow(1, hi, 1);
    at::Tensor s = (a + (b - a) * static_cast<float>(pos - static_cast<double>(lo))).clamp_min(1);
    return (at::minimum(at::maximum(flat, -s), s) / s).view(x0.sizes());
  }
  return p.clip_denoised ? x0.clamp(-1, 1) : x0;
}

// One step over the first m slots, each reading its coefficients and t by its own row index. A
// slot that is not active keeps its sample and row.
void Sampler::step(int64_t m, const std::optional<at::Generator>& generator, bool guide) {
  const auto& p = params_;
  const int64_t C = p.image_shape[0];
  const Views v(*this, m);
  at::Tensor row = coef_.index_select(0, v.step);                      // (m, K)
  auto c = [&](int64_t j) { return row.narrow(1, j, 1).reshape({m, 1, 1, 1}); };
  v.t.copy_(t_table_.index_select(0, v.step));                         // (m,)

  std::optional<at::Tensor> low_res;
  if (v.low_res.defined()) low_res = v.low_res;
  at::Tensor out = (*model_)(v.x, v.t, v.y, low_res);
  const bool learned = p.variance == Variance::LearnedRange;
  if (out.dim() != 4 || out.size(0) != m || out.size(2) != v.x.size(2) || out.size(3) != v.x.size(3) ||
      !(out.size(1) == 2 * C || (!learned && out.size(1) == C)))
    throw std::runtime_error(cat("model output: expected shape (", m, ", ", (learned ? 2 * C : C), ", ",
                                 v.x.size(2), ", ", v.x.size(3), ")", (learned ? " (eps and variance values)" : ""),
                                 ", got ", out.sizes()));
  out = out.to(at::kFloat);
  auto flag_bad = [&](int64_t j, const at::Tensor& t) {
    at::Tensor cur = v.bad.select(1, j);
    at::Tensor not_finite = at::isfinite(t).reshape({m, -1}).all(1).logical_not();
    cur.copy_(at::where(cur.lt(0).logical_and(not_finite).logical_and(v.active), v.draw, cur));
  };
  if (p.check_finite) flag_bad(0, out);
  at::Tensor pred = out.narrow(1, 0, C);

  // Guidance applies to the slots whose step is guided and whose scale is not zero; the others
  // take the unguided values exactly (as a run without the classifier).
  at::Tensor g, gmask;
  if (guide) {
    g = (*classifier_)(v.x, v.t, v.y);
    if (g.sizes() != v.x.sizes())
      throw std::runtime_error(cat("classifier gradient: expected shape ", v.x.sizes(), ", got ", g.sizes()));
    g = g.to(at::kFloat) * v.scale;
    if (p.check_finite) flag_bad(1, g);
    gmask = v.scale.ne(0).logical_and(c(kGuide).ne(0));
  }

  // The step's noise: drawn into noise unless its coefficient is zero (then noise keeps finite
  // values from before and is multiplied by 0).
  if (has_noise_) {
    if (p.noise == NoiseMode::Seeded) {
      at::Tensor noise = v.noise;
      seeded_normal_(noise, v.seeds, v.draw, /*draw_offset=*/1, row.narrow(1, kNoiseGate, 1).reshape({m}).contiguous());
    } else {
      v.noise.copy_(at::randn(v.x.sizes(), generator, v.x.options()));
    }
  }

  const at::Tensor& x = v.x;
  at::Tensor x_next;
  if (is_solver(p.method)) {
    // The guided eps (condition_score: eps - sqrt(1 - abar) g), its x_0, thresholded; then the
    // solver's linear update (coefficient_rows).
    at::Tensor eps = p.prediction == Prediction::XStart ? (x * c(kSqrtRecipAc) - pred) / c(kSqrtRecipm1Ac) : pred;
    if (guide) eps = at::where(gmask, eps - g * c(kSqrt1mAc), eps);
    at::Tensor m0 = denoised(x * c(kSqrtRecipAc) - eps * c(kSqrtRecipm1Ac));
    const int64_t depth = static_cast<int64_t>(v.history.size());
    at::Tensor xc = x;
    if (v.last_sample.defined()) {  // UniPC's corrector
      xc = x * c(kCx) + v.last_sample * c(kCl) + m0 * c(kC0);
      for (int64_t j = 0; j < depth; ++j) xc = xc + v.history[j] * c(kC1 + j);
      v.last_sample.copy_(xc);
    }
    x_next = xc * c(kPx) + m0 * c(kP0);
    for (int64_t j = 0; j < depth && j < 2; ++j) x_next = x_next + v.history[j] * c(kP1 + j);
    if (has_noise_) x_next = x_next + v.noise * c(kPn);
    for (int64_t j = depth - 1; j > 0; --j) v.history[j].copy_(v.history[j - 1]);
    if (depth > 0) v.history[0].copy_(m0);
  } else {
    // x_0 prediction (p_mean_variance: the output itself, or _predict_xstart_from_eps), clipped.
    at::Tensor x0 = denoised(p.prediction == Prediction::XStart ? pred : x * c(kSqrtRecipAc) - pred * c(kSqrtRecipm1Ac));
    if (p.method == Method::DDPM) {
      // p_sample: mean of q(x_{t-1} | x_t, x_0), variance Sigma_t.
      at::Tensor mean = x0 * c(kPostCoef1) + x * c(kPostCoef2);
      if (learned) {
        at::Tensor frac = (out.narrow(1, C, C) + 1) / 2;
        at::Tensor log_var = frac * c(kMaxLog) + (1 - frac) * c(kMinLog);
        if (guide) mean = at::where(gmask, mean + at::exp(log_var) * g, mean);  // condition_mean: mu + Sigma g
        x_next = mean + c(kNonzero) * at::exp(0.5 * log_var) * v.noise;
      } else {
        if (guide) mean = at::where(gmask, mean + g * c(kFixedVar), mean);
        x_next = mean + v.noise * c(kNoiseStd);
      }
    } else {
      // ddim_sample (eq. 12 of Song et al.), with condition_score guidance.
      if (guide) {
        at::Tensor e = (x * c(kSqrtRecipAc) - x0) / c(kSqrtRecipm1Ac);
        e = e - g * c(kSqrt1mAc);
        x0 = at::where(gmask, x * c(kSqrtRecipAc) - e * c(kSqrtRecipm1Ac), x0);  // not clipped again (as the reference)
      }
      at::Tensor e = (x * c(kSqrtRecipAc) - x0) / c(kSqrtRecipm1Ac);
      x_next = x0 * c(kDdimSqrtAcp) + e * c(kDdimDir);
      if (has_noise_) x_next = x_next + v.noise * c(kNoiseStd);
    }
  }
  v.x.copy_(at::where(v.active.view({m, 1, 1, 1}), x_next, x));
  v.step.add_(v.active);
  v.draw.add_(v.active);
}

void Sampler::run_step(int64_t m, bool guide, const std::optional<at::Generator>& generator) {
#ifdef ADMRT_WITH_CUDA
  if (uses_graph()) {
    // One graph per kind of step (with and without the classifier, under a guidance interval)
    // and per number of slots run, each captured after one eager warm-up step of its kind.
    const std::pair<int64_t, bool> key{m, guide};
    auto found = graph_->steps.find(key);
    if (found != graph_->steps.end()) {
      found->second->replay();
      return;
    }
    if (!graph_->capture_error.empty()) throw std::runtime_error(graph_->capture_error);
    if (!graph_->warmed.count(key)) {
      step(m, generator, guide);  // warm-up, eager: lazy initialisation, kernel compilation, autotuning
      graph_->warmed.insert(key);
      return;
    }
    const c10::DeviceIndex dev = params_.device.index();
    const auto pool = at::cuda::graph_pool_handle();
    auto g = std::make_unique<at::cuda::CUDAGraph>();
    g->capture_begin(pool);
    std::string error;
    try {
      step(m, generator, guide);
    } catch (const std::exception& e) {
      error = e.what();
    }
    try {
      g->capture_end();
    } catch (const std::exception& e) {
      if (error.empty()) error = e.what();
    }
    if (!error.empty()) {
      // An invalidated capture makes capture_end throw before the allocator leaves the graph's
      // pool: leave it here, or every later allocation would still be routed to it.
      try {
        c10::cuda::CUDACachingAllocator::endAllocateToPool(dev, pool);
      } catch (...) {
      }
      try {
        c10::cuda::CUDACachingAllocator::releasePool(dev, pool);
      } catch (...) {
      }
      graph_->capture_error = cat(
          "CUDA graph capture of the sampling step failed: ", error,
          "\nThe denoiser or classifier gradient does something a graph cannot hold (a host synchronisation, "
          "a copy from host memory, a CPU tensor); sample with cuda_graphs=False to run the steps uncaptured.");
      throw std::runtime_error(graph_->capture_error);
    }
    g->replay();
    graph_->steps[key] = std::move(g);
    return;
  }
#endif
  step(m, generator, guide);
}

void Sampler::raise_if_not_finite(const at::Tensor& bad, int64_t plan) const {
  at::Tensor flags = bad.to(at::kCPU).contiguous();  // the loop's one host synchronisation
  const int64_t* f = flags.data_ptr<int64_t>();
  const char* what[2] = {"model output", "classifier gradient"};
  int64_t first = -1, which = 0;
  bool sample_bad = false;
  for (int64_t b = 0; b < flags.size(0); ++b) {
    for (int64_t j = 0; j < 2; ++j)
      if (f[3 * b + j] >= 0 && (first < 0 || f[3 * b + j] < first)) first = f[3 * b + j], which = j;
    sample_bad = sample_bad || f[3 * b + 2] >= 0;
  }
  if (first >= 0)
    throw std::runtime_error(cat(what[which], " contains NaN or Inf at step index ", plan_steps_[plan] - 1 - first,
                                 " (timestep t=", model_t_[plan_offset_[plan] + first],
                                 "); check the weights, the dtype (fp16 overflow?) and the inputs"));
  if (sample_bad)
    throw std::runtime_error("sample contains NaN or Inf; check the weights, the dtype (fp16 overflow?) and the inputs");
}

at::Tensor Sampler::sample(const BatchInputs& inputs, const ProgressFn& progress) {
  c10::NoGradGuard no_grad;
  load_inputs(inputs);  // on the caller's stream, before the loop's stream takes over
  slots_stale_ = true;  // the slots' device state is this batch's now
  std::fill(slot_plan_.begin(), slot_plan_.end(), -1);
  const int64_t B = params_.batch_size;
  {
    ADMRT_ON_LOOP_STREAM;
    step_.zero_();
    draw_.zero_();
    active_.fill_(true);
    bad_.fill_(-1);
    for (at::Tensor& h : history_) h.zero_();  // read with weight 0 before they are written
    if (last_sample_.defined()) last_sample_.zero_();
    if (inputs.x_T) {
      x_.copy_(*inputs.x_T);
    } else if (params_.noise == NoiseMode::Seeded) {
      seeded_normal_(x_, seeds_, draw_, /*draw_offset=*/0);  // draw 0: x_T
    } else {
      x_.copy_(at::randn(x_.sizes(), inputs.generator, x_.options()));
    }
    for (int64_t k = 0; k < plan_steps_[0]; ++k) {
      run_step(B, guided_rows_[k], inputs.generator);
      if (progress) progress(k + 1, plan_steps_[0]);
    }
    if (params_.check_finite)
      bad_.select(1, 2).masked_fill_(at::isfinite(x_).reshape({B, -1}).all(1).logical_not(), 0);
  }
  if (params_.check_finite) raise_if_not_finite(bad_, 0);
  return x_.clone();
}

// ---------------------------------------------------------------------------------------------
// Step batching

void Sampler::check_slot(int64_t slot, const char* what) const {
  if (slot < 0 || slot >= params_.batch_size)
    throw std::invalid_argument(cat(what, ": slot=", slot, ": expected 0..", params_.batch_size - 1));
}

int64_t Sampler::occupied() const {
  return std::count_if(slot_plan_.begin(), slot_plan_.end(), [](int64_t p) { return p >= 0; });
}

void Sampler::enter(int64_t slot, const SlotInputs& in) {
  const auto& p = params_;
  check_slot(slot, "enter");
  if (p.noise != NoiseMode::Seeded)
    throw std::invalid_argument("noise='reference': step batching needs seeded noise (each image its own seeds)");
  if (slot_plan_[slot] >= 0) throw std::invalid_argument(cat("enter: slot ", slot, " is busy"));
  if (in.plan < 0 || in.plan >= num_plans())
    throw std::invalid_argument(cat("plan=", in.plan, ": expected 0..", num_plans() - 1));
  if (!std::isfinite(in.guidance)) throw std::invalid_argument(cat("guidance=", in.guidance, ": expected a finite scale"));
  if (in.guidance != 0 && !guided())
    throw std::invalid_argument("guidance: this context has no classifier; pass 0");
  if (p.low_res_shape.empty() != !in.low_res.has_value() ||
      (in.low_res && in.low_res->sizes() != at::IntArrayRef(p.low_res_shape)))
    throw std::invalid_argument(cat("low_res: expected ", p.low_res_shape.empty() ? std::string("none (not an upsampler)")
                                                                                 : "shape " + shape_str(p.low_res_shape),
                                    ", got ", in.low_res ? shape_str(in.low_res->sizes()) : std::string("none")));
  c10::NoGradGuard no_grad;
  ADMRT_ON_LOOP_STREAM;
  if (slots_stale_) {  // after sample(): every slot free, parked at row 0
    active_.fill_(false);
    step_.zero_();
    slots_stale_ = false;
  }
  const int64_t offset = plan_offset_[in.plan];
  auto one = [slot](const at::Tensor& t) { return t.narrow(0, slot, 1); };
  one(y_).fill_(in.label);
  one(scale_).fill_(in.guidance);
  one(seeds_).fill_(static_cast<int64_t>(in.seed));
  one(step_).fill_(offset);
  one(draw_).zero_();
  one(bad_).fill_(-1);
  for (at::Tensor& h : history_) one(h).zero_();
  if (last_sample_.defined()) one(last_sample_).zero_();
  if (in.low_res) one(low_res_).copy_(in.low_res->unsqueeze(0));
  at::Tensor x = one(x_);
  seeded_normal_(x, one(seeds_), one(draw_), /*draw_offset=*/0);  // draw 0: x_T
  one(active_).fill_(true);
  slot_plan_[slot] = in.plan;
  slot_row_[slot] = offset;
  slot_scale_[slot] = in.guidance;
}

std::vector<int64_t> Sampler::iterate() {
  std::vector<int64_t> done;
  int64_t highest = -1;
  bool guide = false;
  for (int64_t b = 0; b < params_.batch_size; ++b) {
    const int64_t plan = slot_plan_[b];
    if (plan < 0 || slot_row_[b] == plan_offset_[plan] + plan_steps_[plan]) continue;  // free or done
    highest = b;
    guide = guide || (guided_rows_[slot_row_[b]] && slot_scale_[b] != 0);
  }
  if (highest < 0) return done;
  // The slots run: up to the highest occupied one; captured, a power-of-two bucket (few shapes,
  // one graph each).
  int64_t m = highest + 1;
  if (uses_graph()) {
    m = 1;
    while (m < highest + 1) m *= 2;
    m = std::min(m, params_.batch_size);
  }
  c10::NoGradGuard no_grad;
  ADMRT_ON_LOOP_STREAM;
  run_step(m, guide, std::nullopt);
  for (int64_t b = 0; b < m; ++b) {
    const int64_t plan = slot_plan_[b];
    if (plan < 0 || slot_row_[b] == plan_offset_[plan] + plan_steps_[plan]) continue;
    if (++slot_row_[b] == plan_offset_[plan] + plan_steps_[plan]) {
      done.push_back(b);
      // Done: it keeps its sample, parked on a valid row until take().
      auto one = [b](const at::Tensor& t) { return t.narrow(0, b, 1); };
      one(active_).fill_(false);
      one(step_).fill_(plan_offset_[plan]);
    }
  }
  return done;
}

void Sampler::free_slot(int64_t slot) {
  slot_plan_[slot] = -1;
  active_.narrow(0, slot, 1).fill_(false);
  step_.narrow(0, slot, 1).zero_();
}

at::Tensor Sampler::take(int64_t slot) {
  check_slot(slot, "take");
  const int64_t plan = slot_plan_[slot];
  if (plan < 0 || slot_row_[slot] != plan_offset_[plan] + plan_steps_[plan])
    throw std::invalid_argument(cat("take: slot ", slot, plan < 0 ? " is free" : " is not done"));
  c10::NoGradGuard no_grad;
  at::Tensor x, flags;
  {
    ADMRT_ON_LOOP_STREAM;
    x = x_.narrow(0, slot, 1).clone();
    flags = bad_.narrow(0, slot, 1).clone();
    if (params_.check_finite) flags.select(1, 2).masked_fill_(at::isfinite(x).all().logical_not(), 0);
    free_slot(slot);
  }
  if (params_.check_finite) raise_if_not_finite(flags, plan);
  return x.squeeze(0);
}

void Sampler::move(int64_t from, int64_t to) {
  check_slot(from, "move");
  check_slot(to, "move");
  if (slot_plan_[from] < 0) throw std::invalid_argument(cat("move: slot ", from, " is free"));
  if (slot_plan_[to] >= 0) throw std::invalid_argument(cat("move: slot ", to, " is busy"));
  c10::NoGradGuard no_grad;
  ADMRT_ON_LOOP_STREAM;
  auto copy = [&](const at::Tensor& t) {
    if (t.defined()) t.narrow(0, to, 1).copy_(t.narrow(0, from, 1));
  };
  for (const at::Tensor* t : {&x_, &y_, &low_res_, &scale_, &seeds_, &noise_, &step_, &draw_, &active_, &bad_,
                              &last_sample_})
    copy(*t);
  for (const at::Tensor& h : history_) copy(h);
  slot_plan_[to] = slot_plan_[from];
  slot_row_[to] = slot_row_[from];
  slot_scale_[to] = slot_scale_[from];
  free_slot(from);
}

void Sampler::release(int64_t slot) {
  check_slot(slot, "release");
  if (slot_plan_[slot] < 0) return;
  c10::NoGradGuard no_grad;
  ADMRT_ON_LOOP_STREAM;
  free_slot(slot);
}

at::Tensor to_uint8_nhwc(const at::Tensor& x) {
  if (x.dim() != 4) throw std::invalid_argument(cat("x: expected (B, C, H, W), got ", x.sizes()));
  return ((x.to(at::kFloat) + 1) * 127.5).clamp(0, 255).to(at::kByte).permute({0, 2, 3, 1}).contiguous();
}

}  // namespace admrt
