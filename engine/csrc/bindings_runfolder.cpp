// admrt.core.RunFolder, admrt.core.run_samples and admrt.core.RunFolderError (a ValueError): the run folder of
// engine/csrc/runfolder.h for `admrt sample` and `admrt train`. Records cross as JSON text
// (json.dumps, then the C++ reader), so the Python side may hold lists and nested objects. The
// run's notes go to sys.stderr; run_samples releases the GIL and takes it only for the callbacks,
// where a pending signal is raised too (Ctrl-C stops the run as KeyboardInterrupt).
#include "bindings_runfolder.h"

#include <torch/extension.h>

#include <optional>
#include <string>
#include <vector>

#include "admrt.h"
#include "json.h"
#include "npz.h"
#include "runfolder.h"

namespace py = pybind11;

namespace {

// A note of the run folder, written as print(line, file=sys.stderr) would.
void py_note(const std::string& line) {
  py::gil_scoped_acquire gil;
  py::module_::import("sys").attr("stderr").attr("write")(line + "\n");
}

admrt::json::Value from_python(const py::handle& value, const char* what) {
  const std::string text = py::str(py::module_::import("json").attr("dumps")(value));
  return admrt::json::parse(text, what);
}

py::object to_python(const admrt::json::Value& value) {
  return py::module_::import("json").attr("loads")(admrt::json::dump(value));
}

std::vector<std::string> strings(const py::iterable& items) {
  std::vector<std::string> out;
  for (const py::handle& item : items) out.push_back(py::cast<std::string>(item));
  return out;
}

std::string run_samples_py(admrt::Context& ctx, const py::object& out, const std::string& command, int64_t num,
                           std::vector<int64_t> classes, std::optional<double> guidance, int64_t seed,
                           int64_t shard_size, const py::object& extra, int rank, int world,
                           const py::object& progress, const py::object& barrier, const py::object& broadcast_error) {
  admrt::SampleRun run;
  run.out = py::str(py::module_::import("os").attr("fspath")(out));
  run.command = command;
  run.num = num;
  run.classes = std::move(classes);
  run.guidance = guidance;
  run.seed = seed;
  run.shard_size = shard_size;
  if (!extra.is_none()) run.extra = from_python(extra, "run_samples extra");
  run.rank = rank;
  run.world = world;
  run.note = py_note;
  // Always a callback: it raises a pending signal (Ctrl-C) even without a progress bar.
  run.progress = [&progress](int64_t done, int64_t total) {
    py::gil_scoped_acquire gil;
    if (PyErr_CheckSignals() != 0) throw py::error_already_set();
    if (!progress.is_none()) progress(done, total);
  };
  if (!barrier.is_none()) {
    run.barrier = [&barrier]() {
      py::gil_scoped_acquire gil;
      barrier();
    };
  }
  if (!broadcast_error.is_none()) {
    run.broadcast_error = [&broadcast_error](const std::string& message) {
      py::gil_scoped_acquire gil;
      py::object got = broadcast_error(message);
      return got.is_none() ? std::string() : py::cast<std::string>(got);
    };
  }
  py::gil_scoped_release nogil;
  return admrt::run_samples(ctx, run);
}

}  // namespace

void bind_runfolder(py::module_& m) {
  py::register_exception<admrt::RunFolderError>(m, "RunFolderError", PyExc_ValueError);

  py::class_<admrt::RunFolder>(m, "RunFolder",
                               "OUT's lock and record for one command (engine/csrc/runfolder.h): lock(), "
                               "check_record(...), then unlock().")
      .def(py::init([](const py::object& out, const std::string& command) {
             const std::string path = py::str(py::module_::import("os").attr("fspath")(out));
             return std::make_unique<admrt::RunFolder>(path, command, py_note);
           }), py::arg("out"), py::arg("command"))
      .def_property_readonly("out", [](const admrt::RunFolder& self) {
        return py::module_::import("pathlib").attr("Path")(self.out());
      })
      .def_property_readonly("command", &admrt::RunFolder::command)
      .def("lock", &admrt::RunFolder::lock,
           "Take OUT/.lock, or raise RunFolderError naming the process that holds it; then remove stale .tmp files.")
      .def("unlock", &admrt::RunFolder::unlock)
      .def("locked", &admrt::RunFolder::locked, "Whether this RunFolder holds OUT/.lock.")
      .def("check_record", [](admrt::RunFolder& self, const py::dict& record, int64_t finished,
                              const py::iterable& may_differ, bool adopt) {
             return self.check_record(from_python(record, "run record"), finished, strings(may_differ), adopt);
           }, py::arg("record"), py::kw_only(), py::arg("finished"), py::arg("may_differ") = py::tuple(),
           py::arg("adopt") = false,
           "Write OUT/run.json, or compare it with `record`; True when an earlier run with this record is "
           "resumed. finished: how much of it is done (none: a different record is replaced); may_differ: "
           "fields a resume may change; adopt: take finished work without a run.json (the caller checks it). "
           "Refuses another kind of run's work (record['command']) and, unless adopt, work without a run.json.")
      .def("abandon", &admrt::RunFolder::abandon,
           "The command failed before finishing any work: remove what this RunFolder created and what holds "
           "no work (its new run.json, its .lock, an empty shards/, OUT if it made it and it is empty); unlock.");

  m.def("run_samples", &run_samples_py, py::arg("ctx"), py::kw_only(), py::arg("out"), py::arg("command"),
        py::arg("num"), py::arg("classes") = std::vector<int64_t>{}, py::arg("guidance") = py::none(),
        py::arg("seed") = 0, py::arg("shard_size") = 0, py::arg("extra") = py::none(), py::arg("rank") = 0,
        py::arg("world") = 1, py::arg("progress") = py::none(), py::arg("barrier") = py::none(),
        py::arg("broadcast_error") = py::none(),
        "The whole `admrt sample` run over a Context (runfolder.h): validation, lock, record, shards, resume, "
        "and OUT/samples_NxHxWxC.npz; returns its path (rank 0; '' on other ranks). progress(done, total); "
        "barrier() and broadcast_error(message) -> rank 0's message, for torchrun ranks.");
  m.def("stack_identity", [](const admrt::Context& ctx) { return to_python(admrt::stack_identity(ctx)); },
        py::arg("ctx"), "The record fields that identify the Context's model stack.");
  m.def("write_npz_zip64", &admrt::write_npz_zip64, py::arg("path"), py::arg("arrays"),
        "write_npz with zip64 records whatever the size (tests of the zip64 path).");
}
