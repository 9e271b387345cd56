"""N:M sparse × dense matmul (Pallas)."""
