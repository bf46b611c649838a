"""Placeholder until the twin lands."""
