// The emulated build of gat_aggregate: the CUDA source itself, compiled for the CPU (csrc/simt.h).
#include "cuda/gat_aggregate_cuda.cu"
