"""End-to-end load generators for kefu (``python -m loadtest.chat_throughput``)."""
