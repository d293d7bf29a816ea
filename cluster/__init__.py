"""Cluster tooling: connecting jobs to Ray (connect.py), the local multi-node cluster, cluster configs."""
