"""Hand-offs of a built dataset root to training tools: Hugging Face datasets and BasicSR folders."""
