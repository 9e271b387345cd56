"""Block-sparse × dense matmul (Pallas, scalar-prefetched block indices)."""
