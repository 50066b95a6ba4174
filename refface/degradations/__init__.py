"""refface.degradations."""
