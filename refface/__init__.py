"""refface: datasets, degradations and trainers for reference-based face restoration."""

__version__ = "0.1.0"
