"""pytest-specdec: lossless speculative-decoding benchmarks as pytest cases."""
