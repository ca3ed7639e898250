#include "npz.h"

#include <algorithm>
#include <charconv>
#include <climits>
#include <array>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <map>
#include <filesystem>
#include <fstream>
#include <functional>
#include <sstream>
#include <stdexcept>

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>

namespace admrt {
namespace {

// CRC-32 of zip, continued from `crc` (0 for a new one).
uint32_t crc32(const char* data, size_t n, uint32_t crc = 0) {
  static const std::array<uint32_t, 256> table = [] {
    std::array<uint32_t, 256> t{};
    for (uint32_t i = 0; i < 256; ++i) {
      uint32_t c = i;
      for (int k = 0; k < 8; ++k) c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
      t[i] = c;
    }
    return t;
  }();
  uint32_t c = crc ^ 0xFFFFFFFFu;
  for (size_t i = 0; i < n; ++i) c = table[(c ^ static_cast<uint8_t>(data[i])) & 0xFF] ^ (c >> 8);
  return c ^ 0xFFFFFFFFu;
}

void put16(std::string& s, uint16_t v) {
  s.push_back(static_cast<char>(v & 0xFF));
  s.push_back(static_cast<char>(v >> 8));
}
void put32(std::string& s, uint32_t v) {
  for (int i = 0; i < 4; ++i) s.push_back(static_cast<char>((v >> (8 * i)) & 0xFF));
}
void put64(std::string& s, uint64_t v) {
  for (int i = 0; i < 8; ++i) s.push_back(static_cast<char>((v >> (8 * i)) & 0xFF));
}
uint64_t get(const std::string& s, uint64_t at, int bytes, const std::string& path) {
  if (at > s.size() || static_cast<uint64_t>(bytes) > s.size() - at) throw std::runtime_error(path + ": damaged .npz (truncated)");
  uint64_t v = 0;
  for (int i = bytes - 1; i >= 0; --i) v = (v << 8) | static_cast<uint8_t>(s[at + i]);
  return v;
}

const char* descr_of(at::ScalarType t) {
  switch (t) {
    case at::kByte: return "|u1";
    case at::kLong: return "<i8";
    case at::kInt: return "<i4";
    case at::kFloat: return "<f4";
    case at::kDouble: return "<f8";
    default: throw std::invalid_argument(std::string("write_npz: unsupported dtype ") + c10::toString(t));
  }
}

// At most 40 characters of header text for an error line: control and non-ASCII bytes as '?'.
std::string shown(const std::string& text) {
  std::string out = text.substr(0, 40);
  for (char& c : out)
    if (static_cast<unsigned char>(c) < 0x20 || static_cast<unsigned char>(c) >= 0x7F) c = '?';
  return out + (text.size() > 40 ? "..." : "");
}

at::ScalarType dtype_of(const std::string& descr, const std::string& path) {
  if (descr == "|u1") return at::kByte;
  if (descr == "<i8") return at::kLong;
  if (descr == "<i4") return at::kInt;
  if (descr == "<f4") return at::kFloat;
  if (descr == "<f8") return at::kDouble;
  throw std::runtime_error(path + ": array dtype '" + shown(descr) + "' is not supported; expected |u1, <i4, <i8, <f4 or <f8");
}

// The .npy header of `a` (format 1.0); the array's bytes follow it.
std::string npy_header(const at::Tensor& a) {
  std::string shape = "(";
  for (int64_t d = 0; d < a.dim(); ++d) shape += std::to_string(a.size(d)) + (a.dim() == 1 ? "," : d + 1 < a.dim() ? ", " : "");
  shape += ")";
  std::string header = std::string("{'descr': '") + descr_of(a.scalar_type()) +
                       "', 'fortran_order': False, 'shape': " + shape + ", }";
  const size_t unpadded = 10 + header.size() + 1;
  header.append((64 - unpadded % 64) % 64, ' ');
  header.push_back('\n');
  std::string out("\x93NUMPY\x01\x00", 8);
  put16(out, static_cast<uint16_t>(header.size()));
  return out + header;
}

// Writes `path` through a temporary file beside it (write(out) fills it), renamed into place
// when complete.
// An output stream over a file descriptor (writes go straight to write(2); errors set badbit and
// keep errno).
class FdBuf final : public std::streambuf {
 public:
  explicit FdBuf(int fd) : fd_(fd) {}
  int error = 0;  // errno of the first failed write

 protected:
  std::streamsize xsputn(const char* data, std::streamsize n) override {
    std::streamsize done = 0;
    while (done < n) {
      const ssize_t w = ::write(fd_, data + done, static_cast<size_t>(n - done));
      if (w < 0 && errno == EINTR) continue;
      if (w <= 0) {
        error = w < 0 ? errno : EIO;
        return done;
      }
      done += w;
    }
    return done;
  }
  int_type overflow(int_type c) override {
    if (traits_type::eq_int_type(c, traits_type::eof())) return traits_type::not_eof(c);
    const char ch = traits_type::to_char_type(c);
    return xsputn(&ch, 1) == 1 ? c : traits_type::eof();
  }

 private:
  int fd_;
};

void write_atomic_with(const std::string& path, const std::function<void(std::ostream&)>& write) {
  namespace fs = std::filesystem;
  const fs::path target(path);
  if (target.has_parent_path()) fs::create_directories(target.parent_path());
  // The temporary file is made anew and never opened through a link planted at its name (another
  // user's link in OUT would otherwise have its target truncated and written).
  const fs::path tmp = target.parent_path() / ("." + target.filename().string() + ".tmp");
  std::error_code ec;
  fs::remove(tmp, ec);  // a stale file or link of that name (remove never follows a link)
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0644);
  if (fd < 0) throw std::runtime_error(path + ": could not be written: " + std::strerror(errno));
  FdBuf buf(fd);
  std::ostream out(&buf);
  try {
    write(out);
  } catch (...) {
    ::close(fd);
    fs::remove(tmp, ec);
    throw;
  }
  int error = out ? 0 : (buf.error ? buf.error : EIO);
  if (::close(fd) != 0 && error == 0) error = errno;
  if (error != 0) {
    fs::remove(tmp, ec);
    throw std::runtime_error(path + ": could not be written: " + std::strerror(error));
  }
  fs::rename(tmp, target, ec);
  if (ec) {
    fs::remove(tmp, ec);
    throw std::runtime_error(path + ": could not be written: " + ec.message());
  }
}

size_t itemsize_of(at::ScalarType t) { return t == at::kByte ? 1 : t == at::kInt || t == at::kFloat ? 4 : 8; }

// The value text of `key` in a .npy header ("{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }"):
// what follows "'key':" up to the next top-level ',' or '}'.
std::string header_field(const std::string& header, const std::string& key, const std::string& path) {
  const std::string quoted = "'" + key + "'";
  const size_t k = header.find(quoted);
  if (k == std::string::npos || header.find(quoted, k + 1) != std::string::npos)
    throw std::runtime_error(path + ": damaged .npy header (expected one '" + key + "')");
  size_t i = k + quoted.size();
  while (i < header.size() && header[i] == ' ') ++i;
  if (i >= header.size() || header[i] != ':') throw std::runtime_error(path + ": damaged .npy header (" + key + ")");
  ++i;
  while (i < header.size() && header[i] == ' ') ++i;
  const size_t start = i;
  int parens = 0;
  for (; i < header.size(); ++i) {
    const char c = header[i];
    if (c == '(') ++parens;
    else if (c == ')') --parens;
    else if ((c == ',' || c == '}') && parens <= 0) break;
  }
  size_t end = i;
  while (end > start && header[end - 1] == ' ') --end;
  return header.substr(start, end - start);
}

// One .npy array of `size` bytes at `at` in `s`. Every size the header declares is checked against
// the bytes present before anything is allocated.
at::Tensor parse_npy(const std::string& s, size_t at, size_t size, const std::string& path) {
  auto damaged = [&](const std::string& why) { return std::runtime_error(path + ": damaged .npy data (" + why + ")"); };
  if (size < 10 || s.compare(at, 6, "\x93NUMPY") != 0)
    throw std::runtime_error(path + ": damaged .npz (not .npy data)");
  const int major = static_cast<uint8_t>(s[at + 6]);
  if (major < 1 || major > 3) throw damaged("format version " + std::to_string(major) + "; expected 1, 2 or 3");
  const size_t offset = major == 1 ? 10 : 12;
  if (size < offset) throw damaged("truncated header");
  const uint64_t header_len = get(s, at + 8, major == 1 ? 2 : 4, path);
  if (header_len > size - offset)
    throw damaged("header of " + std::to_string(header_len) + " bytes past the member's end");
  const std::string header = s.substr(at + offset, header_len);
  std::string descr = header_field(header, "descr", path);
  if (descr.size() < 2 || (descr.front() != '\'' && descr.front() != '"') || descr.back() != descr.front())
    throw damaged("descr " + shown(descr) + "; expected a quoted dtype");
  descr = descr.substr(1, descr.size() - 2);
  const at::ScalarType dtype = dtype_of(descr, path);
  const std::string fortran = header_field(header, "fortran_order", path);
  if (fortran == "True") throw std::runtime_error(path + ": Fortran-ordered arrays are not supported");
  if (fortran != "False") throw damaged("fortran_order " + shown(fortran) + "; expected True or False");
  const std::string shape_text = header_field(header, "shape", path);
  if (shape_text.size() < 2 || shape_text.front() != '(' || shape_text.back() != ')')
    throw damaged("shape " + shown(shape_text) + "; expected a tuple");
  std::vector<int64_t> shape;
  uint64_t count = 1;
  bool overflow = false;
  std::stringstream ss(shape_text.substr(1, shape_text.size() - 2));
  std::string item;
  while (std::getline(ss, item, ',')) {
    const size_t b = item.find_first_not_of(' '), e = item.find_last_not_of(' ');
    if (b == std::string::npos) continue;  // the trailing comma of (n,)
    const std::string digits = item.substr(b, e - b + 1);
    uint64_t d = 0;
    auto [end, ec] = std::from_chars(digits.data(), digits.data() + digits.size(), d);
    if (ec != std::errc() || end != digits.data() + digits.size() || digits[0] == '+' ||
        d > static_cast<uint64_t>(INT64_MAX))
      throw damaged("shape " + shown(shape_text) + "; expected sizes >= 0");
    if (shape.size() == 32) throw damaged("shape of more than 32 dimensions");
    shape.push_back(static_cast<int64_t>(d));
    overflow = overflow || __builtin_mul_overflow(count, d, &count);
  }
  uint64_t nbytes = 0;
  overflow = overflow || __builtin_mul_overflow(count, static_cast<uint64_t>(itemsize_of(dtype)), &nbytes);
  const uint64_t present = size - offset - header_len;
  if (overflow || nbytes != present)
    throw damaged("shape " + shown(shape_text) + " of '" + shown(descr) + "' needs " +
                  (overflow ? std::string("more than 2^64") : std::to_string(nbytes)) + " bytes; the member holds " +
                  std::to_string(present));
  at::Tensor t = at::empty(shape, at::TensorOptions().dtype(dtype));
  if (nbytes) std::memcpy(t.data_ptr(), s.data() + at + offset + header_len, nbytes);
  return t;
}

}  // namespace

namespace {
void write_npz_impl(const std::string& path, const std::vector<at::Tensor>& arrays, bool force_zip64) {
  constexpr uint64_t kMax32 = 0xFFFFFFFFull;
  struct Entry {
    at::Tensor array;
    std::string name, header;
    uint64_t size = 0, offset = 0;
    uint32_t crc = 0;
    bool zip64 = false;
  };
  std::vector<Entry> entries;
  uint64_t offset = 0;
  for (size_t i = 0; i < arrays.size(); ++i) {
    Entry e;
    e.array = arrays[i].cpu().contiguous();
    e.name = "arr_" + std::to_string(i) + ".npy";
    e.header = npy_header(e.array);
    e.size = e.header.size() + e.array.nbytes();
    e.crc = crc32(static_cast<const char*>(e.array.data_ptr()), e.array.nbytes(),
                  crc32(e.header.data(), e.header.size()));
    e.offset = offset;
    // zip64 (as Python's zipfile writes it) for a member or an offset past 32 bits.
    e.zip64 = force_zip64 || e.size >= kMax32 || e.offset >= kMax32;
    offset += 30 + e.name.size() + (e.zip64 ? 20 : 0) + e.size;
    entries.push_back(std::move(e));
  }
  std::string central;
  for (const Entry& e : entries) {
    const uint32_t size32 = e.zip64 ? static_cast<uint32_t>(kMax32) : static_cast<uint32_t>(e.size);
    put32(central, 0x02014b50);
    put16(central, e.zip64 ? 45 : 20);  // version made by
    put16(central, e.zip64 ? 45 : 20);  // version needed
    put16(central, 0);  // flags
    put16(central, 0);  // stored
    put16(central, 0);  // time
    put16(central, 0x21);  // date 1980-01-01
    put32(central, e.crc);
    put32(central, size32);
    put32(central, size32);
    put16(central, static_cast<uint16_t>(e.name.size()));
    put16(central, e.zip64 ? 28 : 0);  // extra: zip64 sizes and offset
    put16(central, 0);  // comment
    put16(central, 0);  // disk
    put16(central, 0);  // internal attributes
    put32(central, 0);  // external attributes
    put32(central, e.zip64 ? static_cast<uint32_t>(kMax32) : static_cast<uint32_t>(e.offset));
    central += e.name;
    if (e.zip64) {
      put16(central, 1);
      put16(central, 24);
      put64(central, e.size);
      put64(central, e.size);
      put64(central, e.offset);
    }
  }
  const uint64_t cd_offset = offset;
  const bool zip64 = force_zip64 || cd_offset >= kMax32 ||
                     std::any_of(entries.begin(), entries.end(), [](const Entry& e) { return e.zip64; });
  std::string end;
  if (zip64) {
    put32(end, 0x06064b50);  // zip64 end of central directory record
    put64(end, 44);
    put16(end, 45);
    put16(end, 45);
    put32(end, 0);
    put32(end, 0);
    put64(end, entries.size());
    put64(end, entries.size());
    put64(end, central.size());
    put64(end, cd_offset);
    put32(end, 0x07064b50);  // its locator
    put32(end, 0);
    put64(end, cd_offset + central.size());
    put32(end, 1);
  }
  put32(end, 0x06054b50);
  put16(end, 0);
  put16(end, 0);
  put16(end, zip64 ? 0xFFFF : static_cast<uint16_t>(entries.size()));
  put16(end, zip64 ? 0xFFFF : static_cast<uint16_t>(entries.size()));
  put32(end, zip64 ? static_cast<uint32_t>(kMax32) : static_cast<uint32_t>(central.size()));
  put32(end, zip64 ? static_cast<uint32_t>(kMax32) : static_cast<uint32_t>(cd_offset));
  put16(end, 0);

  write_atomic_with(path, [&](std::ostream& out) {
    for (const Entry& e : entries) {
      std::string local;
      const uint32_t size32 = e.zip64 ? static_cast<uint32_t>(kMax32) : static_cast<uint32_t>(e.size);
      put32(local, 0x04034b50);
      put16(local, e.zip64 ? 45 : 20);  // version needed
      put16(local, 0);
      put16(local, 0);
      put16(local, 0);
      put16(local, 0x21);
      put32(local, e.crc);
      put32(local, size32);
      put32(local, size32);
      put16(local, static_cast<uint16_t>(e.name.size()));
      put16(local, e.zip64 ? 20 : 0);
      local += e.name;
      if (e.zip64) {
        put16(local, 1);
        put16(local, 16);
        put64(local, e.size);
        put64(local, e.size);
      }
      local += e.header;
      out.write(local.data(), static_cast<std::streamsize>(local.size()));
      out.write(static_cast<const char*>(e.array.data_ptr()), static_cast<std::streamsize>(e.array.nbytes()));
    }
    out.write(central.data(), static_cast<std::streamsize>(central.size()));
    out.write(end.data(), static_cast<std::streamsize>(end.size()));
  });
}

}  // namespace

void write_npz(const std::string& path, const std::vector<at::Tensor>& arrays) { write_npz_impl(path, arrays, false); }
void write_npz_zip64(const std::string& path, const std::vector<at::Tensor>& arrays) {
  write_npz_impl(path, arrays, true);
}

void write_atomic(const std::string& path, const std::string& bytes) {
  write_atomic_with(path, [&](std::ostream& out) { out.write(bytes.data(), static_cast<std::streamsize>(bytes.size())); });
}

std::vector<at::Tensor> read_npz(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error(path + ": cannot be read");
  std::stringstream buf;
  buf << in.rdbuf();
  const std::string s = buf.str();
  // End of central directory: the last 0x06054b50 signature.
  size_t eocd = std::string::npos;
  if (s.size() >= 22)
    for (size_t i = s.size() - 21; i-- > 0;)
      if (get(s, i, 4, path) == 0x06054b50) { eocd = i; break; }
  if (eocd == std::string::npos) throw std::runtime_error(path + ": damaged .npz (not a zip file)");
  uint64_t count = get(s, eocd + 10, 2, path);
  uint64_t at = get(s, eocd + 16, 4, path);
  // zip64: the locator just before the end record points to the zip64 end record.
  if (eocd >= 20 && get(s, eocd - 20, 4, path) == 0x07064b50) {
    const uint64_t record = get(s, eocd - 20 + 8, 8, path);
    if (get(s, record, 4, path) != 0x06064b50) throw std::runtime_error(path + ": damaged .npz (zip64 end record)");
    count = get(s, record + 32, 8, path);
    at = get(s, record + 48, 8, path);
  }
  std::map<std::string, at::Tensor> by_name;
  for (uint64_t e = 0; e < count; ++e) {
    if (get(s, at, 4, path) != 0x02014b50) throw std::runtime_error(path + ": damaged .npz (central directory)");
    const uint64_t method = get(s, at + 10, 2, path);
    uint64_t size = get(s, at + 20, 4, path);
    const uint64_t name_len = get(s, at + 28, 2, path), extra_len = get(s, at + 30, 2, path),
                   comment_len = get(s, at + 32, 2, path);
    if (at + 46 + name_len + extra_len > s.size()) throw std::runtime_error(path + ": damaged .npz (truncated)");
    uint64_t local = get(s, at + 42, 4, path);
    const std::string name = s.substr(at + 46, name_len);
    // zip64 extra field: the 64-bit sizes / offset in the order of the fields that overflowed.
    for (uint64_t x = at + 46 + name_len; x + 4 <= at + 46 + name_len + extra_len;) {
      const uint64_t id = get(s, x, 2, path), len = get(s, x + 2, 2, path);
      if (id == 1) {
        uint64_t f = x + 4;
        if (get(s, at + 24, 4, path) == 0xFFFFFFFFu) f += 8;  // uncompressed size
        if (size == 0xFFFFFFFFu) { size = get(s, f, 8, path); f += 8; }
        if (local == 0xFFFFFFFFu) local = get(s, f, 8, path);
      }
      x += 4 + len;
    }
    if (method != 0) throw std::runtime_error(path + ": compressed .npz (np.savez_compressed) is not supported");
    if (get(s, local, 4, path) != 0x04034b50) throw std::runtime_error(path + ": damaged .npz (local header)");
    const uint64_t data_at = local + 30 + get(s, local + 26, 2, path) + get(s, local + 28, 2, path);
    if (data_at > s.size() || size > s.size() - data_at) throw std::runtime_error(path + ": damaged .npz (truncated)");
    if (name.size() > 4 && name.substr(name.size() - 4) == ".npy")
      by_name[name.substr(0, name.size() - 4)] = parse_npy(s, data_at, size, path);
    at += 46 + name_len + extra_len + comment_len;
  }
  std::vector<at::Tensor> arrays;
  for (size_t i = 0; by_name.count("arr_" + std::to_string(i)); ++i) arrays.push_back(by_name["arr_" + std::to_string(i)]);
  if (arrays.empty()) throw std::runtime_error(path + ": holds no arr_0");
  return arrays;
}

}  // namespace admrt
