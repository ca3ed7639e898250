// StepPlan: the one parser of step-plan strings (grammar in plan.h).
#include "plan.h"

#include <cctype>
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
         "of a, b, c steps), optionally prefixed by a method such as 'ddim:'; N a positive integer";
}

}  // namespace

Method parse_method(const std::string& name, const std::string& arg) {
  const std::string s = strip(name);
  std::string names;
  for (const auto& [method, known] : kMethods) {
    if (s == known) return method;
    names += std::string(names.empty() ? "" : " or ") + "'" + known + "'";
  }
  throw std::invalid_argument(arg + "='" + name + "': expected " + names);
}

std::string method_name(Method method) {
  for (const auto& [known, name] : kMethods)
    if (known == method) return name;
  throw std::logic_error("method_name: a Method without a row in kMethods");
}

StepPlan StepPlan::parse(const std::string& text, const std::string& arg) {
  std::string rest = strip(text);
  StepPlan plan;
  bool explicit_method = false;
  const size_t colon = rest.find(':');
  if (colon != std::string::npos) {
    try {
      plan.method_ = parse_method(rest.substr(0, colon), arg);
    } catch (const std::invalid_argument&) {
      throw std::invalid_argument(expected(arg, text));
    }
    explicit_method = true;
    rest = strip(rest.substr(colon + 1));
  }
  if (rest.rfind("ddim", 0) == 0) {
    plan.ddim_steps_ = positive(rest.substr(4));
    if (plan.ddim_steps_ < 0) throw std::invalid_argument(expected(arg, text));
    if (!explicit_method) plan.method_ = Method::DDIM;
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
  if (!explicit_method) plan.method_ = Method::DDPM;
  return plan;
}

std::string StepPlan::respacing() const {
  if (ddim_steps_ > 0) return "ddim" + std::to_string(ddim_steps_);
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
  const Method implied = ddim_steps_ > 0 ? Method::DDIM : Method::DDPM;
  return method_ == implied ? respacing() : method_name() + ":" + respacing();
}

}  // namespace admrt
