"""Helpers shared by the tests: tiny models and cached dataset roots."""
