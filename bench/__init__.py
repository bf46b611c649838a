"""kefu microbenchmarks: ``python -m bench [--json] [--quick] [--only NAME ...]``."""
