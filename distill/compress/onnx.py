"""ONNX deployment targets: a student exported to ONNX, and onnxruntime's quantization of it.

Formats (the folder a device loads holds ``model.onnx``, the student's ``config.json`` and
``quantization.json``):

* ``onnx``: the fp32 student exported with ``torch.onnx.export`` (the dynamo exporter),
  one input ``signal`` [batch, leads, samples] float32 with a dynamic batch dimension, one
  output ``logits`` [batch, classes]. Checked against PyTorch with onnxruntime on stored
  records of the data (the largest absolute difference of the logits is recorded).
* ``onnx-int8``: static int8 quantization (onnxruntime ``quantize_static``): QDQ format,
  per-channel int8 weights and uint8 activations whose ranges are calibrated on training
  records of the student's view (MinMax). It covers the convolutions as well as the
  matrix products, which bitsandbytes cannot.
* ``onnx-int4``: 4-bit weight-only quantization (onnxruntime ``MatMulNBitsQuantizer``,
  symmetric blocks of 32 weights): only ``MatMul`` nodes with a constant weight become
  ``MatMulNBits``; onnxruntime has no 4-bit convolution, and a linear layer exported as
  ``Gemm`` (2-D input) is not converted either. The summary says what was covered.

Every ``model.onnx`` carries the input contract in its metadata (``ecg_distill.contract``:
leads, rate, samples, units, the scaler to apply, class names, how to read the output), so
a device needs nothing but onnxruntime and the file. :class:`OnnxStudent` runs a folder
with the student interface (``model(signal=x).logits``) for scoring and timing.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import logging
import os
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat,
                                      QuantType, quant_pre_process, quantize_static)
from torch import nn

from distill.compress.quantize import SUMMARY_FILE, QuantizeError, check_student_folder, \
    load_student
from distill.core.contract import ECGModelOutput
from distill.core.hashing import sha256_file
from distill.core.io import atomic_dir, atomic_write_text
from distill.core.layout import ONNX_FORMATS
from distill.metrics.footprint import count_parameters

ONNX_FILE = "model.onnx"
FORMATS: tuple[str, ...] = ONNX_FORMATS
CONTRACT_KEY = "ecg_distill.contract"
try:
    VERSION = importlib.metadata.version("ecg-distill")
except importlib.metadata.PackageNotFoundError:  # run from a checkout that is not installed
    VERSION = "unknown"
INT4_BLOCK = 32  # weights per 4-bit scale
EXPORT_TOLERANCE = 1e-4  # largest |logit difference| accepted between PyTorch and ONNX fp32
CALIBRATION_BATCH = 32


def input_spec(config: dict[str, Any]) -> tuple[str, np.dtype, tuple[int, ...]]:
    """(name, dtype, shape of one record) of a student's input: the scaled signal
    ``float32 [leads, samples]``, or an image student's printout ``uint8 [3, S, S]``."""
    if config.get("image_size"):
        size = int(config["image_size"])
        return "image", np.dtype(np.uint8), (3, size, size)
    return "signal", np.dtype(np.float32), (len(config["leads"]), int(config["input_samples"]))


class _Logits(nn.Module):
    """The student as the ONNX graph sees it: its input in, logits out."""

    def __init__(self, student: nn.Module, name: str = "signal") -> None:
        super().__init__()
        self.student = student
        self.name = name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.student(**{self.name: x}).logits


def _contract(config: dict[str, Any], fmt: str, source: Path, parameters: int) -> dict[str, Any]:
    labels = config.get("id2label") or {}
    name, _, shape = input_spec(config)
    if name == "image":
        what = {"name": "image", "shape": ["batch", *shape], "dtype": "uint8",
                "render": {"size": shape[-1], **(config.get("render") or {})},
                "printed": {"sampling_rate": config["sampling_rate"],
                            "samples": config["input_samples"], "units": "mV"},
                "how": "the record's printout (ecg-distill's renderer, or a scan resized to "
                       "the size), RGB uint8, channels first"}
    else:
        what = {"name": "signal", "shape": ["batch", *shape],
                "dtype": "float32", "leads": config["leads"],
                "sampling_rate": config["sampling_rate"], "units": "mV",
                "normalization": config.get("normalization"),
                "how": "x_scaled = (x_mV - mean[lead]) / std[lead], leads in the order given"}
    return {
        "format": fmt,
        "input": what,
        "output": {"name": "logits", "classes": [labels[k] for k in sorted(labels, key=int)],
                   "how": "probability = sigmoid(logit), one per class (multi-label)"},
        "model": {"type": config.get("model_type"), "parameters": parameters,
                  "source_weights_sha256": sha256_file(source / "model.safetensors")},
        "ecg_distill_version": VERSION,
    }


def _strip(model: onnx.ModelProto) -> None:
    """Make the graph compact: drop the exporter's per-node debugging metadata (stack
    traces, module paths), the intermediate shape annotations (onnxruntime infers them),
    node names, and give every internal tensor a short name: in a small student they are
    a sizeable part of the file, and no runtime reads them. The graph's
    input and output names are kept: they are the contract."""
    g = model.graph
    keep = {v.name for v in g.input} | {v.name for v in g.output}
    short: dict[str, str] = {}

    def rename(name: str) -> str:
        if not name or name in keep:
            return name
        if name not in short:
            short[name] = _base36(len(short))
        return short[name]

    for t in g.initializer:
        t.name = rename(t.name)
        t.doc_string = ""
    for node in g.node:
        node.name = ""
        node.doc_string = ""
        del node.metadata_props[:]
        node.input[:] = [rename(x) for x in node.input]
        node.output[:] = [rename(x) for x in node.output]
    for f in model.functions:
        for node in f.node:
            node.doc_string = ""
            del node.metadata_props[:]
    del g.value_info[:]


def _base36(i: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while True:
        i, r = divmod(i, 36)
        out = digits[r] + out
        if not i:
            return "_" + out


def _set_contract(model: onnx.ModelProto, contract: dict[str, Any]) -> None:
    kept = [p for p in model.metadata_props if p.key != CONTRACT_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    entry = model.metadata_props.add()
    entry.key, entry.value = CONTRACT_KEY, json.dumps(contract)
    model.producer_name, model.producer_version = "ecg-distill", VERSION
    model.doc_string = (f"ECG student ({contract['model']['type']}, {contract['format']}); "
                        f"input contract in metadata '{CONTRACT_KEY}'")


def read_contract(path: str | os.PathLike) -> dict[str, Any]:
    """The input contract stored in an ONNX file's metadata."""
    model = onnx.load(str(path), load_external_data=False)
    for p in model.metadata_props:
        if p.key == CONTRACT_KEY:
            return json.loads(p.value)
    raise QuantizeError(f"{path}: no '{CONTRACT_KEY}' metadata; not an ecg-distill ONNX file")


@contextlib.contextmanager
def _quiet_onnx_tools() -> Iterator[None]:
    """The dynamo exporter logs a line per optional op library it cannot find
    (torchvision) and warns about its own internals, and onnxruntime's quantizer about
    per-channel axes of 1-D tensors; none of it concerns the student."""
    # onnxruntime's quantizer warns on the root logger about per-channel axes of 1-D
    # tensors (biases, norms), which it then quantizes per tensor as intended
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "onnxscript", "")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def session(path: str | os.PathLike, threads: int | None = None) -> ort.InferenceSession:
    """An onnxruntime CPU session (``threads``: intra-op threads; default torch's count, so
    timings compare with PyTorch's on the same cores).

    Its worker threads do not spin after a call (onnxruntime's default is to spin): a
    spinning idle session takes cores from whatever runs next in the process, which here is
    often another model being timed. A service calling one model in a tight loop may gain
    a little latency by turning spinning back on."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _check_samples(samples: np.ndarray, config: dict[str, Any], what: str) -> np.ndarray:
    name, dtype, want = input_spec(config)
    samples = np.ascontiguousarray(samples, dtype=dtype)
    if samples.shape[1:] != want or not len(samples):
        kind = "printouts, uint8" if dtype == np.uint8 else "the student's view, scaled"
        raise QuantizeError(f"{what}: records of shape [N, {', '.join(map(str, want))}] "
                            f"needed ({kind}), got {list(samples.shape)}")
    return samples


def export_onnx(source: str | os.PathLike, out: str | os.PathLike, samples: np.ndarray, *,
                force: bool = False, tolerance: float = EXPORT_TOLERANCE) -> dict[str, Any]:
    """Export the fp32 student folder ``source`` to ``out/model.onnx`` and check it.

    Args:
        source: a saved fp32 student folder.
        out: the folder written (``model.onnx``, ``config.json``, ``quantization.json``);
            replaced only with ``force``.
        samples: float32 [N, leads, samples] scaled records of the student's view (an
            image student: uint8 [N, 3, S, S] printouts): the exported graph must
            reproduce PyTorch's logits on them within ``tolerance``.
        force: replace an existing ``out``.
        tolerance: the largest absolute logit difference accepted.

    Returns:
        The summary written to ``quantization.json`` (format, max_abs_diff, sizes, contract).

    Raises:
        QuantizeError: not an fp32 student folder, ``out`` exists, or the check fails.
    """
    source, out = Path(source), Path(out)
    config = check_student_folder(source)
    if out.exists() and not force:
        raise QuantizeError(f"{out} exists; pass --force to replace it")
    samples = _check_samples(samples, config, f"{source}: ONNX check")
    name = input_spec(config)[0]
    student = load_student(source)
    wrapper = _Logits(student, name).eval()
    example = torch.from_numpy(samples[:2])
    with torch.no_grad():
        reference = wrapper(torch.from_numpy(samples)).numpy()
    with atomic_dir(out) as tmp:
        path = tmp / ONNX_FILE
        with _quiet_onnx_tools(), torch.no_grad():
            program = torch.onnx.export(
                wrapper, (example,), input_names=[name], output_names=["logits"],
                dynamic_shapes={"x": {0: torch.export.Dim("batch")}}, dynamo=True,
                external_data=False, verbose=False)
        model = program.model_proto
        _strip(model)
        contract = _contract(config, "onnx", source, count_parameters(student))
        _set_contract(model, contract)
        onnx.checker.check_model(model)
        onnx.save_model(model, str(path))
        got = session(path).run(["logits"], {name: samples})[0]
        diff = float(np.abs(got - reference).max())
        if not diff <= tolerance:
            raise QuantizeError(f"{source}: the ONNX export differs from PyTorch by {diff:.2e} "
                                f"in the logits (tolerance {tolerance:.0e})")
        (tmp / "config.json").write_text((source / "config.json").read_text())
        fp32_bytes = (source / "model.safetensors").stat().st_size
        summary = {"format": "onnx", "source": str(source), "max_abs_diff": diff,
                   "check_records": int(len(samples)), "opset": _opset(model),
                   "bytes": {"fp32_file": fp32_bytes, "onnx_file": path.stat().st_size},
                   "quantized_parameters": 0, "fraction": 0.0,
                   "ratio_file": fp32_bytes / path.stat().st_size, "ratio_part": 1.0,
                   "notes": [f"fp32 ONNX graph (batch norms folded by the exporter); its logits "
                             f"match PyTorch's within {diff:.1e} on {len(samples)} records"],
                   "contract": contract}
        atomic_write_text(tmp / SUMMARY_FILE, json.dumps(summary, indent=1))
    return summary


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


class _Reader(CalibrationDataReader):
    """Calibration batches for ``quantize_static``."""

    def __init__(self, records: np.ndarray, batch: int = CALIBRATION_BATCH,
                 name: str = "signal") -> None:
        self._batches = iter([{name: records[i:i + batch]}
                              for i in range(0, len(records), batch)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


def _quantized_part(model: onnx.ModelProto) -> tuple[int, int]:
    """(weights stored quantized, bytes spent on them with their scales and zero points):
    int8 initializers read by DequantizeLinear (QDQ weights), and MatMulNBits' packed 4-bit
    weights (K x N each)."""
    init = {t.name: t for t in model.graph.initializer}

    def nbytes(name: str) -> int:
        return int(onnx.numpy_helper.to_array(init[name]).nbytes) if name in init else 0

    n = stored = 0
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in init and \
                init[node.input[0]].data_type == onnx.TensorProto.INT8:
            n += int(np.prod(init[node.input[0]].dims))
            stored += sum(nbytes(x) for x in node.input)
        elif node.op_type == "MatMulNBits":
            attrs = {a.name: a.i for a in node.attribute}
            n += attrs["K"] * attrs["N"]
            stored += sum(nbytes(x) for x in node.input[1:])
    return n, stored


def _node_types(model: onnx.ModelProto) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def quantize_onnx(fp32_folder: str | os.PathLike, fmt: str, out: str | os.PathLike,
                  calibration: np.ndarray | None = None, *, check: np.ndarray | None = None,
                  force: bool = False) -> dict[str, Any]:
    """Quantize the exported fp32 ONNX folder ``fp32_folder`` (see :func:`export_onnx`) to
    ``fmt`` ("onnx-int8" or "onnx-int4") into ``out``.

    Args:
        calibration: float32 [N, leads, samples] scaled training records (int8 only: the
            activation ranges are calibrated on them).
        check: records on which the quantized logits are compared with the fp32 ONNX
            model's (the largest absolute difference is recorded; it is not a pass/fail
            check: the accuracy is judged by the scores on the test fold).
        force: replace an existing ``out``.

    Returns:
        The summary written to ``out/quantization.json``.
    """
    fp32_folder, out = Path(fp32_folder), Path(out)
    src = fp32_folder / ONNX_FILE
    if not src.is_file():
        raise QuantizeError(f"{fp32_folder}: no {ONNX_FILE}; export the student first "
                            f"(format onnx)")
    if fmt not in ("onnx-int8", "onnx-int4"):
        raise QuantizeError(f"unknown ONNX quantization {fmt!r}; expected onnx-int8 or onnx-int4")
    if out.exists() and not force:
        raise QuantizeError(f"{out} exists; pass --force to replace it")
    config = json.loads((fp32_folder / "config.json").read_text())
    contract = read_contract(src)
    notes: list[str] = []
    with atomic_dir(out) as tmp, tempfile.TemporaryDirectory() as work:
        path = tmp / ONNX_FILE
        if fmt == "onnx-int8":
            if calibration is None:
                raise QuantizeError(f"{fp32_folder}: static int8 needs calibration records")
            calibration = _check_samples(calibration, config, f"{fp32_folder}: calibration")
            pre = Path(work) / "pre.onnx"
            # shape inference and graph clean-up before quantization (onnxruntime's advice);
            # its symbolic pass trips over the dynamo exporter's shape ops, ONNX's own does not
            quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
            with _quiet_onnx_tools():
                quantize_static(str(pre), str(path),
                                _Reader(calibration, name=input_spec(config)[0]),
                                quant_format=QuantFormat.QDQ, per_channel=True,
                                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                                calibrate_method=CalibrationMethod.MinMax)
            model = onnx.load(str(path))
            covered = {t: n for t, n in _node_types(model).items()
                       if t in ("Conv", "MatMul", "Gemm")}
            notes.append(f"int8 weights for {sum(covered.values())} nodes "
                         f"({', '.join(f'{n} {t}' for t, n in sorted(covered.items()))}); "
                         f"activations uint8, calibrated on {len(calibration)} training records")
        else:
            model = onnx.load(str(src))
            before = _node_types(model)
            nbits = _matmul_nbits()
            q = nbits.MatMulNBitsQuantizer(model, algo_config=nbits.DefaultWeightOnlyQuantConfig(
                block_size=INT4_BLOCK, is_symmetric=True, bits=4))
            with _quiet_onnx_tools():
                q.process()
            model = q.model.model
            after = _node_types(model)
            n4 = after.get("MatMulNBits", 0)
            notes.append(f"{n4} of {before.get('MatMul', 0)} MatMul nodes with 4-bit weights "
                         f"(blocks of {INT4_BLOCK})")
            if before.get("Conv"):
                notes.append(f"{before['Conv']} Conv nodes stay fp32: onnxruntime has no 4-bit "
                             f"convolution")
            if before.get("Gemm"):
                notes.append(f"{before['Gemm']} Gemm nodes stay fp32: onnxruntime's 4-bit "
                             f"weight-only kernel (MatMulNBits) replaces MatMul only")
            if not n4:
                raise QuantizeError(f"{fp32_folder}: no MatMul node with a constant weight; "
                                    f"4-bit weight-only leaves the model unchanged ("
                                    + "; ".join(notes[1:]) + ")")
        _strip(model)
        _set_contract(model, {**contract, "format": fmt})
        onnx.save_model(model, str(path))
        (tmp / "config.json").write_text((fp32_folder / "config.json").read_text())
        summary: dict[str, Any] = {
            "format": fmt, "source": str(fp32_folder), "notes": notes,
            "nodes": _node_types(model),
            "bytes": {"fp32_file": json.loads((fp32_folder / SUMMARY_FILE).read_text())
                      ["bytes"]["fp32_file"], "onnx_fp32_file": src.stat().st_size,
                      "quantized_file": path.stat().st_size}}
        summary["ratio_file"] = summary["bytes"]["fp32_file"] / summary["bytes"]["quantized_file"]
        n, stored = _quantized_part(model)
        summary.update(quantized_parameters=n, fraction=n / max(1, contract["model"]["parameters"]),
                       ratio_part=4 * n / max(1, stored))
        summary["bytes"].update(fp32_part=4 * n, quantized_part=stored)
        if check is not None:
            check = _check_samples(check, config, f"{fp32_folder}: check")
            name = input_spec(config)[0]
            a = session(src).run(["logits"], {name: check})[0]
            b = session(path).run(["logits"], {name: check})[0]
            summary["max_abs_diff_vs_onnx_fp32"] = float(np.abs(a - b).max())
        atomic_write_text(tmp / SUMMARY_FILE, json.dumps(summary, indent=1))
    return summary


def _matmul_nbits():
    """onnxruntime's 4-bit weight-only quantizer module, imported on first use: importing it
    calls ``logging.basicConfig(level=INFO)``, which would turn on every library's INFO
    lines in the whole process; the root logger is put back as it was."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        from onnxruntime.quantization import matmul_nbits_quantizer
    finally:
        for h in root.handlers[:]:
            if h not in handlers:
                root.removeHandler(h)
        root.setLevel(level)
    return matmul_nbits_quantizer


def export_is_current(folder: str | os.PathLike, source: str | os.PathLike) -> bool:
    """Whether ``folder`` holds the ONNX export of the student weights now in ``source``
    (its contract names their SHA-256): a stale export is never quantized."""
    folder, source = Path(folder), Path(source)
    if not is_onnx_folder(folder) or not (source / "model.safetensors").is_file():
        return False
    try:
        made_from = read_contract(folder / ONNX_FILE)["model"]["source_weights_sha256"]
    except (QuantizeError, KeyError, ValueError):
        return False
    return made_from == sha256_file(source / "model.safetensors")


def is_onnx_folder(folder: str | os.PathLike) -> bool:
    return (Path(folder) / ONNX_FILE).is_file()


class OnnxStudent(nn.Module):
    """An ONNX student folder run by onnxruntime behind the student interface:
    ``model(signal=x)`` (an image student's: ``model(image=x)``) -> :class:`ECGModelOutput`
    with ``logits``. It holds no torch parameters (one empty anchor, so callers can ask for
    its device); its size and memory are what onnxruntime holds (:meth:`weights_nbytes`,
    :meth:`peak_memory_bytes`)."""

    input_names: tuple[str, ...] = ("signal",)

    def __init__(self, folder: str | os.PathLike, threads: int | None = None) -> None:
        super().__init__()
        self.folder = Path(folder)
        self.path = self.folder / ONNX_FILE
        if not self.path.is_file():
            raise QuantizeError(f"{self.folder}: no {ONNX_FILE}")
        self.contract = read_contract(self.path)
        self.input_names = (self.contract["input"]["name"],)
        self._dtype = np.dtype(self.contract["input"]["dtype"])
        self.session = session(self.path, threads)
        self.anchor = nn.Parameter(torch.empty(0), requires_grad=False)

    @property
    def num_parameters(self) -> int:
        return int(self.contract["model"]["parameters"])

    def forward(self, **inputs: Any) -> ECGModelOutput:
        name = self.input_names[0]
        if name not in inputs:
            raise ValueError(f"{self.path}: this ONNX student reads {name!r}, got "
                             f"{sorted(inputs)}")
        x = inputs[name].detach().cpu()
        x = (x.float() if x.is_floating_point() else x).numpy().astype(self._dtype, copy=False)
        logits = self.session.run(["logits"], {name: np.ascontiguousarray(x)})[0]
        return ECGModelOutput(logits=torch.from_numpy(logits))

    def weights_nbytes(self) -> int:
        """Bytes of the graph's stored tensors (initializers and constants)."""
        model = onnx.load(str(self.path))
        total = sum(onnx.numpy_helper.to_array(t).nbytes for t in model.graph.initializer)
        for node in model.graph.node:
            if node.op_type == "Constant":
                for a in node.attribute:
                    if a.type == onnx.AttributeProto.TENSOR:
                        total += onnx.numpy_helper.to_array(a.t).nbytes
        return int(total)

    def peak_memory_bytes(self, **inputs: torch.Tensor) -> int:
        """Peak resident memory a fresh process adds to load this model and run it once on
        ``inputs`` (its input by name): onnxruntime allocates outside PyTorch's profiler, so
        this is the peak resident set of a process that has imported onnxruntime and holds
        the input, less its resident set just before the model is loaded (Linux only: it
        reads ``/proc/self/status``)."""
        with tempfile.TemporaryDirectory() as work:
            x = inputs[self.input_names[0]]
            np.save(path := Path(work) / "x.npy", x.detach().cpu().numpy().astype(self._dtype))
            code = _PEAK_PROBE.format(path=str(self.path), x=str(path), name=self.input_names[0],
                                      threads=self.session.get_session_options()
                                      .intra_op_num_threads)
            proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                  timeout=300)
        if proc.returncode != 0:
            raise QuantizeError(f"{self.path}: memory probe failed: "
                                f"{proc.stderr.strip().splitlines()[-1:]}")
        return int(proc.stdout.split()[-1])


# The peak resident set is reset (Linux: 5 -> /proc/self/clear_refs) once onnxruntime,
# numpy and the input are loaded, so VmHWM afterwards is the peak of loading and running.
_PEAK_PROBE = """
import numpy as np, onnxruntime as ort
def status(key):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith(key))
x = np.load({x!r}); x.sum()
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
before = status("VmRSS:")
o = ort.SessionOptions(); o.intra_op_num_threads = {threads}; o.inter_op_num_threads = 1
s = ort.InferenceSession({path!r}, o, providers=["CPUExecutionProvider"])
s.run(["logits"], {{{name!r}: x}})
print(status("VmHWM:") - before)
"""
