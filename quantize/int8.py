"""int8 with activations quantized by ONNX Runtime: dynamic (per call) and static (QDQ, calibrated)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from core.onnx_files import ONNX_FILE, TWO_GB, onnx_bytes
from core.schema import positive
from quantize.ort import SequenceReader, finish, guard, read_meta


def quantize_int8_dynamic(
    src: str | Path,
    dest: str | Path,
    *,
    per_channel: bool = True,
    embedding: bool = False,
    probe: Sequence[Sequence[int]] = (),
) -> Path:
    """int8 weights per output channel (symmetric), activations quantized per call (ORT dynamic: one scale
    over the whole input of each MatMul, so a row's numbers depend on the other rows and on padding)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src, dest = Path(src), Path(dest)

    def build(tmp: Path) -> None:
        quantize_dynamic(
            str(src / ONNX_FILE),
            str(tmp / ONNX_FILE),
            op_types_to_quantize=["MatMul"] + (["Gather"] if embedding else []),
            per_channel=per_channel,
            weight_type=QuantType.QInt8,
            use_external_data_format=onnx_bytes(src) >= TWO_GB,
            # DefaultTensorType: the fused graph's com.microsoft ops have no ONNX shape inference to type by
            extra_options={"MatMulConstBOnly": True, "DefaultTensorType": onnx.TensorProto.FLOAT},
        )
        settings = {"per_channel": per_channel, "weight_type": "int8", "embedding": embedding}
        finish(src, tmp, "int8_dynamic", settings, probe)

    return guard(dest, build)


def quantize_int8_static(
    src: str | Path,
    dest: str | Path,
    calibration: Sequence[Sequence[int]],
    *,
    per_channel: bool = True,
    probe: Sequence[Sequence[int]] = (),
) -> Path:
    """int8 QDQ: weights per channel, activation ranges from MinMax calibration on ``calibration`` sequences."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    src, dest = Path(src), Path(dest)
    if not calibration:
        raise ValueError("static int8 quantization needs calibration sequences")

    def build(tmp: Path) -> None:
        from onnxruntime.quantization.shape_inference import quant_pre_process

        pre = tmp / "pre.onnx"  # ONNX Runtime's recommended pre-processing: graph optimisation + shapes
        quant_pre_process(str(src / ONNX_FILE), str(pre), skip_symbolic_shape=True)
        quantize_static(
            str(pre),
            str(tmp / ONNX_FILE),
            SequenceReader(calibration, read_meta(src)),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=["MatMul"],
            per_channel=per_channel,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            use_external_data_format=onnx_bytes(src) >= TWO_GB,
            # DefaultTensorType: the fused graph's com.microsoft ops have no ONNX shape inference to type by
            extra_options={"MatMulConstBOnly": True, "DefaultTensorType": onnx.TensorProto.FLOAT},
        )
        pre.unlink()
        settings = {"per_channel": per_channel, "calibration_sequences": len(calibration), "calibrate": "minmax"}
        finish(src, tmp, "int8_static_qdq", settings, probe)

    return guard(dest, build)


@dataclass
class Int8Settings:
    per_channel: bool
    embedding: bool

    def problems(self, key: str) -> list[str]:
        return []


@dataclass
class Int8StaticSettings:
    per_channel: bool
    calib_examples: int = positive()

    def problems(self, key: str) -> list[str]:
        return []
