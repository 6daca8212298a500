"""Readers that list tensors without loading them, and writers that take them one at a time."""
