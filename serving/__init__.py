"""The Ray Serve app (issue 6): ``serve run serving/config.yaml``; see serving/README.md."""
