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

// The first line of an error message (c10 errors append a C++ stack).
inline std::string first_line(const std::string& text) { return text.substr(0, text.find('\n')); }

}  // namespace admrt
