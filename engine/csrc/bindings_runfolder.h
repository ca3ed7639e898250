// The run folder (runfolder.h) in the pybind11 module admrt.core: RunFolder, run_samples, RunFolderError.
#pragma once

#include <pybind11/pybind11.h>

void bind_runfolder(pybind11::module_& m);
