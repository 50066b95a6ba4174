"""Training input pipelines, the shared loop and the ReF-LDM / MGFR models."""
