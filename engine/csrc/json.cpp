#include "json.h"

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <stdexcept>

namespace admrt::json {

namespace {

class Parser {
 public:
  Parser(const std::string& text, const std::string& source) : s_(text), source_(source) {}

  Value document() {
    Value v = value();
    skip_space();
    if (i_ != s_.size()) fail("trailing characters after the JSON value");
    return v;
  }

 private:
  [[noreturn]] void fail(const std::string& why) const {
    const size_t at = std::min(i_, s_.size());
    const auto end = s_.begin() + static_cast<std::ptrdiff_t>(at);
    const size_t line = 1 + static_cast<size_t>(std::count(s_.begin(), end, '\n'));
    throw std::runtime_error(source_ + ": not valid JSON at line " + std::to_string(line) + " (byte " +
                             std::to_string(at) + "): " + why);
  }
  void skip_space() {
    while (i_ < s_.size() && (s_[i_] == ' ' || s_[i_] == '\n' || s_[i_] == '\r' || s_[i_] == '\t')) ++i_;
  }
  bool take(const char* word) {
    size_t n = std::char_traits<char>::length(word);
    if (s_.compare(i_, n, word) == 0) {
      i_ += n;
      return true;
    }
    return false;
  }
  void expect(char c) {
    skip_space();
    if (i_ >= s_.size() || s_[i_] != c) fail(std::string("expected '") + c + "'");
    ++i_;
  }

  // Arrays and objects nest at most kMaxDepth deep: the reader recurses once per level, and a
  // hostile file of 20000 '[' would otherwise overflow the stack.
  struct Nested {
    explicit Nested(Parser& p) : p_(p) {
      if (++p_.depth_ > kMaxDepth) p_.fail("nested deeper than " + std::to_string(kMaxDepth) + " levels");
    }
    ~Nested() { --p_.depth_; }
    Parser& p_;
  };

  Value value() {
    skip_space();
    if (i_ >= s_.size()) fail("unexpected end");
    Value v;
    char c = s_[i_];
    if (c == '{' || c == '[') {
      Nested level(*this);
      return c == '{' ? object() : array();
    }
    if (c == '"') {
      v.type = Value::Type::String;
      v.string = string();
      return v;
    }
    if (take("true")) { v.type = Value::Type::Bool; v.boolean = true; return v; }
    if (take("false")) { v.type = Value::Type::Bool; return v; }
    if (take("null")) return v;
    // Python's json writes these for non-finite floats.
    if (take("NaN")) { v.type = Value::Type::Number; v.number = NAN; return v; }
    if (take("Infinity")) { v.type = Value::Type::Number; v.number = INFINITY; return v; }
    if (take("-Infinity")) { v.type = Value::Type::Number; v.number = -INFINITY; return v; }
    return number();
  }

  Value object() {
    Value v;
    v.type = Value::Type::Object;
    ++i_;
    skip_space();
    if (i_ < s_.size() && s_[i_] == '}') {
      ++i_;
      return v;
    }
    while (true) {
      skip_space();
      if (i_ >= s_.size() || s_[i_] != '"') fail("expected a string key");
      std::string key = string();
      expect(':');
      Value item = value();
      if (!v.object.count(key)) v.keys.push_back(key);  // a repeated key: the last value, as Python's json
      v.object[key] = std::move(item);
      skip_space();
      if (i_ < s_.size() && s_[i_] == ',') { ++i_; continue; }
      expect('}');
      return v;
    }
  }

  Value array() {
    Value v;
    v.type = Value::Type::Array;
    ++i_;
    skip_space();
    if (i_ < s_.size() && s_[i_] == ']') {
      ++i_;
      return v;
    }
    while (true) {
      v.array.push_back(value());
      skip_space();
      if (i_ < s_.size() && s_[i_] == ',') { ++i_; continue; }
      expect(']');
      return v;
    }
  }

  // JSON's number grammar: -?(0|[1-9][0-9]*)(.[0-9]+)?([eE][+-]?[0-9]+)?
  Value number() {
    const size_t start = i_;
    auto digits = [&] {
      const size_t from = i_;
      while (i_ < s_.size() && s_[i_] >= '0' && s_[i_] <= '9') ++i_;
      return i_ - from;
    };
    if (i_ < s_.size() && s_[i_] == '-') ++i_;
    const size_t int_start = i_;
    if (digits() == 0) { i_ = start; fail("expected a value"); }
    if (s_[int_start] == '0' && i_ - int_start > 1) { i_ = start; fail("bad number (a leading zero)"); }
    bool integer = true;
    if (i_ < s_.size() && s_[i_] == '.') {
      integer = false;
      ++i_;
      if (digits() == 0) fail("bad number (no digits after '.')");
    }
    if (i_ < s_.size() && (s_[i_] == 'e' || s_[i_] == 'E')) {
      integer = false;
      ++i_;
      if (i_ < s_.size() && (s_[i_] == '+' || s_[i_] == '-')) ++i_;
      if (digits() == 0) fail("bad number (no exponent digits)");
    }
    const std::string text = s_.substr(start, i_ - start);
    Value v;
    v.type = Value::Type::Number;
    // from_chars: no locale (strtod would read "0.5" as 0 under a comma-decimal locale)
    auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), v.number);
    if (ec == std::errc::result_out_of_range) {
      // Underflow reads as 0 (as Python's float()); overflow is refused rather than read as inf.
      const size_t e = text.find_first_of("eE");
      if (e != std::string::npos && text[e + 1] == '-') {
        v.number = text[0] == '-' ? -0.0 : 0.0;
      } else {
        i_ = start;
        fail("number " + text.substr(0, 40) + " is beyond the range of a double");
      }
    } else if (ec != std::errc() || end != text.data() + text.size()) {
      i_ = start;
      fail("bad number '" + text.substr(0, 40) + "'");
    }
    if (integer) {
      errno = 0;
      long long n = std::strtoll(text.c_str(), nullptr, 10);
      if (errno == 0) {
        v.is_integer = true;
        v.integer = n;
      }
    }
    return v;
  }

  std::string string() {
    ++i_;  // opening quote
    std::string out;
    while (true) {
      if (i_ >= s_.size()) fail("unterminated string");
      const size_t at = i_;
      char c = s_[i_++];
      if (c == '"') return out;
      if (static_cast<unsigned char>(c) < 0x20) { i_ = at; fail("a control character inside a string"); }
      if (static_cast<unsigned char>(c) >= 0x80) { i_ = at; utf8_char(out); continue; }
      if (c != '\\') { out.push_back(c); continue; }
      if (i_ >= s_.size()) fail("unterminated escape");
      char e = s_[i_++];
      switch (e) {
        case '"': out.push_back('"'); break;
        case '\\': out.push_back('\\'); break;
        case '/': out.push_back('/'); break;
        case 'b': out.push_back('\b'); break;
        case 'f': out.push_back('\f'); break;
        case 'n': out.push_back('\n'); break;
        case 'r': out.push_back('\r'); break;
        case 't': out.push_back('\t'); break;
        case 'u': {
          uint32_t cp = hex4();
          if (cp >= 0xDC00 && cp <= 0xDFFF) fail("a lone surrogate \\u escape (not UTF-8 text)");
          if (cp >= 0xD800 && cp < 0xDC00) {
            if (!take("\\u")) fail("a lone surrogate \\u escape (not UTF-8 text)");
            const uint32_t low = hex4();
            if (low < 0xDC00 || low > 0xDFFF) fail("bad surrogate pair");
            cp = 0x10000 + ((cp - 0xD800) << 10) + (low - 0xDC00);
          }
          append_utf8(out, cp);
          break;
        }
        default: fail(std::string("bad escape \\") + e);
      }
    }
  }
  // One UTF-8 encoded character at i_ (a lead byte >= 0x80), checked and appended to `out`.
  void utf8_char(std::string& out) {
    const unsigned char lead = static_cast<unsigned char>(s_[i_]);
    int n;
    uint32_t cp, min;
    if (lead >= 0xC2 && lead <= 0xDF) { n = 1; cp = lead & 0x1F; min = 0x80; }
    else if (lead >= 0xE0 && lead <= 0xEF) { n = 2; cp = lead & 0x0F; min = 0x800; }
    else if (lead >= 0xF0 && lead <= 0xF4) { n = 3; cp = lead & 0x07; min = 0x10000; }
    else fail("not UTF-8 text");
    if (s_.size() - i_ <= static_cast<size_t>(n)) fail("not UTF-8 text (a truncated character)");
    for (int k = 1; k <= n; ++k) {
      const unsigned char b = static_cast<unsigned char>(s_[i_ + k]);
      if ((b & 0xC0) != 0x80) fail("not UTF-8 text");
      cp = (cp << 6) | (b & 0x3F);
    }
    if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) fail("not UTF-8 text");
    out.append(s_, i_, static_cast<size_t>(n) + 1);
    i_ += static_cast<size_t>(n) + 1;
  }

  uint32_t hex4() {
    if (i_ + 4 > s_.size()) fail("short \\u escape");
    uint32_t v = 0;
    for (int k = 0; k < 4; ++k) {
      char c = s_[i_++];
      v <<= 4;
      if (c >= '0' && c <= '9') v |= c - '0';
      else if (c >= 'a' && c <= 'f') v |= c - 'a' + 10;
      else if (c >= 'A' && c <= 'F') v |= c - 'A' + 10;
      else fail("bad \\u escape");
    }
    return v;
  }
  static void append_utf8(std::string& out, uint32_t cp) {
    if (cp < 0x80) {
      out.push_back(static_cast<char>(cp));
    } else if (cp < 0x800) {
      out.push_back(static_cast<char>(0xC0 | (cp >> 6)));
      out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
    } else if (cp < 0x10000) {
      out.push_back(static_cast<char>(0xE0 | (cp >> 12)));
      out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
      out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
    } else {
      out.push_back(static_cast<char>(0xF0 | (cp >> 18)));
      out.push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
      out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
      out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
    }
  }

  static constexpr int kMaxDepth = 256;
  const std::string& s_;
  const std::string& source_;
  size_t i_ = 0;
  int depth_ = 0;
};

// `v` in a few words for an error: a number or a short string as written, else its kind.
std::string brief(const Value& v) {
  using T = Value::Type;
  switch (v.type) {
    case T::Null: return "null";
    case T::Bool: return v.boolean ? "true" : "false";
    case T::Number: return v.is_integer ? std::to_string(v.integer) : number_text(v.number);
    case T::String: return v.string.size() <= 40 ? quote(v.string) : quote(v.string.substr(0, 40)) + "...";
    case T::Array: return "an array";
    case T::Object: return "an object";
  }
  return "?";
}

[[noreturn]] void wrong(const std::string& what, const char* expected, const Value& got) {
  throw std::runtime_error(what + ": expected " + expected + ", got " + brief(got));
}

}  // namespace

const Value& Value::at(const std::string& key, const std::string& what) const {
  if (type != Type::Object) wrong(what, "an object", *this);
  auto it = object.find(key);
  if (it == object.end()) throw std::runtime_error(what + ": has no '" + key + "'");
  return it->second;
}
double Value::as_number(const std::string& what) const {
  if (type != Type::Number) wrong(what, "a number", *this);
  return number;
}
int64_t Value::as_int(const std::string& what) const {
  if (type != Type::Number || !is_integer) wrong(what, "an integer", *this);
  return integer;
}
bool Value::as_bool(const std::string& what) const {
  if (type != Type::Bool) wrong(what, "true or false", *this);
  return boolean;
}
const std::string& Value::as_string(const std::string& what) const {
  if (type != Type::String) wrong(what, "a string", *this);
  return string;
}
const std::vector<Value>& Value::as_array(const std::string& what) const {
  if (type != Type::Array) wrong(what, "an array", *this);
  return array;
}
const std::map<std::string, Value>& Value::as_object(const std::string& what) const {
  if (type != Type::Object) wrong(what, "an object", *this);
  return object;
}

Value& Value::set(const std::string& key, Value value) {
  if (type != Type::Object) wrong("json::Value::set", "an object", *this);
  if (!object.count(key)) {
    if (keys.size() != object.size()) keys = ordered_keys();
    keys.push_back(key);
  }
  object[key] = std::move(value);
  return *this;
}

std::vector<std::string> Value::ordered_keys() const {
  if (keys.size() == object.size()) {
    bool same = true;
    for (const std::string& k : keys) same = same && object.count(k);
    if (same) return keys;
  }
  std::vector<std::string> out;
  for (const auto& kv : object) out.push_back(kv.first);
  return out;
}

Value make_null() { return Value(); }
Value make_bool(bool b) {
  Value v;
  v.type = Value::Type::Bool;
  v.boolean = b;
  return v;
}
Value make_int(int64_t i) {
  Value v;
  v.type = Value::Type::Number;
  v.number = static_cast<double>(i);
  v.is_integer = true;
  v.integer = i;
  return v;
}
Value make_number(double x) {
  Value v;
  v.type = Value::Type::Number;
  v.number = x;
  return v;
}
Value make_string(std::string s) {
  Value v;
  v.type = Value::Type::String;
  v.string = std::move(s);
  return v;
}
Value make_array(std::vector<Value> items) {
  Value v;
  v.type = Value::Type::Array;
  v.array = std::move(items);
  return v;
}
Value make_object() {
  Value v;
  v.type = Value::Type::Object;
  return v;
}

namespace {
// A bool or number as Python compares them (True == 1): exact for integers.
bool numeric(const Value& v) { return v.type == Value::Type::Number || v.type == Value::Type::Bool; }
bool same_number(const Value& a, const Value& b) {
  const bool ai = a.type == Value::Type::Bool || a.is_integer, bi = b.type == Value::Type::Bool || b.is_integer;
  const int64_t x = a.type == Value::Type::Bool ? a.boolean : a.integer;
  const int64_t y = b.type == Value::Type::Bool ? b.boolean : b.integer;
  if (ai && bi) return x == y;
  const double p = a.type == Value::Type::Bool ? a.boolean : a.is_integer ? static_cast<double>(x) : a.number;
  const double q = b.type == Value::Type::Bool ? b.boolean : b.is_integer ? static_cast<double>(y) : b.number;
  return p == q;
}
}  // namespace

bool operator==(const Value& a, const Value& b) {
  using T = Value::Type;
  if (numeric(a) && numeric(b)) return same_number(a, b);
  if (a.type != b.type) return false;
  switch (a.type) {
    case T::Null: return true;
    case T::String: return a.string == b.string;
    case T::Array: return a.array == b.array;
    case T::Object: return a.object == b.object;  // as dicts: the written order does not matter
    default: return false;
  }
}

std::string number_text(double x) {
  if (std::isnan(x)) return "nan";
  if (std::isinf(x)) return x > 0 ? "inf" : "-inf";
  // The shortest round-trip digits and exponent, then laid out as Python's float repr:
  // positional for 1e-4 <= |x| < 1e16, else d.ddde[+-]XX.
  char buf[64];
  auto [end, ec] = std::to_chars(buf, buf + sizeof buf, x, std::chars_format::scientific);
  if (ec != std::errc()) throw std::runtime_error("number_text: cannot format a number");
  const std::string sci(buf, end);                 // "-1.2345e+02"
  const size_t e = sci.find('e');
  const bool negative = sci[0] == '-';
  std::string digits;
  for (size_t i = negative; i < e; ++i)
    if (sci[i] != '.') digits.push_back(sci[i]);
  const int exp10 = std::stoi(sci.substr(e + 1));  // x = d.ddd * 10^exp10
  std::string out = negative ? "-" : "";
  if (exp10 >= -4 && exp10 < 16) {
    if (exp10 < 0) {
      out += "0." + std::string(-exp10 - 1, '0') + digits;
    } else if (static_cast<int>(digits.size()) <= exp10 + 1) {
      out += digits + std::string(exp10 + 1 - digits.size(), '0') + ".0";
    } else {
      out += digits.substr(0, exp10 + 1) + "." + digits.substr(exp10 + 1);
    }
    return out;
  }
  out += digits.substr(0, 1);
  if (digits.size() > 1) out += "." + digits.substr(1);
  char ex[16];
  std::snprintf(ex, sizeof ex, "e%c%02d", exp10 < 0 ? '-' : '+', exp10 < 0 ? -exp10 : exp10);
  return out + ex;
}

namespace {
void dump_to(std::string& out, const Value& v, int indent, int depth) {
  using T = Value::Type;
  const bool lines = indent >= 0;
  auto newline = [&](int d) {
    if (lines) out += "\n" + std::string(static_cast<size_t>(indent) * d, ' ');
  };
  switch (v.type) {
    case T::Null: out += "null"; return;
    case T::Bool: out += v.boolean ? "true" : "false"; return;
    case T::Number:
      if (v.is_integer) {
        out += std::to_string(v.integer);
      } else {
        if (!std::isfinite(v.number))
          throw std::invalid_argument("JSON: " + number_text(v.number) + ": expected a finite number");
        out += number_text(v.number);
      }
      return;
    case T::String: out += quote(v.string); return;
    case T::Array: {
      if (v.array.empty()) { out += "[]"; return; }
      out += "[";
      for (size_t i = 0; i < v.array.size(); ++i) {
        out += i ? (lines ? "," : ", ") : "";
        newline(depth + 1);
        dump_to(out, v.array[i], indent, depth + 1);
      }
      newline(depth);
      out += "]";
      return;
    }
    case T::Object: {
      if (v.object.empty()) { out += "{}"; return; }
      out += "{";
      bool first = true;
      for (const std::string& key : v.ordered_keys()) {
        out += first ? "" : (lines ? "," : ", ");
        first = false;
        newline(depth + 1);
        out += quote(key) + ": ";
        dump_to(out, v.object.at(key), indent, depth + 1);
      }
      newline(depth);
      out += "}";
      return;
    }
  }
}
}  // namespace

std::string dump(const Value& v, int indent) {
  std::string out;
  dump_to(out, v, indent, 0);
  return out;
}

Value parse(const std::string& text, const std::string& source) { return Parser(text, source).document(); }

Value parse_file(const std::string& path) {
  // Manifests and run records are a few KB; a larger file is not one (and is not read whole).
  constexpr std::uintmax_t kMaxBytes = 64ull << 20;
  std::error_code ec;
  const std::uintmax_t size = std::filesystem::file_size(path, ec);
  if (!ec && size > kMaxBytes)
    throw std::runtime_error(path + ": " + std::to_string(size) + " bytes; expected a JSON file of at most 64 MiB");
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error(path + ": cannot be read");
  std::stringstream ss;
  ss << in.rdbuf();
  if (in.bad()) throw std::runtime_error(path + ": cannot be read");
  return parse(ss.str(), path);
}

std::string quote(const std::string& s) {
  std::string out = "\"";
  for (unsigned char c : s) {
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      default:
        if (c < 0x20) {
          char buf[8];
          std::snprintf(buf, sizeof buf, "\\u%04x", c);
          out += buf;
        } else {
          out.push_back(static_cast<char>(c));
        }
    }
  }
  return out + "\"";
}

}  // namespace admrt::json
