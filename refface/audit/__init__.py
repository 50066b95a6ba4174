"""The leakage audit: which images of one set reappear (same photo, same person) in another."""
