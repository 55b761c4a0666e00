// The emulated build of spmm: the CUDA source itself, compiled for the CPU (csrc/simt.h).
#include "cuda/spmm_cuda.cu"
