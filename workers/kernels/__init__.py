"""FP8 GPU kernels (Triton) with torch references: fused quantization, FP8 GEMMs, paged KV write and decode
attention. Import the submodules you need (`quant`, `kv_cache`, `attention`, `gemm`); see README.md."""
