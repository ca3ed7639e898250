// StepPlan: the one parser of step-plan strings (grammar in plan.h).
#include "plan.h"

#include <cctype>
#include <optional>
#include <stdexcept>

namespace admrt {
namespace {

std::string strip(const std::string& s) {
  size_t a = 0, b = s.size();
  while (a < b && std::isspace(static_cast<unsigned char>(s[a]))) ++a;
  while (b > a && std::isspace(static_cast<unsigned char>(s[b - 1]))) --b;
  return s.substr(a, b - a);
}

// A positive integer with digits only (no sign, no exponent), or -1.
int64_t positive(const std::string& text) {
  const std::string s = strip(text);
  if (s.empty() || s.size() > 12) return -1;
  int64_t v = 0;
  for (char c : s) {
    if (!std::isdigit(static_cast<unsigned char>(c))) return -1;
    v = v * 10 + (c - '0');
  }
  return v > 0 ? v : -1;
}

std::string expected(const std::string& arg, const std::string& text) {
  return arg + "='" + text + "': expected 'ddimN' (DDIM), 'N' or 'a,b,c' (DDPM over N steps, or over sections "
         "of a, b, c steps), a solver with N steps ('dpmpp2m10', 'dpmpp3m10', 'dpmpp2m-sde20', 'unipc2m8', "
         "'unipc3m8', '-logsnr' appended for a log-SNR grid), optionally prefixed by a method such as "
         "'ddim:' (over 'tN' / 'logsnrN' too); N a positive integer";
}

// "tN" / "logsnrN" -> (spacing, N), else (Sections, -1).
std::pair<Spacing, int64_t> grid(const std::string& s) {
  if (s.rfind("logsnr", 0) == 0) return {Spacing::UniformLogSnr, positive(s.substr(6))};
  if (s.rfind("t", 0) == 0) return {Spacing::UniformT, positive(s.substr(1))};
  return {Spacing::Sections, -1};
}

}  // namespace

Method parse_method(const std::string& name, const std::string& arg) {
  const std::string s = strip(name);
  std::string names;
  for (const auto& [method, known] : kMethods) {
    if (s == known) return method;
    names += std::string(names.empty() ? "" : ", ") + "'" + known + "'";
  }
  throw std::invalid_argument(arg + "='" + name + "': expected one of (" + names + ")");
}

std::string method_name(Method method) {
  for (const auto& [known, name] : kMethods)
    if (known == method) return name;
  throw std::logic_error("method_name: a Method without a row in kMethods");
}

StepPlan StepPlan::parse(const std::string& text, const std::string& arg) {
  std::string rest = strip(text);
  StepPlan plan;
  std::optional<Method> method;
  const size_t colon = rest.find(':');
  if (colon != std::string::npos) {
    try {
      method = parse_method(rest.substr(0, colon), arg);
    } catch (const std::invalid_argument&) {
      throw std::invalid_argument(expected(arg, text));
    }
    rest = strip(rest.substr(colon + 1));
  } else {
    // The solver shorthand: name, N, optionally "-logsnr".
    for (const auto& [known, name] : kMethods) {
      const std::string n(name);
      if (!is_solver(known) || rest.rfind(n, 0) != 0) continue;
      std::string count = rest.substr(n.size());
      Spacing spacing = Spacing::UniformT;
      const std::string suffix = "-logsnr";
      if (count.size() > suffix.size() && count.compare(count.size() - suffix.size(), suffix.size(), suffix) == 0) {
        count = count.substr(0, count.size() - suffix.size());
        spacing = Spacing::UniformLogSnr;
      }
      if (positive(count) < 0) continue;  // e.g. "dpmpp2m" matched the front of "dpmpp2m-sde20"
      plan.method_ = known;
      plan.spacing_ = spacing;
      plan.count_ = positive(count);
      return plan;
    }
  }
  if (rest.rfind("ddim", 0) == 0) {
    plan.spacing_ = Spacing::DdimStride;
    plan.count_ = positive(rest.substr(4));
    if (plan.count_ < 0) throw std::invalid_argument(expected(arg, text));
    plan.method_ = method.value_or(Method::DDIM);
    return plan;
  }
  if (const auto [spacing, count] = grid(rest); spacing != Spacing::Sections) {
    if (count < 0) throw std::invalid_argument(expected(arg, text));
    plan.spacing_ = spacing;
    plan.count_ = count;
    plan.method_ = method.value_or(Method::DDIM);
    return plan;
  }
  size_t start = 0;
  while (true) {
    const size_t comma = rest.find(',', start);
    const int64_t count = positive(rest.substr(start, comma == std::string::npos ? std::string::npos : comma - start));
    if (count < 0) throw std::invalid_argument(expected(arg, text));
    plan.sections_.push_back(count);
    if (comma == std::string::npos) break;
    start = comma + 1;
  }
  plan.method_ = method.value_or(Method::DDPM);
  return plan;
}

std::string StepPlan::respacing() const {
  switch (spacing_) {
    case Spacing::DdimStride: return "ddim" + std::to_string(count_);
    case Spacing::UniformT: return "t" + std::to_string(count_);
    case Spacing::UniformLogSnr: return "logsnr" + std::to_string(count_);
    case Spacing::Sections: break;
  }
  std::string s;
  for (size_t i = 0; i < sections_.size(); ++i) s += (i ? "," : "") + std::to_string(sections_[i]);
  return s;
}

StepPlan StepPlan::with_method(Method method) const {
  StepPlan plan = *this;
  plan.method_ = method;
  return plan;
}

std::string StepPlan::method_name() const { return admrt::method_name(method_); }

std::string StepPlan::str() const {
  if (is_solver(method_) && spacing_ == Spacing::UniformT) return method_name() + std::to_string(count_);
  if (is_solver(method_) && spacing_ == Spacing::UniformLogSnr) return method_name() + std::to_string(count_) + "-logsnr";
  const Method implied = spacing_ == Spacing::Sections ? Method::DDPM : Method::DDIM;
  return method_ == implied ? respacing() : method_name() + ":" + respacing();
}

}  // namespace admrt
