#include "core/mapped_file.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

namespace dk {

namespace {

// Opens `path` for reading only if it is a regular file: a FIFO, a device or a folder is refused
// before open() (which would block on a FIFO with no writer), and checked again on the descriptor
// (the path may have changed in between). Returns the descriptor and its size.
StatusOr<int> OpenRegularFile(const std::string& path, size_t* size) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) {
    const int err = errno;
    return Status(err == ENOENT ? Code::kNotFound : Code::kIoError, path + ": cannot open: " + std::strerror(err));
  }
  if (!S_ISREG(st.st_mode))
    return IoError(path + ": not a regular file" + (S_ISDIR(st.st_mode) ? " (a folder)" : S_ISFIFO(st.st_mode) ? " (a pipe)" : ""));
  const int fd = ::open(path.c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC);
  if (fd < 0) {
    const int err = errno;
    return Status(err == ENOENT ? Code::kNotFound : Code::kIoError, path + ": cannot open: " + std::strerror(err));
  }
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    return IoError(path + ": not a regular file");
  }
  *size = static_cast<size_t>(st.st_size);
  return fd;
}

}  // namespace

StatusOr<std::unique_ptr<MappedFile>> MappedFile::Open(const std::string& path) {
  size_t size = 0;
  int fd;
  DK_ASSIGN_OR_RETURN(fd, OpenRegularFile(path, &size));
  std::unique_ptr<MappedFile> file(new MappedFile());
  file->path_ = path;
  file->size_ = size;
  if (file->size_ > 0) {
    void* p = ::mmap(nullptr, file->size_, PROT_READ, MAP_PRIVATE, fd, 0);
    if (p == MAP_FAILED) {
      const int err = errno;
      ::close(fd);
      return IoError(path + ": mmap failed: " + std::strerror(err));
    }
    file->data_ = static_cast<const uint8_t*>(p);
  }
  ::close(fd);
  return file;
}

std::unique_ptr<MappedFile> MappedFile::View(const uint8_t* data, size_t size, const std::string& name) {
  std::unique_ptr<MappedFile> view(new MappedFile());
  view->data_ = size > 0 ? data : nullptr;
  view->size_ = size;
  view->owned_ = false;
  view->path_ = name;
  return view;
}

MappedFile::~MappedFile() {
  if (owned_ && data_ != nullptr) ::munmap(const_cast<uint8_t*>(data_), size_);
}

namespace {

Status WriteAll(int fd, const void* bytes, size_t size, const std::string& what) {
  const auto* p = static_cast<const uint8_t*>(bytes);
  size_t left = size;
  while (left > 0) {
    const ssize_t w = ::write(fd, p, left);
    if (w < 0) {
      if (errno == EINTR) continue;
      return IoError(what + ": write failed: " + std::strerror(errno));
    }
    p += w;
    left -= static_cast<size_t>(w);
  }
  return Status::Ok();
}

std::string FolderOf(const std::string& path) {
  const size_t slash = path.find_last_of('/');
  return slash == std::string::npos ? "." : (slash == 0 ? "/" : path.substr(0, slash));
}

// A name that exists must be a regular file (or a link to one): writing replaces it.
Status CheckExistingName(const std::string& path) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0 || S_ISREG(st.st_mode)) return Status::Ok();
  if (S_ISDIR(st.st_mode)) return IoError(path + ": is a folder, not a file name");
  const bool device = S_ISCHR(st.st_mode) || S_ISBLK(st.st_mode);
  return IoError(path + ": exists and is not a regular file (" +
                 (S_ISFIFO(st.st_mode) ? "a pipe" : device ? "a device" : "a special file") +
                 "); dynakv writes regular files only");
}

}  // namespace

Status CheckWritableFile(const std::string& path) {
  if (path.empty()) return InvalidArgument("an empty file name");
  if (path.back() == '/') return IoError(path + ": is a folder, not a file name");
  DK_RETURN_IF_ERROR(CheckExistingName(path));
  const std::string dir = FolderOf(path);
  struct stat st {};
  if (::stat(dir.c_str(), &st) != 0) {
    const int err = errno;
    return IoError(path + ": folder '" + dir + "' " + (err == ENOENT ? "does not exist" : std::strerror(err)));
  }
  if (!S_ISDIR(st.st_mode)) return IoError(path + ": '" + dir + "' is not a folder");
#ifdef O_TMPFILE
  const int tfd = ::open(dir.c_str(), O_TMPFILE | O_WRONLY | O_CLOEXEC, 0644);
  if (tfd >= 0) {
    ::close(tfd);  // nameless: nothing to remove
    return Status::Ok();
  }
  if (errno != EOPNOTSUPP && errno != EISDIR && errno != EINVAL)
    return IoError(path + ": cannot write in folder '" + dir + "': " + std::strerror(errno));
#endif
  const std::string probe = path + ".tmp." + std::to_string(::getpid());
  const int fd = ::open(probe.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
  if (fd < 0) {
    const int err = errno;
    if (err == EEXIST) return Status::Ok();  // a leftover of ours: the folder takes files
    return IoError(path + ": cannot write in folder '" + dir + "': " + std::strerror(err));
  }
  ::close(fd);
  ::unlink(probe.c_str());
  return Status::Ok();
}

// Linux's O_TMPFILE makes a nameless file in the target's folder, linked into place only once
// complete: a process killed mid-write leaves nothing behind. Filesystems without it get a named
// temporary file (path.tmp.<pid>) that is renamed, and removed on every error.
Status WriteFileAtomicallyWith(const std::string& path, const std::function<Status(int fd)>& write) {
  DK_RETURN_IF_ERROR(CheckExistingName(path));
  const std::string dir = FolderOf(path);
#ifdef O_TMPFILE
  const int tfd = ::open(dir.c_str(), O_TMPFILE | O_WRONLY | O_CLOEXEC, 0644);
  if (tfd >= 0) {
    Status s = write(tfd);
    if (s.ok() && ::fsync(tfd) != 0) s = IoError(path + ": fsync failed: " + std::strerror(errno));
    if (s.ok()) {
      // linkat cannot replace an existing name: link under a temporary name, then rename over.
      const std::string tmp = path + ".tmp." + std::to_string(::getpid());
      const std::string proc = "/proc/self/fd/" + std::to_string(tfd);
      ::unlink(tmp.c_str());
      if (::linkat(AT_FDCWD, proc.c_str(), AT_FDCWD, tmp.c_str(), AT_SYMLINK_FOLLOW) != 0) {
        s = IoError(path + ": cannot link the written file: " + std::strerror(errno));
      } else if (::rename(tmp.c_str(), path.c_str()) != 0) {
        s = IoError(path + ": cannot rename into place: " + std::strerror(errno));
        ::unlink(tmp.c_str());
      }
    }
    ::close(tfd);
    return s;
  }
  if (errno != EOPNOTSUPP && errno != EISDIR && errno != EINVAL)
    return IoError(path + ": cannot write in folder " + dir + ": " + std::strerror(errno));
#endif
  const std::string tmp = path + ".tmp." + std::to_string(::getpid());
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return IoError(path + ": cannot create a file in " + dir + ": " + std::strerror(errno));
  Status s = write(fd);
  if (s.ok() && ::fsync(fd) != 0) s = IoError(path + ": fsync failed");
  if (::close(fd) != 0 && s.ok()) s = IoError(path + ": close failed");
  if (s.ok() && ::rename(tmp.c_str(), path.c_str()) != 0) s = IoError(path + ": rename failed: " + std::strerror(errno));
  if (!s.ok()) ::unlink(tmp.c_str());
  return s;
}

Status WriteFileAtomically(const std::string& path, const void* bytes, size_t size) {
  return WriteFileAtomicallyWith(path, [&](int fd) { return WriteAll(fd, bytes, size, path); });
}

Status ReadFileInParts(const std::string& path, size_t part_bytes, const std::function<bool(std::string_view)>& consume,
                       size_t max_bytes) {
  size_t size = 0;
  int fd;
  DK_ASSIGN_OR_RETURN(fd, OpenRegularFile(path, &size));
  struct Closer {
    int fd;
    ~Closer() { ::close(fd); }
  } closer{fd};
  if (size > max_bytes) {
    return InvalidArgument(path + ": " + std::to_string(size) + " bytes; text files up to " +
                           std::to_string(max_bytes) + " bytes are read");
  }
  std::string part(std::min(std::max<size_t>(part_bytes, 1), size), '\0');
  size_t got = 0;
  while (got < size) {
    const ssize_t r = ::read(fd, part.data(), std::min(part.size(), size - got));
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) break;
    got += static_cast<size_t>(r);
    if (!consume(std::string_view(part.data(), static_cast<size_t>(r)))) return Status::Ok();
  }
  if (got != size) return IoError(path + ": read " + std::to_string(got) + " of " + std::to_string(size) + " bytes");
  return Status::Ok();
}

StatusOr<std::string> ReadWholeFile(const std::string& path, size_t max_bytes) {
  size_t size = 0;
  int fd;
  DK_ASSIGN_OR_RETURN(fd, OpenRegularFile(path, &size));
  if (size > max_bytes) {
    ::close(fd);
    return InvalidArgument(path + ": " + std::to_string(size) + " bytes; text files up to " +
                           std::to_string(max_bytes) + " bytes are read");
  }
  std::string text(size, '\0');
  size_t got = 0;
  while (got < size) {
    const ssize_t r = ::read(fd, text.data() + got, size - got);
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) break;
    got += static_cast<size_t>(r);
  }
  ::close(fd);
  if (got != size) return IoError(path + ": read " + std::to_string(got) + " of " + std::to_string(size) + " bytes");
  return text;
}

}  // namespace dk
