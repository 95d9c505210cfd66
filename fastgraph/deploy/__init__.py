"""Inference engines: the inference graph with test-time augmentation, exported to ONNX
(run with ONNX Runtime) or compiled with Torch-TensorRT, verified against PyTorch on
real test images.

Owns: ``pipeline`` (the inference graph, fp16, trained weights, the accuracy check),
``onnx``, ``tensorrt``, ``batches`` (logits over many images in batches).

May import: ``core``, ``passes``, ``kernels``, ``data``, ``training`` (trained weights).
"""
