"""The deployment half: ONNX export, verification against float64, latency benchmarks, runtimes."""
