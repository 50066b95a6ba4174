"""ReF-LDM: VQGAN autoencoder, CacheKV denoiser, identity loss, sampler, trainer and restorer."""
