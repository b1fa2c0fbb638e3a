"""The GPU check (python -m benchmarks.gpu_check): every device-dependent path of a merge, timed on the device and
checked for parity with the CPU. See __main__.py and benchmarks/README.md."""
