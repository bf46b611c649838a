"""Cluster mode: several nodes cooperating through one Redis (presence, routing, links)."""
