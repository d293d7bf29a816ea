"""The Ray Serve app: ``serve run serving/config.yaml``; see serving/README.md."""
