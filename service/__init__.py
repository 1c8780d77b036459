"""The inference service: FastAPI over dynamic batchers over onnxruntime / TensorRT / PyTorch backends."""
