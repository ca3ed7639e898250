// Step batching (admrt.h, StepBatcher): the queue, the slot pools of both stages of a cascade,
// admission at step boundaries, harvest, cancellation. The step itself is the Sampler's.
#include <algorithm>
#include <stdexcept>

#include "admrt.h"
#include "text.h"

namespace admrt {

// One request: its validated arguments and what it has produced so far.
struct StepBatcher::Job {
  Context::Request req;
  int64_t plan = 0;
  int64_t images_done = 0, steps_done = 0, steps = 0;
  std::vector<at::Tensor> images, base_images;  // per image, uint8 (1, H, W, C) once done
  std::string error;
  bool cancelled = false, finished = false;
};

// A stage's slots: the Sampler and which (job, image) each slot holds.
struct StepBatcher::Pool {
  std::unique_ptr<Sampler> sampler;
  std::vector<std::pair<int64_t, int64_t>> held;   // per slot: (job id, image), job id 0: free
  std::deque<std::pair<int64_t, int64_t>> queue;   // (job id, image) waiting for a slot
  int64_t occupied() const {
    return std::count_if(held.begin(), held.end(), [](const auto& h) { return h.first != 0; });
  }
};

StepBatcher::StepBatcher(std::shared_ptr<Stack> stack, ContextParams params, const std::vector<std::string>& plans,
                         bool step_batching)
    : context_(stack, [&] {
        if (!plans.empty()) params.steps = plans.front();
        return params;
      }()),
      step_batching_(step_batching) {
  if (context_.noise_ != NoiseMode::Seeded)
    throw std::invalid_argument(cat("noise='", context_.params().noise,
                                    "': step batching needs seeded noise (each image its own seeds)"));
  const Stack& st = context_.stack();
  std::vector<Schedule> schedules{context_.base_schedule_};
  plans_.push_back(context_.plan().str());
  for (size_t i = 1; i < plans.size(); ++i) {
    StepPlan plan = StepPlan::parse(plans[i], "steps");
    if (!context_.params().method.empty()) plan = plan.with_method(parse_method(context_.params().method));
    if (plan.method() != context_.plan().method())
      throw std::invalid_argument(cat("steps='", plans[i], "': runs ", plan.method_name(), ", but '", plans_[0],
                                      "' runs ", context_.plan().method_name(),
                                      "; the plans served together share one method (their slots share one step)"));
    if (std::find(plans_.begin(), plans_.end(), plan.str()) != plans_.end()) continue;
    plans_.push_back(plan.str());
    schedules.push_back(st.base().schedule(plan));
  }
  const int64_t slots = context_.params().batch_size;
  std::shared_ptr<ClassifierGrad> grad = st.classifier() ? st.classifier()->gradient : nullptr;
  base_ = std::make_unique<Pool>();
  base_->sampler = std::make_unique<Sampler>(st.base().denoiser, grad, schedules,
                                             context_.sampler_params(st.base(), slots));
  base_->held.assign(slots, {0, 0});
  const int64_t up_steps = st.upsampler() ? context_.up_schedule_.num_steps : 0;
  for (const Schedule& s : schedules) plan_steps_.push_back(s.num_steps + up_steps);
  if (const Stage* up = st.upsampler()) {
    up_ = std::make_unique<Pool>();
    up_->sampler = std::make_unique<Sampler>(up->denoiser, nullptr, std::vector<Schedule>{context_.up_schedule_},
                                             context_.sampler_params(*up, slots));
    up_->held.assign(slots, {0, 0});
  }
}

StepBatcher::~StepBatcher() = default;

int64_t StepBatcher::submit(const std::vector<int64_t>& classes, const std::vector<double>& guidance,
                            const std::vector<uint64_t>& seeds, std::optional<int64_t> num, const std::string& plan) {
  int64_t plan_index = 0;
  if (!plan.empty()) {
    StepPlan parsed = StepPlan::parse(plan, "steps");
    if (!context_.params().method.empty()) parsed = parsed.with_method(parse_method(context_.params().method));
    auto it = std::find(plans_.begin(), plans_.end(), parsed.str());
    if (it == plans_.end()) {
      std::string names;
      for (const std::string& p : plans_) names += (names.empty() ? "'" : ", '") + p + "'";
      throw std::invalid_argument(cat("steps='", plan, "': this server runs (", names, ")"));
    }
    plan_index = it - plans_.begin();
  }
  auto job = std::make_unique<Job>();
  job->req = context_.request(classes, guidance, seeds, num);
  job->plan = plan_index;
  const int64_t n = job->req.n;
  job->steps = n * plan_steps_[plan_index];
  job->images.resize(n);
  if (up_) job->base_images.resize(n);
  std::lock_guard<std::mutex> lock(mutex_);
  const int64_t id = next_id_++;
  for (int64_t i = 0; i < n; ++i) base_->queue.emplace_back(id, i);
  jobs_[id] = std::move(job);
  return id;
}

void StepBatcher::cancel(int64_t id) {
  std::lock_guard<std::mutex> lock(mutex_);
  auto it = jobs_.find(id);
  if (it != jobs_.end() && !it->second->finished) it->second->cancelled = true;
}

bool StepBatcher::busy() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return !base_->queue.empty() || base_->occupied() > 0 || (up_ && (!up_->queue.empty() || up_->occupied() > 0));
}

void StepBatcher::finish_if_complete(int64_t id, Job& job, std::vector<int64_t>& finished) {
  if (!job.finished && (job.cancelled || !job.error.empty() || job.images_done == job.req.n)) {
    job.finished = true;
    finished.push_back(id);
  }
}

void StepBatcher::compact(Pool& pool) {
  int64_t low = 0, high = static_cast<int64_t>(pool.held.size()) - 1;
  while (true) {
    while (low < high && pool.held[low].first != 0) ++low;
    while (high > low && pool.held[high].first == 0) --high;
    if (low >= high) return;
    pool.sampler->move(high, low);
    pool.held[low] = pool.held[high];
    pool.held[high] = {0, 0};
  }
}

void StepBatcher::admit(Pool& pool, bool upsampler) {
  Sampler& s = *pool.sampler;
  compact(pool);
  for (int64_t slot = 0; slot < static_cast<int64_t>(pool.held.size()) && !pool.queue.empty(); ++slot) {
    if (pool.held[slot].first != 0) continue;
    const auto [id, i] = pool.queue.front();
    pool.queue.pop_front();
    Job& job = *jobs_.at(id);
    SlotInputs in;
    in.plan = upsampler ? 0 : job.plan;
    in.label = job.req.labels.empty() ? 0 : job.req.labels[i];
    in.guidance = (upsampler || !job.req.guided) ? 0.0 : job.req.scales[i];
    in.seed = upsampler ? derive_seed(job.req.seeds[i], kUpsamplerStream) : job.req.seeds[i];
    if (upsampler)  // ADM-U is conditioned on the saved low-res sample (uint8 -> [-1, 1])
      in.low_res = job.base_images[i].squeeze(0).permute({2, 0, 1}).to(s.params().device, at::kFloat) / 127.5 - 1;
    s.enter(slot, in);
    pool.held[slot] = {id, i};
  }
}

void StepBatcher::harvest(Pool& pool, const std::vector<int64_t>& done, bool upsampler) {
  for (int64_t slot : done) {
    const auto [id, i] = pool.held[slot];
    pool.held[slot] = {0, 0};
    Job& job = *jobs_.at(id);
    at::Tensor img;
    try {
      img = to_uint8_nhwc(pool.sampler->take(slot).unsqueeze(0)).cpu();
    } catch (const std::exception& e) {
      if (job.error.empty()) job.error = e.what();
      continue;
    }
    if (up_ && !upsampler) {
      job.base_images[i] = img;
      up_->queue.emplace_back(id, i);
    } else {
      job.images[i] = img;
      ++job.images_done;
    }
  }
}

void StepBatcher::fail_pool(Pool& pool, const std::string& error) {
  for (int64_t slot = 0; slot < static_cast<int64_t>(pool.held.size()); ++slot) {
    const int64_t id = pool.held[slot].first;
    if (id == 0) continue;
    Job& job = *jobs_.at(id);
    if (job.error.empty()) job.error = error;
    pool.sampler->release(slot);
    pool.held[slot] = {0, 0};
  }
}

void StepBatcher::drop_gone(const std::vector<Pool*>& pools) {
  // Cancelled or failed requests leave the queues and their slots (before they count as finished
  // and can be taken).
  auto gone = [&](const std::pair<int64_t, int64_t>& h) {
    const Job& job = *jobs_.at(h.first);
    return job.cancelled || !job.error.empty();
  };
  for (Pool* pool : pools) {
    pool->queue.erase(std::remove_if(pool->queue.begin(), pool->queue.end(), gone), pool->queue.end());
    for (int64_t slot = 0; slot < static_cast<int64_t>(pool->held.size()); ++slot)
      if (pool->held[slot].first != 0 && gone(pool->held[slot])) {
        pool->sampler->release(slot);
        pool->held[slot] = {0, 0};
      }
  }
}

std::vector<int64_t> StepBatcher::iterate() {
  std::vector<int64_t> finished;
  std::vector<Pool*> pools{base_.get()};
  if (up_) pools.push_back(up_.get());
  {
    std::lock_guard<std::mutex> lock(mutex_);
    drop_gone(pools);
    for (auto& [id, job] : jobs_) finish_if_complete(id, *job, finished);
    // Admission: step batching fills free slots at every step boundary; static batching admits a
    // new batch only when the pipeline is empty, and moves it to the upsampler as a whole.
    const bool up_idle = !up_ || (up_->occupied() == 0 && up_->queue.empty());
    if (step_batching_ || (base_->occupied() == 0 && up_idle)) admit(*base_, false);
    if (up_ && (step_batching_ || (base_->occupied() == 0 && up_->occupied() == 0))) admit(*up_, true);
    for (Pool* pool : pools)
      for (const auto& h : pool->held)
        if (h.first != 0) ++jobs_.at(h.first)->steps_done;
    update_stats();
  }
  // The steps, outside the lock (submit and cancel go on meanwhile).
  std::vector<std::vector<int64_t>> done(pools.size());
  std::vector<std::string> errors(pools.size());
  for (size_t p = 0; p < pools.size(); ++p) {
    try {
      done[p] = pools[p]->sampler->iterate();
    } catch (const std::exception& e) {
      errors[p] = e.what();
    }
  }
  std::lock_guard<std::mutex> lock(mutex_);
  for (size_t p = 0; p < pools.size(); ++p) {
    if (!errors[p].empty()) fail_pool(*pools[p], errors[p]);
    else harvest(*pools[p], done[p], p == 1);
  }
  drop_gone(pools);
  for (auto& [id, job] : jobs_) finish_if_complete(id, *job, finished);
  ++stats_.iterations;
  update_stats();
  return finished;
}

Result StepBatcher::take(int64_t id) {
  std::lock_guard<std::mutex> lock(mutex_);
  auto it = jobs_.find(id);
  if (it == jobs_.end()) throw std::invalid_argument(cat("request ", id, ": unknown or already taken"));
  if (!it->second->finished) throw std::invalid_argument(cat("request ", id, ": not finished"));
  std::unique_ptr<Job> job = std::move(it->second);
  jobs_.erase(it);
  stats_.requests = static_cast<int64_t>(jobs_.size());
  if (!job->error.empty()) throw std::runtime_error(job->error);
  if (job->cancelled) throw Cancelled();
  Result r;
  r.images = at::cat(job->images);
  if (!job->req.labels.empty()) r.labels = at::tensor(job->req.labels, at::kLong);
  if (up_) r.base_images = at::cat(job->base_images);
  r.seeds = job->req.seeds;
  return r;
}

StepBatcher::Progress StepBatcher::progress(int64_t id) const {
  std::lock_guard<std::mutex> lock(mutex_);
  auto it = jobs_.find(id);
  if (it == jobs_.end()) throw std::invalid_argument(cat("request ", id, ": unknown or already taken"));
  const Job& job = *it->second;
  return Progress{job.req.n, job.images_done, job.steps, job.steps_done, job.finished};
}

StepBatcher::Stats StepBatcher::stats() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return stats_;
}

void StepBatcher::update_stats() {
  stats_.queued_images = static_cast<int64_t>(base_->queue.size());
  stats_.base_slots = base_->occupied();
  stats_.upsampler_slots = up_ ? up_->occupied() : 0;
  stats_.base_steps.clear();
  for (int64_t slot = 0; slot < static_cast<int64_t>(base_->held.size()); ++slot)
    if (base_->held[slot].first != 0) stats_.base_steps.push_back(base_->sampler->slot_step(slot));
  stats_.requests = static_cast<int64_t>(jobs_.size());
}

}  // namespace admrt
