"""splitkd core: what the cloud service and the edge agent share.

Importing this package never imports torch or gRPC, so that an
inference-only edge install (numpy + onnxruntime) can use the parts it needs.
"""

__version__ = "0.1.0"
