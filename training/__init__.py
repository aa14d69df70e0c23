"""Offline jobs: simulation, batch features, velocity backfill, training, retrieval."""
