"""kefu's load harness: ``python -m loadtest SCENARIO`` (see loadtest/README.md)."""
