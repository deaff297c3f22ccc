"""Integer-only model: converter, op set and numpy reference, ONNX Runtime executor."""
