// .npz files as numpy's np.savez writes them (a zip of uncompressed .npy arrays arr_0, arr_1, ...),
// for the sample format of guided-diffusion's scripts: arr_0 uint8 (N, H, W, C), arr_1 int64 (N,).
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <vector>

namespace admrt {

// Writes `arrays` (uint8, int64, float32 or float64; C-contiguous on the CPU) as arr_0, arr_1, ...
// to `path` atomically: a temporary file beside it, renamed into place when complete.
void write_npz(const std::string& path, const std::vector<at::Tensor>& arrays);

// Reads arr_0, arr_1, ... of an uncompressed .npz (np.savez, or write_npz). Throws naming the
// file when it is missing, damaged or compressed.
std::vector<at::Tensor> read_npz(const std::string& path);

}  // namespace admrt
