"""The edge side of splitkd: split training against the cloud, and ONNX inference.

Only ``trainer`` and ``client`` need torch and gRPC; ``model_store``,
``inference`` and ``http_api`` run on an inference-only install.
"""
