// admrt-read-check: runs the library's file readers on many files in one process and prints one
// line per file, for the fuzz test (tests/test_fuzz_readers.py) and the sanitizer build
// (-DADMRT_SANITIZE=ON, tests/engine/test_sanitizers.py). Not a user command.
//
//   admrt-read-check json FILE...      json::parse_file (manifest.json, run.json)
//   admrt-read-check npz FILE...       read_npz (the shards of a run folder)
//   admrt-read-check package DIR...    Stack::load_package(DIR, "cpu"): the manifest's every field,
//                                      the unit paths and hashes, then the units (as admrt-sample)
//
// Each line is "<status>\t<message>" in the order of the files: status "ok" (the message
// summarises what was read), "error" (the reader refused the file with std::runtime_error or
// std::invalid_argument; the message is e.what(), its backslashes, newlines, CRs and tabs written
// as two characters each: \\ \n \r \t) or "unexpected" (any other exception: a bug). A crash or a
// hang is the other kind of bug; the exit status is 0 when every file was read or refused, 1 when
// one was unexpected, 2 for bad arguments.
#include <exception>
#include <iostream>
#include <stdexcept>
#include <string>
#include <typeinfo>
#include <vector>

#include "admrt.h"
#include "json.h"
#include "npz.h"

namespace {

std::string escaped(const std::string& text) {
  std::string out;
  for (char c : text) {
    if (c == '\\') out += "\\\\";
    else if (c == '\n') out += "\\n";
    else if (c == '\r') out += "\\r";
    else if (c == '\t') out += "\\t";
    else out.push_back(c);
  }
  return out;
}

std::string summary(const admrt::json::Value& v) {
  using T = admrt::json::Value::Type;
  switch (v.type) {
    case T::Object: return "object of " + std::to_string(v.object.size()) + " keys";
    case T::Array: return "array of " + std::to_string(v.array.size());
    default: return "scalar";
  }
}

std::string summary(const std::vector<at::Tensor>& arrays) {
  std::string out;
  for (const at::Tensor& a : arrays) {
    out += out.empty() ? "" : " ";
    out += c10::toString(a.scalar_type());
    for (int64_t d = 0; d < a.dim(); ++d) out += (d ? "x" : ":") + std::to_string(a.size(d));
  }
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  const std::string mode = argc > 1 ? argv[1] : "";
  if (mode != "json" && mode != "npz" && mode != "package") {
    std::cerr << "usage: admrt-read-check json|npz|package FILE...\n";
    return 2;
  }
  bool unexpected = false;
  for (int i = 2; i < argc; ++i) {
    const std::string path = argv[i];
    std::string status = "ok", message;
    try {
      if (mode == "json") message = summary(admrt::json::parse_file(path));
      else if (mode == "npz") message = summary(admrt::read_npz(path));
      else message = admrt::Stack::load_package(path, "cpu")->describe();
    } catch (const std::runtime_error& e) {
      status = "error";
      message = e.what();
    } catch (const std::invalid_argument& e) {
      status = "error";
      message = e.what();
    } catch (const std::exception& e) {
      status = "unexpected";
      message = std::string(typeid(e).name()) + ": " + e.what();
      unexpected = true;
    }
    std::cout << status << "\t" << escaped(message) << "\n" << std::flush;
  }
  return unexpected ? 1 : 0;
}
