// Overloaded{lambdas...}: one visitor out of several lambdas, for std::visit.
#pragma once

namespace gs {

template <class... Ts>
struct Overloaded : Ts... {
  using Ts::operator()...;
};
template <class... Ts>
Overloaded(Ts...) -> Overloaded<Ts...>;

}  // namespace gs
