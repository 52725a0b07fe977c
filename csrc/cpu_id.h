// fastlstm C++ CPU backend: which CPU this is, for the choices measured to differ between CPUs.
#pragma once

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif

namespace fastlstm {
namespace {

// Whether this is an Intel CPU (where MKL runs its tuned kernels).
inline bool cpu_is_intel() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  return __builtin_cpu_is("intel");
#else
  return false;
#endif
}
// AMD's CPU family (0x19 Zen 3/4, 0x1A Zen 5), or 0 on other vendors and architectures.
inline int amd_family() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  if (!__builtin_cpu_is("amd")) return 0;
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (!__get_cpuid(1, &eax, &ebx, &ecx, &edx)) return 0;
  const unsigned base = (eax >> 8) & 0xf;
  return static_cast<int>(base == 0xf ? base + ((eax >> 20) & 0xff) : base);
#else
  return 0;
#endif
}

// Whether this is a Zen 3 (AMD family 0x19 without AVX-512; Zen 4, the same family, has it).
inline bool amd_zen3() {
#if defined(__x86_64__) || defined(__i386__)
  return amd_family() == 0x19 && !__builtin_cpu_supports("avx512f");
#else
  return false;
#endif
}

}  // namespace
}  // namespace fastlstm
