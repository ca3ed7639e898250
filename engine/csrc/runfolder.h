// The run folder of `admrt sample`, `admrt-sample` and `admrt train` (one implementation, for
// every front end): a long run never loses finished work and never mixes two runs' work.
//
//   OUT/run.json   the run's record: every setting that decides what the run writes. Written once,
//                  after every argument has been validated, so a rejected command leaves nothing
//                  that blocks the corrected one. A rerun compares it field by field: equal, the
//                  run resumes from its finished work (shards, checkpoints); different, it is
//                  refused with each field's recorded and new value. A record whose run finished
//                  nothing is replaced. Its "command" field names the kind of run ("sample": `admrt
//                  sample`, `admrt sample --package` and `admrt-sample` share folders; "train"): a
//                  folder holding another kind's finished work is refused, naming it, and finished
//                  work without a run.json (the record lost or deleted) is refused as an orphan,
//                  never adopted by a run that cannot tell it from its own.
//   OUT/.lock      held (flock) by the process working in OUT; a second process is refused,
//                  naming the holder. The OS releases it when the holder exits or is killed.
//                  Opened without following links (a link planted there is refused).
//   work           shards/shard_*.npz and samples_*.npz (sample runs), state_*.safetensors
//                  (training checkpoints). A command that fails before finishing any calls
//                  abandon(): what it created (run.json, .lock, an empty shards/, OUT) is removed.
//   .*.tmp         temporary files of atomic writes (write_atomic, Python's admrt.io.atomic_write);
//                  those a killed process left in OUT and OUT/shards are removed once the lock is held.
//
// run_samples() is the whole `admrt sample` run over a Context: shards OUT/shards/shard_NNNNN.npz
// written atomically, a rerun resuming from the finished ones, torchrun ranks sharing them, and
// OUT/samples_NxHxWxC.npz at the end. The folder is started over by deleting it (or another --out).
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "admrt.h"
#include "json.h"

namespace admrt {

// A refusal of the run folder (another process holds it, it holds another run, a damaged shard):
// one line the user can act on. The Python module raises it as admrt.core.RunFolderError (a ValueError).
struct RunFolderError : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};

// Where the run folder's notes go (one line each, without the newline): "resuming: ...",
// "... starting over". Empty: std::cerr.
using NoteFn = std::function<void(const std::string&)>;

// OUT's lock and record for one command: lock(), check_record(...), then unlock() (or destruction).
class RunFolder {
 public:
  // command: names this program in notes and in the lock ("admrt sample", "admrt-sample").
  RunFolder(std::string out, std::string command, NoteFn note = nullptr);
  ~RunFolder();
  RunFolder(const RunFolder&) = delete;
  RunFolder& operator=(const RunFolder&) = delete;

  const std::string& out() const { return out_; }
  const std::string& command() const { return command_; }

  // Takes OUT/.lock (creating OUT), or throws RunFolderError naming the process that holds it
  // (or a .lock that is a link or not a regular file); then removes the stale .*.tmp files in OUT
  // and OUT/shards.
  void lock();
  void unlock();
  bool locked() const { return fd_ >= 0; }

  // Writes OUT/run.json, or compares it with `record` (a JSON object). Returns true when an
  // earlier run with this record is resumed. finished: how much of the recorded run is done
  // (shards, checkpoints): with none, a different record is replaced; may_differ: fields a resume
  // may change (the batch size under seeded noise). A key the old record lacks is added (a record
  // of an older admrt); old_defaults: fields an older admrt recorded as null for the default, with
  // the value that null stands for. Throws RunFolderError listing the changed fields, naming
  // another kind of run's work, or refusing finished work without a run.json (unless adopt: the
  // caller checks that work itself, as `admrt train --resume OUT` checks a checkpoint's settings).
  bool check_record(const json::Value& record, int64_t finished, const std::vector<std::string>& may_differ = {},
                    bool adopt = false, const json::Value& old_defaults = json::Value());

  // The command failed before finishing any work: removes what this RunFolder created and what
  // holds no work (the run.json it wrote where none was, the .lock file it made, an empty shards/,
  // OUT and the parents it made, when left empty), then unlocks. Never removes finished work.
  void abandon();

 private:
  void say(const std::string& line) const;
  std::string out_, command_;
  NoteFn note_;
  int fd_ = -1;
  bool made_lock_ = false, wrote_new_record_ = false;
  std::vector<std::string> made_dirs_;  // OUT and the parents lock() created, deepest first
};

// A record as OUT/run.json holds it: json.dumps(record, indent=1) + "\n". Throws
// std::invalid_argument naming the field for a non-finite number.
std::string record_text(const json::Value& record);

// The record fields that identify the model stack of a Context: for a package, its folder
// (canonical), the exported weights' fingerprint, its seeded-noise format and device type.
json::Value stack_identity(const Context& ctx);

// One `admrt sample` run: what the front end parsed.
struct SampleRun {
  std::string out = "samples";              // the run folder
  std::string command = "admrt-sample";     // names the program in notes, errors and the lock
  int64_t num = 16;                         // images
  std::vector<int64_t> classes;             // cycled over the images; empty: 0, 1, ... cycling
                                            // over the stack's classes (or unlabelled)
  std::optional<double> guidance;           // one scale for all (none: 1 with a classifier, else 0)
  int64_t seed = 0;                         // image i gets seed + i (as uint64, wrapping)
  int64_t shard_size = 0;                   // images per shard; 0: 4 batches
  // The front end's own record fields (a JSON object, or null for none): e.g. the model files'
  // fingerprints of a Python-built stack. A key here replaces the common field of that name. A
  // package run passes none, so `admrt sample --package` and `admrt-sample` write the same record.
  json::Value extra;
  // progress(done, total) after each network step of this process's shards; may throw to stop
  // the run (Ctrl-C): the finished shards stay.
  ProgressFn progress;
  NoteFn note;                              // notes (see NoteFn); empty: std::cerr
  // torchrun: rank r samples the shards s with s % world == r. Only rank 0 locks the folder,
  // checks the record and writes the final file. broadcast_error(message) is called on every
  // rank once rank 0 has checked the folder, with rank 0's refusal ("" for none; other ranks pass
  // ""), and returns rank 0's message on every rank (torch.distributed.broadcast_object_list), so
  // a refusal stops every rank; barrier() is called on every rank after its shards are written.
  // Both are needed when world > 1.
  int rank = 0;
  int world = 1;
  std::function<std::string(const std::string&)> broadcast_error;
  std::function<void()> barrier;
};

// The whole run: validates every argument (through ctx.validate) before anything is written,
// then locks OUT, checks the record, samples the missing shards of this rank and (rank 0) writes
// OUT/samples_NxHxWxC.npz (arr_0 uint8 NHWC, arr_1 int64 labels; zip64 from 4 GiB) atomically.
// Returns its path on rank 0, "" on the other ranks. Throws std::invalid_argument for a bad
// argument, RunFolderError for a refusal or a damaged shard, and what progress throws.
std::string run_samples(Context& ctx, const SampleRun& run);

}  // namespace admrt
