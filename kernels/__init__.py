"""Raw compute kernels with their plain-torch references."""
