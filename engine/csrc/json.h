// A small JSON reader for package manifests and run records (libtorch ships none): null, bool,
// numbers (kept as double, and as int64 when written as an integer), strings (UTF-8, \uXXXX
// escapes), arrays, objects. Errors name the file and the byte offset.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

namespace admrt::json {

struct Value {
  enum class Type { Null, Bool, Number, String, Array, Object };
  Type type = Type::Null;
  bool boolean = false;
  double number = 0.0;
  bool is_integer = false;
  int64_t integer = 0;
  std::string string;
  std::vector<Value> array;
  std::map<std::string, Value> object;

  bool is_null() const { return type == Type::Null; }
  // Accessors that throw std::runtime_error naming `what` when the type differs.
  const Value& at(const std::string& key, const std::string& what) const;
  bool has(const std::string& key) const { return type == Type::Object && object.count(key) != 0; }
  double as_number(const std::string& what) const;
  int64_t as_int(const std::string& what) const;
  bool as_bool(const std::string& what) const;
  const std::string& as_string(const std::string& what) const;
  const std::vector<Value>& as_array(const std::string& what) const;
  const std::map<std::string, Value>& as_object(const std::string& what) const;
};

// Parses `text`; `source` names it in errors (a file path).
Value parse(const std::string& text, const std::string& source);
Value parse_file(const std::string& path);

// `s` as a JSON string literal (quotes and escapes).
std::string quote(const std::string& s);

}  // namespace admrt::json
