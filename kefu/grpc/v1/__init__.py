"""The modules generated from ``kefu.proto`` (package ``kefu.v1``) by ``scripts/gen-grpc``:
committed, never edited by hand."""
