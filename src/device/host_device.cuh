// KILN_HD marks a function that both the host launchers (g++) and the kernels (NVRTC) evaluate,
// such as a kernel's shared-memory plan in its parameter header.
#pragma once

#if defined(__CUDACC__)
#define KILN_HD __host__ __device__
#else
#define KILN_HD
#endif
