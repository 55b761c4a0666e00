// The emulated build of rev_subtract: the CUDA source itself, compiled for the CPU (csrc/simt.h).
#include "cuda/rev_subtract_cuda.cu"
