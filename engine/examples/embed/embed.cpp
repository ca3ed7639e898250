// Embedding admrt in a C++ program: load an exported package once, make a context, sample.
//   embed PACKAGE_DIR  -> prints the shape of the images and their labels
#include <admrt.h>

#include <iostream>

int main(int argc, char** argv) {
  if (argc != 2) {
    std::cerr << "usage: embed PACKAGE_DIR\n";
    return 2;
  }
  try {
    auto package = admrt::Stack::load_package(argv[1]);  // the model handle: manifest + AOTI units
    auto params = admrt::Context::default_params();  // steps plan, batch size, graphs, eta
    params.batch_size = 4;
    admrt::Context ctx(package, params);             // per-run state, reused across calls
    admrt::Result r = ctx.sample(/*classes=*/{1, 2, 3}, /*guidance=*/{1.0}, /*seeds=*/{7, 8, 9});
    std::cout << "images " << r.images.sizes() << " " << r.images.dtype() << "\n";
    if (r.labels.defined()) std::cout << "labels " << r.labels << "\n";
    std::cout << "sum " << r.images.to(at::kLong).sum().item<int64_t>() << "\n";
  } catch (const std::exception& e) {
    std::cerr << "embed: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
