"""Preprocessing building blocks (no Ray): Parquet schema, manifests, dedup, flow, quarantine."""
