"""Schemas, readers and writers of every table and file format refface produces."""
