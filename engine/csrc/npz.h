// .npz files as numpy's np.savez writes them (a zip of uncompressed .npy arrays arr_0, arr_1, ...),
// for the sample format of guided-diffusion's scripts: arr_0 uint8 (N, H, W, C), arr_1 int64 (N,).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <string>
#include <vector>

namespace admrt {

// Writes `arrays` (uint8, int64, float32 or float64; C-contiguous on the CPU) as arr_0, arr_1, ...
// to `path` atomically: a temporary file beside it, renamed into place when complete. Streamed
// from the arrays' memory; a file that reaches 4 GiB gets zip64 records (as Python's zipfile
// writes them; numpy reads them).
void write_npz(const std::string& path, const std::vector<at::Tensor>& arrays);
// The same with zip64 records whatever the size (tests of that path without 4 GiB of data).
void write_npz_zip64(const std::string& path, const std::vector<at::Tensor>& arrays);

// Writes `bytes` to `path` through a temporary file beside it, renamed into place when complete.
void write_atomic(const std::string& path, const std::string& bytes);

// Reads arr_0, arr_1, ... of an uncompressed .npz (np.savez, or write_npz; zip64 included).
// Throws naming the file when it is missing, damaged or compressed.
std::vector<at::Tensor> read_npz(const std::string& path);

}  // namespace admrt
