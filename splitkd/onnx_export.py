"""Export a student to ONNX and prove onnxruntime computes what PyTorch computes."""

from __future__ import annotations

import io
import logging
import warnings

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from splitkd.errors import FailedPrecondition
from splitkd.models.normalize import typical_inputs
from splitkd.models.staged import StagedModel

log = logging.getLogger(__name__)

# Float32 kernels differ between PyTorch and onnxruntime only by summation order;
# 1e-4 on logits is far above that noise and far below any real defect.
PARITY_TOLERANCE = 1e-4
INPUT_NAME = "input"
OUTPUT_NAME = "logits"


def export_onnx(model: nn.Module, input_shape: tuple[int, ...]) -> bytes:
    """ONNX bytes of ``model`` with a dynamic batch dimension."""
    model.eval()
    example = torch.zeros((2, *input_shape), dtype=torch.float32)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # The TorchScript-based exporter is deprecated in favour of dynamo, but it
        # is 20x faster for these small models and needs no onnxscript on the cloud.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (example,),
            buffer,  # type: ignore[arg-type]  # a file object is accepted, the stub says path only
            dynamo=False,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            opset_version=17,
        )
    return buffer.getvalue()


def parity(model: nn.Module, onnx_bytes: bytes, inputs: np.ndarray) -> float:
    """Max absolute difference between PyTorch and onnxruntime logits on ``inputs``."""
    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    (ort_logits,) = session.run([OUTPUT_NAME], {INPUT_NAME: inputs.astype(np.float32)})
    model.eval()
    with torch.no_grad():
        torch_logits = model(torch.from_numpy(inputs.astype(np.float32))).numpy()
    return float(np.max(np.abs(np.asarray(ort_logits) - torch_logits)))


def export_checked(
    model: nn.Module, input_shape: tuple[int, ...], seed: int = 0
) -> tuple[bytes, float]:
    """Export, then check parity on random inputs; refuse a model that does not match.

    A language model is exported as its incremental decoder instead (what a device
    generates text with), checked token by token (splitkd/lm_export.py)."""
    from splitkd import lm_export  # here: it imports the model zoo, which this module need not

    if lm_export.is_language_model(model):
        assert isinstance(model, StagedModel)
        return lm_export.export_decoder_checked(model, input_shape[0], seed)
    onnx_bytes = export_onnx(model, input_shape)
    # At the scale of the model's raw inputs: standard normals would be far out of
    # range for features measured in thousands or thousandths.
    inputs = typical_inputs(model, input_shape, 64, seed)
    diff = parity(model, onnx_bytes, inputs)
    if not diff <= PARITY_TOLERANCE:
        raise FailedPrecondition(
            f"ONNX export does not match PyTorch (max abs diff {diff:.2e} > {PARITY_TOLERANCE})"
        )
    log.info("exported ONNX (%d bytes), max abs diff vs PyTorch %.2e", len(onnx_bytes), diff)
    return onnx_bytes, diff
