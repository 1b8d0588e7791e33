#include "nbd/backend.h"

namespace ferry::nbd {

asio::awaitable<void> Backend::cache(std::uint64_t, std::uint64_t) { co_return; }

}  // namespace ferry::nbd
