// Message text shared by the core's sources (internal; not installed).
#pragma once

#include <sstream>
#include <string>

namespace admrt {

// The arguments streamed into one string: cat("batch_size=", 9, ": ...").
template <typename... Args>
std::string cat(const Args&... args) {
  std::ostringstream s;
  (s << ... << args);
  return s.str();
}

}  // namespace admrt
