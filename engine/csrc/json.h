// A small JSON module for package manifests and run records (libtorch ships none): null, bool,
// numbers (kept as double, and as int64 when written as an integer), strings (UTF-8, \uXXXX
// escapes), arrays, objects (their keys also kept in written order). Reading errors name the file
// and the byte offset. Writing follows Python's json.dumps(indent=...) (floats as Python's repr:
// shortest round trip, "1.0" for integral values); equality follows Python's == on what
// json.loads returns (1 == 1.0, objects compared as dicts).
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
  std::vector<std::string> keys;  // the object's keys in written order (parse, set)

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
  // Object building: sets `key` (appended to the written order when new); returns *this.
  Value& set(const std::string& key, Value value);
  // The object's keys in written order (map order for an object built without set()).
  std::vector<std::string> ordered_keys() const;
};

Value make_null();
Value make_bool(bool b);
Value make_int(int64_t i);
Value make_number(double x);
Value make_string(std::string s);
Value make_array(std::vector<Value> items = {});
Value make_object();

// Deep equality as Python's == on the parsed values (numbers by value: 1 == 1.0, true == 1).
bool operator==(const Value& a, const Value& b);
inline bool operator!=(const Value& a, const Value& b) { return !(a == b); }

// Parses `text`; `source` names it in errors (a file path).
Value parse(const std::string& text, const std::string& source);
Value parse_file(const std::string& path);

// `s` as a JSON string literal (quotes and escapes).
std::string quote(const std::string& s);

// A float as Python's repr writes it: the shortest text that reads back to `x` ("0.1", "1e-05",
// "1e+16"), with ".0" for integral values ("2.0"); "nan", "inf", "-inf" for non-finite values.
std::string number_text(double x);

// `v` as JSON text, as Python's json.dumps(v, indent=indent) writes it (indent < 0: one line with
// ", " and ": " separators, as json.dumps(v)). Throws std::invalid_argument for a non-finite number.
std::string dump(const Value& v, int indent = -1);

}  // namespace admrt::json
