"""End-to-end dataset builders that chain stages."""
