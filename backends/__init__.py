"""Model loading, quantized linear layers and generation (calls only into kernels/)."""
