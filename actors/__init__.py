"""Thin Ray wrappers around the rlstitch core."""
