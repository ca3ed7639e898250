// pybind11 entry point of admrt.engine._core.
#include <torch/extension.h>

PYBIND11_MODULE(_core, m) {
  m.doc() = "admrt C++ sampling core";
  m.def("torch_version", []() { return std::string(TORCH_VERSION); },
        "The libtorch version this core was built against.");
}
