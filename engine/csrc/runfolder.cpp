#include "runfolder.h"

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <cstdio>
#include <ctime>
#include <exception>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <set>

#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include "npz.h"
#include "text.h"

namespace admrt {

namespace fs = std::filesystem;

namespace {

constexpr const char* kRecord = "run.json";
constexpr const char* kLock = ".lock";

// A string as Python's repr() writes it: 'text' (or "it's"), with backslash escapes.
std::string py_repr(const std::string& s) {
  const char q = (s.find('\'') != std::string::npos && s.find('"') == std::string::npos) ? '"' : '\'';
  std::string out(1, q);
  for (unsigned char c : s) {
    if (c == q || c == '\\') {
      out += '\\';
      out += static_cast<char>(c);
    } else if (c == '\n') {
      out += "\\n";
    } else if (c == '\r') {
      out += "\\r";
    } else if (c == '\t') {
      out += "\\t";
    } else if (c < 0x20 || c == 0x7F) {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\x%02x", c);
      out += buf;
    } else {
      out += static_cast<char>(c);
    }
  }
  return out + q;
}

// A recorded value as the refusal shows it: strings as Python's repr, the rest as JSON; at most
// 60 characters.
std::string show(const json::Value* v) {
  std::string text;
  if (v == nullptr || v->is_null()) {
    text = "null";
  } else if (v->type == json::Value::Type::String) {
    text = py_repr(v->string);
  } else {
    try {
      text = json::dump(*v);
    } catch (const std::invalid_argument&) {  // a non-finite number, as Python's json.dumps shows it
      text = v->number != v->number ? "NaN" : v->number > 0 ? "Infinity" : "-Infinity";
    }
  }
  if (text.size() <= 60) return text;
  size_t cut = 57;
  while (cut > 0 && (static_cast<unsigned char>(text[cut]) & 0xC0) == 0x80) --cut;  // a UTF-8 boundary
  return text.substr(0, cut) + "...";
}

// OUT as Python's str(Path(out)) writes it ("a/./b/" -> "a/b").
std::string normal_path(const std::string& out) {
  std::string s = fs::path(out).lexically_normal().string();
  while (s.size() > 1 && s.back() == '/') s.pop_back();
  return s.empty() ? "." : s;
}


// The first top-level field holding a non-finite number, if any.
bool finite(const json::Value& v) {
  switch (v.type) {
    case json::Value::Type::Number: return v.is_integer || std::isfinite(v.number);
    case json::Value::Type::Array:
      return std::all_of(v.array.begin(), v.array.end(), [](const json::Value& x) { return finite(x); });
    case json::Value::Type::Object:
      return std::all_of(v.object.begin(), v.object.end(), [](const auto& kv) { return finite(kv.second); });
    default: return true;
  }
}

}  // namespace

// ------------------------------------------------------------------------------------------------
// RunFolder

RunFolder::RunFolder(std::string out, std::string command, NoteFn note)
    : out_(normal_path(out)), command_(std::move(command)), note_(std::move(note)) {}

RunFolder::~RunFolder() { unlock(); }

void RunFolder::say(const std::string& line) const {
  const std::string text = command_ + ": " + line;
  if (note_) note_(text);
  else std::cerr << text << "\n";
}

namespace {

// The finished work a folder holds, by kind of run: a sample run's shards and final files, a
// training run's checkpoints (state_*.safetensors, written last of a checkpoint).
struct Work {
  int64_t shards = 0, samples = 0, checkpoints = 0;
  int64_t of(const std::string& kind) const { return kind == "train" ? checkpoints : shards + samples; }
};

bool name_is(const std::string& name, const char* prefix, const char* suffix) {
  const size_t p = std::strlen(prefix), q = std::strlen(suffix);
  return name.size() > p + q && name.compare(0, p, prefix) == 0 && name.compare(name.size() - q, q, suffix) == 0;
}

Work work_in(const fs::path& out) {
  Work w;
  std::error_code ec;
  for (auto it = fs::directory_iterator(out, ec); !ec && it != fs::directory_iterator(); it.increment(ec)) {
    const std::string name = it->path().filename().string();
    w.samples += name_is(name, "samples_", ".npz");
    w.checkpoints += name_is(name, "state_", ".safetensors");
  }
  ec.clear();
  if (fs::is_directory(fs::symlink_status(out / "shards", ec)))
    for (auto it = fs::directory_iterator(out / "shards", ec); !ec && it != fs::directory_iterator(); it.increment(ec))
      w.shards += name_is(it->path().filename().string(), "shard_", ".npz");
  return w;
}

std::string plural(int64_t n, const std::string& what) {
  return std::to_string(n) + " " + what + (n == 1 ? "" : "s");
}

// A kind's work as a refusal lists it: "3 shards, 1 samples file" / "2 checkpoints".
std::string work_text(const Work& w, const std::string& kind) {
  if (kind == "train") return plural(w.checkpoints, "checkpoint");
  std::string text = w.shards ? plural(w.shards, "shard") : "";
  if (w.samples) text += (text.empty() ? "" : ", ") + plural(w.samples, "samples file");
  return text;
}

// The kind of run a record is of: its "command" ("sample" for records that predate the field).
std::string kind_of(const json::Value& record) {
  if (record.has("command") && record.object.at("command").type == json::Value::Type::String)
    return record.object.at("command").string;
  return "sample";
}

std::string program_of(const std::string& kind) { return "`admrt " + kind + "`"; }

}  // namespace

void RunFolder::lock() {
  if (fd_ >= 0) return;
  const fs::path out(out_);
  std::error_code made;
  // OUT and the parents this command makes (removed again by abandon() when left empty).
  std::vector<std::string> new_dirs;
  for (fs::path p = fs::absolute(out, made).lexically_normal(); !made && !p.empty(); p = p.parent_path()) {
    std::error_code missing;  // set for a path that does not exist
    if (fs::exists(fs::symlink_status(p, missing)) || p == p.parent_path()) break;
    new_dirs.push_back(p.string());
  }
  made.clear();
  fs::create_directories(out, made);
  if (made) throw RunFolderError("--out=" + py_repr(out_) + ": cannot be made a folder (" + made.message() + ")");
  made_dirs_ = new_dirs;
  const fs::path path = out / kLock;
  for (int attempt = 0;; ++attempt) {
    // Never through a link (one planted at OUT/.lock would make admrt write its target), never a
    // FIFO or device (O_NONBLOCK: the open does not wait on one; it is refused below).
    bool made_now = true;
    int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_EXCL | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC, 0644);
    if (fd < 0 && errno == EEXIST) {
      made_now = false;
      fd = ::open(path.c_str(), O_RDWR | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC);
    }
    const int error = errno;
    if (fd < 0 && error == ELOOP)
      throw RunFolderError(path.string() + ": a symbolic link, not a lock file; admrt does not follow links "
                           "there (remove it, or use another --out)");
    if (fd < 0) throw RunFolderError(path.string() + ": cannot be opened (" + std::strerror(error) + ")");
    struct stat st {};
    if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
      ::close(fd);
      throw RunFolderError(path.string() + ": not a regular file, not a lock file (remove it, or use another --out)");
    }
    if (::flock(fd, LOCK_EX | LOCK_NB) != 0) {
      char buf[256] = {};
      const ssize_t got = ::pread(fd, buf, sizeof buf - 1, 0);
      ::close(fd);
      std::string holder(buf, got > 0 ? static_cast<size_t>(got) : 0);
      holder = holder.substr(0, holder.find('\n'));
      while (!holder.empty() && std::isspace(static_cast<unsigned char>(holder.back()))) holder.pop_back();
      throw RunFolderError("--out=" + py_repr(out_) + " is in use by " + (holder.empty() ? "another process" : holder) +
                           "; wait for it to finish, or stop it (its finished work is kept)");
    }
    // The lock holds only while OUT/.lock is still this file: a failed command removes the
    // .lock it made (abandon) while it holds it, and another process may have opened it before.
    struct stat now {};
    if (::lstat(path.c_str(), &now) != 0 || now.st_ino != st.st_ino || now.st_dev != st.st_dev) {
      ::close(fd);
      if (attempt < 8) continue;
      throw RunFolderError(path.string() + ": replaced while it was being locked; rerun the command");
    }
    made_lock_ = made_now;
    fd_ = fd;
    break;
  }
  char when[32];
  const std::time_t now = std::time(nullptr);
  std::strftime(when, sizeof when, "%Y-%m-%d %H:%M:%S", std::localtime(&now));
  const std::string line = "process " + std::to_string(::getpid()) + " (" + command_ + ", since " + when + ")\n";
  if (::ftruncate(fd_, 0) != 0 || ::pwrite(fd_, line.data(), line.size(), 0) < 0) {
    // the lock holds without the note; only the message of a refused second process is poorer
  }
  // Temporary files a killed process left (not deeper: OUT may hold other runs' folders); a link
  // planted under such a name is removed too (a write would follow it).
  for (const fs::path& dir : {out, out / "shards"}) {
    std::error_code ec;
    if (!fs::is_directory(fs::symlink_status(dir, ec))) continue;
    for (auto it = fs::directory_iterator(dir, ec); !ec && it != fs::directory_iterator(); it.increment(ec)) {
      const std::string name = it->path().filename().string();
      std::error_code kind;
      const fs::file_status st = it->symlink_status(kind);
      if (name.size() > 5 && name[0] == '.' && name.compare(name.size() - 4, 4, ".tmp") == 0 &&
          (fs::is_regular_file(st) || fs::is_symlink(st))) {
        std::error_code gone;
        fs::remove(it->path(), gone);
      }
    }
  }
}

void RunFolder::unlock() {
  if (fd_ >= 0) {
    ::close(fd_);  // closing releases the flock
    fd_ = -1;
  }
}

void RunFolder::abandon() {
  if (fd_ < 0) return;
  const fs::path out(out_);
  std::error_code ec;
  const Work w = work_in(out);
  if (wrote_new_record_ && w.shards + w.samples + w.checkpoints == 0) fs::remove(out / kRecord, ec);
  if (fs::is_directory(fs::symlink_status(out / "shards", ec))) fs::remove(out / "shards", ec);  // only if empty
  if (made_lock_) fs::remove(out / kLock, ec);  // while held: see lock()
  unlock();
  for (const std::string& dir : made_dirs_) {
    std::error_code left;
    if (!fs::remove(dir, left)) break;  // not empty (or gone): its parents are not empty either
  }
  made_dirs_.clear();
  made_lock_ = wrote_new_record_ = false;
}

bool RunFolder::check_record(const json::Value& record, int64_t finished, const std::vector<std::string>& may_differ,
                             bool adopt, const json::Value& old_defaults) {
  if (record.type != json::Value::Type::Object) throw std::invalid_argument("run record: expected a JSON object");
  const fs::path path = fs::path(out_) / kRecord;
  const std::string text = record_text(record);
  const std::string kind = kind_of(record), other = kind == "train" ? "sample" : "train";
  const Work work = work_in(fs::path(out_));
  std::error_code ec;
  const bool recorded = fs::exists(fs::symlink_status(path, ec));
  json::Value previous;
  if (recorded) {
    try {
      previous = json::parse_file(path.string());
      if (previous.type != json::Value::Type::Object) throw std::runtime_error("not a JSON object");
    } catch (const std::exception& e) {
      previous = json::make_object().set("<unreadable run.json>", json::make_string(e.what()));
    }
  }
  const bool others_record = recorded && previous.has("command") ? kind_of(previous) == other
                             : recorded && !previous.has("<unreadable run.json>") && kind == "train";
  // Another kind of run's finished work (with or without its record) is never replaced.
  if (work.of(other) > 0)
    throw RunFolderError("--out=" + py_repr(out_) + " holds an " + program_of(other) + " run (" +
                         (others_record ? "run.json, " : "") + work_text(work, other) + "); use another --out");
  if (!recorded) {
    if (work.of(kind) > 0 && !adopt)
      throw RunFolderError("--out=" + py_repr(out_) + " holds " + work_text(work, kind) + " but no run.json (its "
                           "record was lost or deleted): they cannot be told apart from another run's; move them "
                           "away or use another --out");
    write_atomic(path.string(), text);
    wrote_new_record_ = true;
    return false;
  }
  if (others_record) {
    say(out_ + " held an " + program_of(other) + " run that finished nothing; starting over");
    write_atomic(path.string(), text);
    return false;
  }
  // A key the record did not have (written by an older admrt) is not a change: it is added.
  // Keys in sorted order (std::map), as Python's sorted().
  std::vector<std::string> changed;
  std::set<std::string> keys;
  for (const auto& kv : record.object) keys.insert(kv.first);
  for (const auto& kv : previous.object) keys.insert(kv.first);
  for (const std::string& k : keys) {
    if (std::find(may_differ.begin(), may_differ.end(), k) != may_differ.end() || !previous.has(k)) continue;
    const json::Value* old = &previous.object.at(k);
    if (old->is_null() && old_defaults.type == json::Value::Type::Object && old_defaults.has(k))
      old = &old_defaults.object.at(k);  // an older admrt recorded the default as null
    const json::Value none;
    if (*old != (record.has(k) ? record.object.at(k) : none)) changed.push_back(k);
  }
  if (changed.empty()) {
    std::string added;
    for (const std::string& k : record.ordered_keys())
      if (!previous.has(k)) added += (added.empty() ? "" : ", ") + k;
    if (!added.empty()) say(path.string() + " did not record " + added + " (an older admrt); recorded now");
    if (previous != record) write_atomic(path.string(), text);
    return finished > 0;
  }
  if (finished > 0 || work.of(kind) > 0) {  // a samples file whose shards were deleted is finished work too
    std::string diff;
    for (size_t i = 0; i < changed.size() && i < 6; ++i) {
      const std::string& k = changed[i];
      diff += (i ? "; " : "") + k + ": " + show(&previous.object.at(k)) + " -> " +
              show(record.has(k) ? &record.object.at(k) : nullptr);
    }
    const std::string more = changed.size() > 6 ? " (and " + std::to_string(changed.size() - 6) + " more)" : "";
    throw RunFolderError("--out=" + py_repr(out_) + " holds a run with other arguments (" + diff + more +
                         "); rerun with the recorded values to resume it, or use another --out (or delete that "
                         "folder) to start over");
  }
  say(out_ + " held a run that finished nothing; starting over");
  write_atomic(path.string(), text);
  return false;
}

std::string record_text(const json::Value& record) {
  for (const std::string& k : record.ordered_keys()) {
    const json::Value& v = record.object.at(k);
    if (!finite(v))
      throw std::invalid_argument("run record: " + k + "=" +
                                  (v.type == json::Value::Type::Number ? json::number_text(v.number) : show(&v)) +
                                  ": expected a finite number");
  }
  return json::dump(record, 1) + "\n";
}

// ------------------------------------------------------------------------------------------------
// What run_samples needs of a Context and its model stack: only here (and in run_record) are
// Stack and ContextParams read.

json::Value stack_identity(const Context& ctx) {
  const Stack& st = ctx.stack();
  json::Value id = json::make_object();
  if (st.options().package.empty()) return id;  // units from Python: the front end names them (extra)
  id.set("package", json::make_string(st.options().package));
  id.set("weights", json::make_string(st.options().weights));
  id.set("device", json::make_string(st.device().is_cuda() ? "cuda" : "cpu"));
  return id;
}

namespace {

// Labels a run's images may take (none: unconditional and unguided).
std::optional<int64_t> stack_classes(const Context& ctx) { return ctx.stack().num_classes(); }

// The guidance scale of a run that gives none (Context::request): 1 with a classifier, else 0.
double default_guidance(const Context& ctx) { return ctx.stack().classifier() ? 1.0 : 0.0; }

// Whether the run draws seeded noise (its images then do not depend on the batch size).
bool seeded_noise(const Context& ctx) { return ctx.params().noise == "seeded"; }

// OUT/run.json of a sample run: the common fields, the stack's identity, then the front end's.
json::Value run_record(const Context& ctx, const SampleRun& run, int64_t shard_size) {
  const ContextParams& p = ctx.params();
  std::string classes;
  for (int64_t c : run.classes) classes += (classes.empty() ? "" : ",") + std::to_string(c);
  json::Value r = json::make_object();
  r.set("command", json::make_string("sample"));  // the kind of run (admrt sample and admrt-sample share folders)
  r.set("steps", json::make_string(p.steps));
  r.set("upsampler_steps", ctx.stack().upsampler() && !p.upsampler_steps.empty()
                               ? json::make_string(p.upsampler_steps) : json::make_null());
  // The scale the run uses (an explicit default equals an omitted one).
  r.set("guidance", json::make_number(run.guidance ? *run.guidance : default_guidance(ctx)));
  r.set("classes", run.classes.empty() ? json::make_null() : json::make_string(classes));
  r.set("num", json::make_int(run.num));
  r.set("seed", json::make_int(run.seed));
  r.set("eta", json::make_number(p.eta));
  // Recorded when set (records written before these options stay equal to a rerun's).
  if (p.dynamic_threshold != 0) r.set("dynamic_threshold", json::make_number(p.dynamic_threshold));
  if (p.guidance_t_min != 0 || p.guidance_t_max >= 0) {
    r.set("guidance_interval", json::make_array({json::make_int(p.guidance_t_min),
                                                 p.guidance_t_max >= 0 ? json::make_int(p.guidance_t_max)
                                                                       : json::make_null()}));
  }
  if (p.guidance_every != 1) r.set("guidance_every", json::make_int(p.guidance_every));
  r.set("noise", json::make_string(seeded_noise(ctx) ? "seeded" : "reference"));
  // What a seed means: shards drawn with another noise map must not be mixed in.
  if (seeded_noise(ctx)) r.set("seeded_noise", json::make_string(kSeededNoiseFormat));
  r.set("shard_size", json::make_int(shard_size));
  // Under reference noise the images depend on the batch: a resume must keep it (may_differ).
  r.set("batch_size", json::make_int(ctx.params().batch_size));
  const json::Value id = stack_identity(ctx);
  for (const std::string& k : id.ordered_keys()) r.set(k, id.object.at(k));
  if (!run.extra.is_null()) {
    if (run.extra.type != json::Value::Type::Object) throw std::invalid_argument("SampleRun.extra: expected a JSON object");
    for (const std::string& k : run.extra.ordered_keys()) r.set(k, run.extra.object.at(k));
  }
  return r;
}

int64_t finished_shards(const fs::path& shards) {
  int64_t n = 0;
  std::error_code ec;
  if (!fs::is_directory(shards, ec)) return 0;
  for (const auto& entry : fs::directory_iterator(shards)) {
    const std::string name = entry.path().filename().string();
    n += name.rfind("shard_", 0) == 0 && entry.path().extension() == ".npz";
  }
  return n;
}

[[noreturn]] void damaged(const fs::path& shard, const std::string& why) {
  throw RunFolderError(shard.string() + ": damaged shard (" + why +
                       "); delete it and rerun the same command to sample it again");
}

}  // namespace

// ------------------------------------------------------------------------------------------------
// run_samples

namespace {
std::string sample_shards(Context& ctx, const SampleRun& run, const std::vector<int64_t>& labels,
                          const std::vector<double>& guidance, int64_t shard_size, const fs::path& out);
}  // namespace

std::string run_samples(Context& ctx, const SampleRun& run) {
  // Every argument is checked before anything is written (num by ctx.validate, with the driver's message).
  if (run.shard_size < 0)
    throw std::invalid_argument("--shard-size=" + std::to_string(run.shard_size) + ": expected a positive int");
  if (run.world < 1 || run.rank < 0 || run.rank >= run.world)
    throw std::invalid_argument("rank " + std::to_string(run.rank) + " of world size " + std::to_string(run.world) +
                                ": expected 0 <= rank < world size");
  if (run.world > 1 && (!run.broadcast_error || !run.barrier))
    throw std::invalid_argument("run_samples: a run over several processes needs broadcast_error and barrier");
  ctx.check_num(run.num);  // before the labels below are sized by it (--num 10**12)
  const int64_t batch = ctx.params().batch_size;
  const int64_t shard_size = run.shard_size ? run.shard_size : 4 * batch;
  std::vector<int64_t> labels;  // of the whole run: classes cycled, else 0, 1, ... cycling
  if (!run.classes.empty()) {
    for (int64_t i = 0; i < run.num; ++i) labels.push_back(run.classes[i % run.classes.size()]);
  } else if (const auto k = stack_classes(ctx)) {
    for (int64_t i = 0; i < run.num; ++i) labels.push_back(i % *k);
  }
  std::vector<double> guidance;
  if (run.guidance) guidance.push_back(*run.guidance);
  ctx.validate(labels, guidance, {}, std::optional<int64_t>(run.num));
  const json::Value record = run_record(ctx, run, shard_size);
  record_text(record);  // a non-finite field is refused before OUT is made

  // Rank 0 holds the folder (lock, record); every rank stops on its refusal.
  const fs::path out(normal_path(run.out)), shards = out / "shards";
  RunFolder folder(run.out, run.command, run.note);
  std::exception_ptr refused;
  std::string refusal;
  if (run.rank == 0) {
    try {
      folder.lock();
      const std::vector<std::string> may_differ =
          seeded_noise(ctx) ? std::vector<std::string>{"batch_size"} : std::vector<std::string>{};
      // Records before this admrt wrote null for the default guidance.
      const json::Value old_defaults = json::make_object().set("guidance", json::make_number(default_guidance(ctx)));
      folder.check_record(record, finished_shards(shards), may_differ, false, old_defaults);
      std::error_code ec;
      const fs::file_status st = fs::symlink_status(shards, ec);
      if (fs::exists(st) && !fs::is_directory(st))
        throw RunFolderError(shards.string() + ": not a folder (" + (fs::is_symlink(st) ? "a symbolic link" : "a file") +
                             "); admrt writes its shards into a folder of its own there: remove it, or use another --out");
      fs::create_directories(shards, ec);
      if (ec) throw RunFolderError(shards.string() + ": cannot be made a folder (" + ec.message() + ")");
    } catch (const std::exception& e) {
      folder.abandon();  // removes only what holds no work
      if (run.world == 1) throw;
      refused = std::current_exception();
      refusal = first_line(e.what());
    }
  }
  if (run.world > 1) {
    const std::string message = run.broadcast_error(refusal);
    if (refused) std::rethrow_exception(refused);
    if (!message.empty()) throw RunFolderError(message);
  }

  // A failure from here on (Ctrl-C, a failed write, a damaged shard) leaves the finished shards;
  // a run that finished none leaves nothing it created (abandon()).
  try {
    return sample_shards(ctx, run, labels, guidance, shard_size, out);
  } catch (...) {
    // (Over several processes another rank may still be writing shards: the record stays, and
    // is replaced by the next run if none was finished.)
    if (run.world == 1) folder.abandon();
    throw;
  }
}

namespace {

// The shards of this rank that are missing, then (rank 0) the final file from all of them.
std::string sample_shards(Context& ctx, const SampleRun& run, const std::vector<int64_t>& labels,
                          const std::vector<double>& guidance, int64_t shard_size, const fs::path& out) {
  const int64_t batch = ctx.params().batch_size;
  const fs::path shards = out / "shards";
  // The shard plan: shard s holds images [s * shard_size, min((s + 1) * shard_size, num)).
  const int64_t n_shards = (run.num + shard_size - 1) / shard_size;
  std::vector<fs::path> paths;
  std::vector<int64_t> todo;
  int64_t missing = 0;
  for (int64_t s = 0; s < n_shards; ++s) {
    char name[32];
    std::snprintf(name, sizeof name, "shard_%05lld.npz", static_cast<long long>(s));
    paths.push_back(shards / name);
    if (fs::exists(paths.back())) continue;
    ++missing;
    if (s % run.world == run.rank) todo.push_back(s);  // each rank its own shards
  }
  if (missing < n_shards && run.rank == 0) {
    const std::string line = run.command + ": resuming: " + std::to_string(n_shards - missing) + " of " +
                             std::to_string(n_shards) + " shards already done";
    if (run.note) run.note(line);
    else std::cerr << line << "\n";
  }
  auto count_of = [&](int64_t s) { return std::min(shard_size, run.num - s * shard_size); };

  int64_t total = 0, done = 0;
  for (int64_t s : todo) total += (count_of(s) + batch - 1) / batch * ctx.steps_per_batch();
  ProgressFn on_step;
  if (run.progress) on_step = [&](int64_t, int64_t) { run.progress(++done, total); };
  for (int64_t s : todo) {
    const int64_t lo = s * shard_size, n = count_of(s);
    std::vector<int64_t> shard_labels;
    if (!labels.empty()) shard_labels.assign(labels.begin() + lo, labels.begin() + lo + n);
    std::vector<uint64_t> seeds;
    for (int64_t i = lo; i < lo + n; ++i) seeds.push_back(static_cast<uint64_t>(run.seed) + static_cast<uint64_t>(i));
    const Result r = ctx.sample(shard_labels, guidance, seeds, on_step, n);
    std::vector<at::Tensor> arrays = {r.images};
    if (r.labels.defined()) arrays.push_back(r.labels);
    write_npz(paths[s].string(), arrays);
  }
  if (run.world > 1) run.barrier();  // every rank's shards are written
  if (run.rank != 0) return "";

  // The final file, from the shards (each checked: a damaged one is named, with how to redo it).
  at::Tensor images, out_labels;
  for (int64_t s = 0; s < n_shards; ++s) {
    std::vector<at::Tensor> parts;
    try {
      parts = read_npz(paths[s].string());
    } catch (const std::exception& e) {
      std::string why = first_line(e.what());
      const std::string prefix = paths[s].string() + ": ";
      if (why.rfind(prefix, 0) == 0) why = why.substr(prefix.size());
      damaged(paths[s], why);
    }
    const at::Tensor& im = parts[0];
    const int64_t n = count_of(s), lo = s * shard_size;
    if (im.scalar_type() != at::kByte || im.dim() != 4 || im.size(0) != n)
      damaged(paths[s], "arr_0 is not " + std::to_string(n) + " uint8 NHWC images");
    if (!images.defined()) {
      images = at::empty({run.num, im.size(1), im.size(2), im.size(3)}, at::kByte);
      if (parts.size() > 1) out_labels = at::empty({run.num}, at::kLong);
    }
    if (im.sizes().slice(1) != images.sizes().slice(1))
      damaged(paths[s], "its images are " + std::to_string(im.size(1)) + "x" + std::to_string(im.size(2)) + "x" +
                            std::to_string(im.size(3)) + ", the first shard's " + std::to_string(images.size(1)) +
                            "x" + std::to_string(images.size(2)) + "x" + std::to_string(images.size(3)));
    if ((parts.size() > 1) != out_labels.defined() || (parts.size() > 1 && parts[1].numel() != n))
      damaged(paths[s], "its labels do not match the first shard's");
    images.narrow(0, lo, n).copy_(im);
    if (out_labels.defined()) out_labels.narrow(0, lo, n).copy_(parts[1].reshape({n}).to(at::kLong));
  }
  std::string shape;
  for (int64_t d : images.sizes()) shape += (shape.empty() ? "" : "x") + std::to_string(d);
  const fs::path final_path = out / ("samples_" + shape + ".npz");
  std::vector<at::Tensor> arrays = {images};
  if (out_labels.defined()) arrays.push_back(out_labels);
  write_npz(final_path.string(), arrays);
  return final_path.string();
}

}  // namespace

}  // namespace admrt
