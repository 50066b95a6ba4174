"""MGFR: dual control adapters (LCA, RCA) on a frozen Stable Diffusion."""
