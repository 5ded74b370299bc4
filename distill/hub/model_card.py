"""The model card (``README.md``) of an exported student, built with huggingface_hub's
``ModelCard`` / ``ModelCardData`` so the hub reads its metadata: license, tags, library,
datasets, ``base_model`` (the teacher) and a ``model-index`` holding the test-fold macro
AUROC with its bootstrap interval.

The card's usage snippet (:func:`usage_snippet`) is tested: the tests extract it from a
card (:func:`card_snippet`), point its two settings at a folder and a WFDB record, and run
it in a fresh interpreter.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from distill.core.layout import ModelId, is_onnx_format
from distill.core.leads import STANDARD_LEADS

LIBRARY = "transformers"
DEFAULT_RECORD = "records100/00000/00001_lr"  # the snippet's example record (PTB-XL layout)
TAGS = ("ecg", "electrocardiogram", "knowledge-distillation", "ecg-distill",
        "multi-label-classification")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def usage_snippet(model: str, record: str) -> str:
    """Python that loads the model and scores one WFDB record (``MODEL`` and ``RECORD``
    are its only settings)."""
    return f'''import torch
from transformers import AutoModel

import students  # ecg-distill's students: registers them with AutoModel
from students.preprocess import prepare_record

MODEL = "{model}"  # the hub id, or the path of this folder
RECORD = "{record}"  # a WFDB record: its path without .hea/.dat (or .hea/.mat)

model = AutoModel.from_pretrained(MODEL).eval()
# the leads the model reads, in its order, resampled, cropped/padded and scaled as in training
signal = prepare_record(RECORD, model.config)  # (1, leads, samples)
with torch.no_grad():
    probs = torch.sigmoid(model(signal=signal).logits)[0]  # multi-label: one sigmoid per label
for i, p in enumerate(probs.tolist()):
    print(f"{{model.config.id2label[i]:<8}} {{p:.3f}}")
'''


def image_usage_snippet(model: str, record: str) -> str:
    """Python that loads an image student and scores one WFDB record printed as in training
    (``MODEL`` and ``RECORD`` are its only settings)."""
    return f'''import torch
from transformers import AutoModel

import students  # ecg-distill's students: registers them with AutoModel
from students.preprocess import prepare_printout

MODEL = "{model}"  # the hub id, or the path of this folder
RECORD = "{record}"  # a WFDB record: its path without .hea/.dat (or .hea/.mat)

model = AutoModel.from_pretrained(MODEL).eval()
# the record printed as the model was trained on it: uint8 (1, 3, S, S); a scanned or
# photographed printout resized to S x S (RGB, uint8) goes in the same way
image = prepare_printout(RECORD, model.config)
with torch.no_grad():
    probs = torch.sigmoid(model(image=image).logits)[0]  # multi-label: one sigmoid per label
for i, p in enumerate(probs.tolist()):
    print(f"{{model.config.id2label[i]:<8}} {{p:.3f}}")
'''


def onnx_usage_snippet(record: str) -> str:
    """Python that scores one WFDB record with the folder's ``model.onnx`` using numpy, scipy,
    wfdb and onnxruntime only (no ecg-distill, no torch): it reads the input contract stored
    in the file's metadata and prepares the record as training did (``MODEL`` and ``RECORD``
    are its only settings)."""
    return f'''import json

import numpy as np
import onnxruntime as ort
import wfdb
from fractions import Fraction
from scipy.signal import resample_poly

MODEL = "model.onnx"  # this folder's model.onnx
RECORD = "{record}"  # a WFDB record in mV: its path without .hea/.dat

session = ort.InferenceSession(MODEL, providers=["CPUExecutionProvider"])
contract = json.loads(session.get_modelmeta().custom_metadata_map["ecg_distill.contract"])
inp, out = contract["input"], contract["output"]
rec = wfdb.rdrecord(RECORD)
names = [n.upper() for n in rec.sig_name]
x = np.stack([rec.p_signal[:, names.index(lead.upper())] for lead in inp["leads"]])  # (L, T) mV
norm = inp["normalization"]
if norm["kind"] != "none":  # the training scaler, per standard lead
    rows = [norm["lead_order"].split().index(lead) for lead in inp["leads"]]
    x = (x - np.asarray(norm["mean"])[rows, None]) / np.asarray(norm["std"])[rows, None]
ratio = Fraction(inp["sampling_rate"]) / Fraction(rec.fs).limit_denominator(10_000)
if ratio != 1:  # polyphase resampling, as in training
    x = resample_poly(x, ratio.numerator, ratio.denominator, axis=-1)
n = inp["shape"][2]
x = np.pad(x[:, :n], ((0, 0), (0, max(0, n - x.shape[1]))))  # crop or zero-pad to n samples
logits = session.run(["logits"], {{"signal": x[None].astype(np.float32)}})[0][0]
for name, p in zip(out["classes"], 1 / (1 + np.exp(-logits))):  # one sigmoid per label
    print(f"{{name:<8}} {{p:.3f}}")
'''


def onnx_image_usage_snippet(record: str) -> str:
    """Python that scores one WFDB record with an image student's ``model.onnx``: the record
    printed by ecg-distill's renderer as in training (a scan resized to the printout size
    goes in the same way), run by onnxruntime (``MODEL`` and ``RECORD`` are its only
    settings)."""
    return f'''import json
from pathlib import Path

import numpy as np
import onnxruntime as ort

from students.preprocess import prepare_printout  # ecg-distill: prints a record as in training

MODEL = "model.onnx"  # this folder's model.onnx
RECORD = "{record}"  # a WFDB record: its path without .hea/.dat

session = ort.InferenceSession(MODEL, providers=["CPUExecutionProvider"])
contract = json.loads(session.get_modelmeta().custom_metadata_map["ecg_distill.contract"])
config = json.loads(Path(MODEL).with_name("config.json").read_text())
image = prepare_printout(RECORD, config).numpy()  # uint8 (1, 3, S, S)
logits = session.run(["logits"], {{"image": image}})[0][0]
for name, p in zip(contract["output"]["classes"], 1 / (1 + np.exp(-logits))):
    print(f"{{name:<8}} {{p:.3f}}")
'''


def card_snippet(card_text: str) -> str:
    """The first ``python`` code block of a card."""
    m = re.search(r"```python\n(.*?)```", card_text, flags=re.DOTALL)
    if m is None:
        raise ValueError("the card has no python code block")
    return m.group(1)


def dataset_id(recipe) -> str:
    """The name the card gives the training data: the folder name of a real data set,
    ``synthetic-ptbxl`` for the embedded synthetic default."""
    if recipe.data.path is None:
        return "synthetic-ptbxl"
    return Path(recipe.data.path).expanduser().resolve().name.lower()


def _interval(d: dict[str, float] | None, digits: int = 3, signed: bool = False) -> str:
    if not d:
        return "–"
    fmt = f"{{:+.{digits}f}}" if signed else f"{{:.{digits}f}}"
    return f"{fmt.format(d['value'])} [{fmt.format(d['low'])}, {fmt.format(d['high'])}]"


def _leads(leads: list[str]) -> str:
    return "all 12 (I, II, III, aVR, aVL, aVF, V1–V6)" if list(leads) == list(STANDARD_LEADS) \
        else ", ".join(leads)


def model_card(name: str, entry: dict[str, Any], results: dict[str, Any], recipe,
               config: dict[str, Any], model_ref: str | None = None):
    """The card of one exported model.

    Args:
        name: its name in the run ("distill leadformer/tiny", "... nf4").
        entry: its results entry (metrics, size, paired differences).
        results: the run's results (classes, bootstrap settings, task).
        recipe: the run's :class:`~distill.recipe.Recipe`.
        config: the model's ``config.json`` content.
        model_ref: what the snippet loads (default: ``recipe.export.publish_repo`` or
            ``your-org/<folder name>``).

    Returns:
        A ``huggingface_hub.ModelCard``.
    """
    folder_name = ModelId.parse(name).folder_name
    level = results.get("bootstrap", {}).get("level", 0.95)
    auc = entry["macro_auc"]
    task = results.get("task") or recipe.data.task
    teacher = recipe.teacher.name_or_path
    quant = entry.get("kind") == "quantized"
    fmt = entry.get("format")
    tags = [*TAGS, str(task), entry.get("student", "").split("/")[0] or "student"]
    if is_onnx_format(fmt):
        tags += ["onnx", "onnxruntime", str(fmt)]
    elif quant:
        tags += ["bitsandbytes", "8-bit" if fmt == "int8" else "4-bit", str(fmt)]
    data = ModelCardData(
        license=recipe.export.license, library_name="onnx" if is_onnx_format(fmt) else LIBRARY,
        tags=tags,
        datasets=[dataset_id(recipe)],
        base_model=teacher if _HUB_ID.match(teacher) and not Path(teacher).exists() else None,
        metrics=["roc_auc"], model_name=folder_name,
        eval_results=[EvalResult(
            task_type="time-series-classification", task_name="Multi-label ECG classification",
            dataset_type=dataset_id(recipe), dataset_name=_data_description(recipe),
            dataset_config=str(task), dataset_split="test",
            metric_type="roc_auc", metric_name="macro AUROC", metric_value=round(auc["value"], 4),
            metric_args={"average": "macro", "ci_level": level, "ci_low": round(auc["low"], 4),
                         "ci_high": round(auc["high"], 4),
                         "bootstrap_resamples": results.get("bootstrap", {}).get("resamples")})])
    if data.base_model is None:
        data.teacher = teacher  # not a hub id (a local or built-in teacher): named, not linked
    ref = model_ref or recipe.export.publish_repo or f"your-org/{folder_name}"
    image = bool(config.get("image_size"))
    if is_onnx_format(fmt):
        snippet = onnx_image_usage_snippet(DEFAULT_RECORD) if image else \
            onnx_usage_snippet(DEFAULT_RECORD)
    else:
        snippet = image_usage_snippet(ref, DEFAULT_RECORD) if image else \
            usage_snippet(ref, DEFAULT_RECORD)
    body = _body(name, entry, results, recipe, config, level, snippet)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")


def _data_description(recipe) -> str:
    d = recipe.data
    if d.path is None:
        return (f"synthetic PTB-XL-layout ECGs ({d.synthetic.records} records, seed "
                f"{d.synthetic.seed})")
    layout = "PTB-XL" if d.format == "ptbxl" else "PhysioNet/CinC"
    return f"the {layout}-layout data set `{Path(d.path).name}`"


def _body(name: str, entry: dict[str, Any], results: dict[str, Any], recipe,
          config: dict[str, Any], level: float, snippet: str) -> str:
    classes = results.get("classes") or [config["id2label"][str(i)]
                                         for i in range(len(config["id2label"]))]
    norm = config["normalization"]
    seconds = config["input_samples"] / config["sampling_rate"]
    quant = entry.get("kind") == "quantized"
    onnx_fmt = is_onnx_format(entry.get("format"))
    lines = [
        f"# {name}",
        "",
        f"A compact ECG classifier ({entry.get('student')}, "
        f"{entry.get('parameters', 0):,} parameters, {entry.get('disk_mb') or 0:.2f} MB on disk) "
        + (f"distilled with ecg-distill from the teacher "
           f"`{recipe.teacher.name_or_path}` " if entry.get("kind") != "baseline" else
           "trained on the labels alone (the distillation baseline) ")
        + f"on {_data_description(recipe)}, task `{results.get('task')}`: one sigmoid per "
          f"label ({', '.join(classes)}).",
    ]
    if onnx_fmt:
        what = {"onnx": "exported to ONNX (fp32)",
                "onnx-int8": "exported to ONNX and quantized to static int8 (QDQ, per-channel "
                             "int8 weights, convolutions included, activations calibrated on "
                             "training records)",
                "onnx-int4": "exported to ONNX with 4-bit weights in its MatMul layers "
                             "(onnxruntime MatMulNBits)",
                "onnx-int8-qat": "fine-tuned under fake int8 quantization with a "
                                 "distillation loss (KD + QAT), then exported to ONNX and "
                                 "quantized to static int8 (QDQ, per-channel weights)"}[
            entry["format"]]
        lines += ["", (f"`{entry.get('fp32')}` {what}: `model.onnx` runs with onnxruntime "
                       f"alone, and its metadata (`ecg_distill.contract`) states the input it "
                       f"expects.")]
    elif quant:
        lines += ["", (f"Quantized to **{entry.get('format')}** with bitsandbytes from "
                       f"`{entry.get('fp32')}`; it loads through the `quantization_config` in "
                       f"`config.json` (bitsandbytes must be installed).")]
    if config.get("image_size"):
        size, render = config["image_size"], config.get("render") or {}
        input_lines = [
            f"- a printed 12-lead ECG: uint8 RGB `[B, 3, {size}, {size}]`, the "
            f"{render.get('layout', '3x4+II')} layout (3 rows of 4 leads and a lead II "
            f"rhythm strip) of {config['input_samples'] / config['sampling_rate']:g} s at 25 "
            f"mm/s and 10 mm/mV{', on a grid' if render.get('grid', True) else ''}",
            "- `students.preprocess.prepare_printout` prints a WFDB record as in training "
            f"(at {config['sampling_rate']} Hz, in mV); a scanned printout goes in resized to "
            f"{size} x {size}."]
    elif config.get("translate"):  # reads a translator's output (the folder ships it)
        tr = config["translate"]
        input_lines = [
            f"- leads: {_leads(config['leads'])}, in this order, recorded at "
            f"{tr['source_rate']} Hz, {config['input_samples'] * tr['source_rate'] // config['sampling_rate']} "
            f"samples ({seconds:g} s), mV",
            f"- first upsampled to {config['sampling_rate']} Hz by the translator in "
            f"`{tr['checkpoint']}/` (`ecg-distill upsample {tr['checkpoint']} RECORD --to "
            f"{config['sampling_rate']}` writes the 100 Hz WFDB record), what the student was "
            f"trained and evaluated on",
            (f"- scaling: `{norm['kind']}` standard scaler fitted on the training folds "
             f"(`normalization` in `config.json`), applied to the upsampled signal by "
             f"`students.preprocess.prepare_record`.")]
    else:
        input_lines = [
            f"- leads: {_leads(config['leads'])}, in this order",
            f"- {config['sampling_rate']} Hz, {config['input_samples']} samples ({seconds:g} s), mV",
            (f"- scaling: `{norm['kind']}` standard scaler fitted on the training folds "
             f"(`normalization` in `config.json`: mean and std per lead, "
             f"{norm.get('units', 'mV')}, lead order {norm.get('lead_order', 'standard')}); "
             "`students.preprocess.prepare_record` applies all of this to a WFDB record.")]
    lines += [
        "", "## Input", "", *input_lines,
        "", "## Usage", "",
        ("Needs onnxruntime to run the model, and ecg-distill only to print a WFDB record as "
         "in training (a scanned printout needs neither the renderer nor PyTorch)."
         if onnx_fmt and config.get("image_size") else
         "Needs only numpy, scipy, wfdb and onnxruntime (no ecg-distill, no PyTorch)."
         if onnx_fmt else
         "Needs the `ecg-distill` package installed (it defines the student classes and the "
         "preprocessing)."), "",
        "```python", snippet.rstrip("\n"), "```",
        *([] if onnx_fmt else [
            "", ("Without ecg-distill (torch and transformers only): the folder ships the "
                 "student's code, `modeling_ecg_student.py`, named in `config.json`'s "
                 "`auto_map`, so"), "",
            "```python",
            "model = AutoModel.from_pretrained(MODEL, trust_remote_code=True).eval()",
            "```", "",
            ("loads it. `trust_remote_code=True` lets transformers import and run that Python "
             "file from the folder (or the hub repository) with your permissions: read it "
             "first, and pin the revision you read. Prepare the input as the *Input* section "
             "says (leads in order, rate, length, scaling)."
             + (" bitsandbytes must be installed for this quantized variant." if quant else ""))]),
        "", (f"## Test-fold results ({results.get('test_records')} records, {level:.0%} "
             f"bootstrap intervals, {results.get('bootstrap', {}).get('resamples')} resamples)"),
        "", "| metric | value |", "|---|---|",
        f"| macro AUROC | {_interval(entry['macro_auc'])} |",
    ]
    paired = (("vs_teacher", "vs the teacher"), ("vs_baseline", "vs the label-only baseline"),
              ("vs_fp32", "vs the fp32 student"))
    for key, label in paired:
        if entry.get(key):
            lines.append(f"| macro AUROC {label} | {_interval(entry[key], signed=True)} |")
    lines += [f"| macro F-max | {entry.get('fmax', float('nan')):.3f} |",
              (f"| sample accuracy (thresholds from validation) | "
               f"{entry.get('accuracy', float('nan')):.3f} |")]
    for batch, ms in (entry.get("latency_ms") or {}).items():
        lines.append(f"| CPU latency per record, batch {batch} | {ms:.2f} ms |")
    label_auc = entry.get("label_auc") or {}
    if label_auc:
        lines += ["", "Per-label AUROC: " + ", ".join(
            f"{c} {'–' if v is None else f'{v:.3f}'}" for c, v in label_auc.items()) + "."]
    lines += [
        "", "## Files", "",
        ("`model.onnx` (the graph and its weights), `config.json` (the PyTorch student's "
         "config), " if onnx_fmt else "`model.safetensors` (weights), `config.json`, "
         "`modeling_ecg_student.py` (the model code, for `trust_remote_code`), ")
        + ("`quantization.json` (what was quantized, sizes), " if quant else "")
        + "`recipe.yaml` (the run's recipe), "
        "`results.json` (this model's results), `samples.safetensors` (a few test inputs and "
        "the run's predictions for them) and `checksums.sha256` (`sha256sum -c "
        "checksums.sha256`). `ecg-distill verify FOLDER` checks the checksums, loads the model "
        "and reproduces the stored predictions.",
        "", "## Limitations", "",
        ("A research artefact, not a medical device: the numbers above hold for the data it "
         "was evaluated on; check it on your own population, devices and label definitions "
         "before drawing any conclusion from its outputs."), "",
    ]
    return "\n".join(lines)
