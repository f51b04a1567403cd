// SoftHSM2 configuration files for a private token directory.
#include "hsm/softhsm.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>

namespace gs::hsm::softhsm {

Result<std::string> write_config(const std::string& dir) {
  if (dir.empty() || dir.find('\n') != std::string::npos) {
    return Error(Errc::invalid_argument, "bad SoftHSM2 directory name");
  }
  if (::mkdir(dir.c_str(), 0700) != 0 && errno != EEXIST) {
    return Error(Errc::not_found, "cannot create " + dir + ": " + std::strerror(errno));
  }
  const std::string tokens = dir + "/tokens";
  if (::mkdir(tokens.c_str(), 0700) != 0 && errno != EEXIST) {
    return Error(Errc::not_found, "cannot create " + tokens + ": " + std::strerror(errno));
  }
  const std::string conf = dir + "/softhsm2.conf";
  int fd = ::open(conf.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
  if (fd < 0) {
    if (errno == EEXIST) {
      return conf;
    }
    return Error(Errc::not_found, "cannot create " + conf + ": " + std::strerror(errno));
  }
  const std::string text = "# written by gridseal\ndirectories.tokendir = " + tokens +
                           "\nobjectstore.backend = file\nlog.level = ERROR\n"
                           "slots.removable = false\n";
  ssize_t n = ::write(fd, text.data(), text.size());
  int close_rc = ::close(fd);
  if (n != static_cast<ssize_t>(text.size()) || close_rc != 0) {
    ::unlink(conf.c_str());
    return Error(Errc::crypto_failure, "cannot write " + conf);
  }
  return conf;
}

Status use_config(const std::string& conf_path) {
  if (::setenv("SOFTHSM2_CONF", conf_path.c_str(), 1) != 0) {
    return Error(Errc::invalid_argument, "cannot set SOFTHSM2_CONF");
  }
  return {};
}

}  // namespace gs::hsm::softhsm
