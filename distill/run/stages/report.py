"""The report stage: ``report.md`` and PNG figures from ``results.json`` (with the quantize
stage's ``quantized.json``) and the training logs.

Figures (``figures/`` in the run folder):

* ``auc_vs_params.png``: test macro AUC against parameters (log scale) for every student,
  baseline and distilled, with their bootstrap intervals as bars and the teacher as a
  line with its interval as a band;
* ``training_curves.png``: validation macro AUC and training loss per epoch of every job;
* ``transport_plan.png``: the OT plan of one test record between a distilled student's
  tokens and the teacher's tokens (both ordered by lead, leads marked);
* ``spectrum.png``: normalised singular values of the teacher's and the students' token
  features over test records (how many directions the features really use).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import torch
from safetensors.torch import load_file
from transformers import AutoModel

import students  # noqa: F401  (registers the student classes with AutoModel)
import teachers
from distill.core.io import atomic_write_text
from distill.core.layout import TEACHER, TRAINED_KINDS, ModelId, RunLayout
from distill.core.leads import STANDARD_LEADS
from distill.data.perturb import perturbation_figure
from distill.engine.factory import build_objective, student_inputs, student_name
from distill.engine.jobs import OBJECTIVE_FILE, JobData, load_frozen_teacher, teacher_inputs
from distill.metrics.footprint import format_count
from distill.metrics.results import load_results
from distill.run.stage import TRAINED, RunContext, Stage, distill_stage_settings


def _plt():
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _fmt(iv: dict[str, float] | None, signed: bool = False) -> str:
    if not iv:
        return "–"
    v = f"{iv['value']:+.3f}" if signed else f"{iv['value']:.3f}"
    return f"{v} [{iv['low']:+.3f}, {iv['high']:+.3f}]" if signed else \
        f"{v} [{iv['low']:.3f}, {iv['high']:.3f}]"


def _count(n: float) -> str:
    return format_count(n)


def model_table(results: dict[str, Any], kinds: tuple[str, ...] = ("teacher", "baseline",
                                                                   "distill")) -> str:
    """The main table: one row per model."""
    head = ("| model | parameters | size (MB) | memory b64 (MB) | latency b1 / b64 (ms/record) "
            "| macro AUC [95% CI] | Δ teacher [CI] | Δ baseline [CI] | F-max | accuracy |")
    rows = [head, "|" + "---|" * 10]
    for name, m in results["models"].items():
        if m["kind"] not in kinds:
            continue
        disk = "–" if m.get("disk_mb") is None else f"{m['disk_mb']:.2f}"
        lat = m["latency_ms"]
        rows.append(
            f"| {name} | {_count(m['parameters'])} | {disk} | {m['peak_memory_mb']['64']:.1f} "
            f"| {lat['1']:.2f} / {lat['64']:.2f} | {_fmt(m['macro_auc'])} "
            f"| {_fmt(m.get('vs_teacher'), True)} | {_fmt(m.get('vs_baseline'), True)} "
            f"| {m['fmax']:.3f} | {m['accuracy']:.3f} |")
    return "\n".join(rows)


def ablation_table(results: dict[str, Any]) -> str | None:
    rows = [(n, m) for n, m in results["models"].items() if m["kind"] == "ablation"]
    if not rows:
        return None
    student = rows[0][1]["student"]
    full = results["models"].get(ModelId.parse(rows[0][0]).as_kind("distill").name)
    out = ["| variant | macro AUC [95% CI] | Δ full recipe [CI] | Δ baseline [CI] |",
           "|---|---|---|---|"]
    if full:
        out.append(f"| full recipe | {_fmt(full['macro_auc'])} | – "
                   f"| {_fmt(full.get('vs_baseline'), True)} |")
    for name, m in rows:
        out.append(f"| {m.get('ablation', name)} | {_fmt(m['macro_auc'])} "
                   f"| {_fmt(m.get('vs_full'), True)} | {_fmt(m.get('vs_baseline'), True)} |")
    return f"Ablations of {student}:\n\n" + "\n".join(out)


def stress_table(results: dict[str, Any]) -> str | None:
    """Every model reading printouts: macro AUC on the clean test printouts and, per
    variation, its paired change from clean."""
    st = results.get("stress")
    if not st or not st.get("models"):
        return None
    names = list(st["variations"])
    rest = [n for n in names if n != "clean"]
    out = ["| model | clean macro AUC [95% CI] | " + " | ".join(f"Δ {n}" for n in rest) + " |",
           "|---|---|" + "---|" * len(rest)]
    for model, per in st["models"].items():
        cells = [_fmt(per[n].get("vs_clean"), True) for n in rest]
        out.append(f"| {model} | {_fmt(per['clean']['macro_auc'])} | " + " | ".join(cells) + " |")
    kinds = "; ".join(f"{n}: {', '.join(k)}" for n, k in st["variations"].items()
                      if n not in ("clean",) and len(k) > 1)
    return ("Printout robustness: macro AUC on the test fold's clean printouts, and its change "
            "[95% CI, paired] on the same records printed with each variation (one fixed draw "
            f"per record and variation; {kinds}):\n\n" + "\n".join(out))


def quantization_table(results: dict[str, Any]) -> str | None:
    """Each quantized student: its fp32 row (measured beside it), then every variant."""
    q = results.get("quantization")
    if not q or not q.get("reference"):
        return None
    head = ("| model | format | quantized params | size (MB) | smaller: file / quantized part "
            "| memory b1 / b64 (MB) | latency b1 / b64 (ms/record) | macro AUC [95% CI] "
            "| Δ fp32 [CI] |")
    rows, notes = [head, "|" + "---|" * 9], []

    def row(name: str, m: dict[str, Any], fmt: str, share: str, ratio: str, diff: str) -> str:
        mem, lat = m["peak_memory_mb"], m["latency_ms"]
        return (f"| {name} | {fmt} | {share} | {m['disk_mb']:.3f} | {ratio} "
                f"| {mem['1']:.1f} / {mem['64']:.1f} | {lat['1']:.2f} / {lat['64']:.2f} "
                f"| {_fmt(m['macro_auc'])} | {diff} |")

    for ref_name, ref in q["reference"].items():
        rows.append(row(ref_name, ref, "fp32", "–", "–", "–"))
        for name, m in results["models"].items():
            if m["kind"] != "quantized" or m.get("fp32") != ref_name:
                continue
            s = m["quantization"]
            rows.append(row(name, m, m["format"], f"{s['fraction']:.0%}",
                            f"{s['ratio_file']:.2f}x / {s['ratio_part']:.2f}x",
                            _fmt(m.get("vs_fp32"), True)))
            notes += [f"{name}: {n}" for n in s["notes"]
                      if "convolution" in n or "no layer" in n or "Gemm" in n]
    for name, why in q.get("skipped", {}).items():
        notes.append(f"{name}: not quantized ({why})")
    text = ("Quantized students (bitsandbytes int8/nf4/fp4: Linear layers only, the output "
            "layer in fp32; onnx: the fp32 graph run by onnxruntime; onnx-int8: static int8 "
            "QDQ with per-channel weights, convolutions included; onnx-int4: 4-bit weights of "
            "MatMul nodes). Memory of an ONNX variant is the peak resident memory a fresh "
            "onnxruntime process adds to load and run it (runtime included), of a PyTorch "
            "model its weights plus peak activations:\n\n")
    text += "\n".join(rows)
    if notes:
        text += "\n\n" + "\n".join(f"- {n}" for n in dict.fromkeys(notes))
    return text


#: The largest AUC loss against fp32 (point estimate) at which a deployment variant still
#: counts as lossless; a gain never disqualifies.
DEPLOY_TOLERANCE = 0.005


def deployment_advice(results: dict[str, Any], tolerance: float = DEPLOY_TOLERANCE) -> str | None:
    """Which format to deploy where, per student, read from this run's measurements.

    Among the formats that lose at most ``tolerance`` macro AUC against the student's fp32
    model (fp32 itself included; a gain never disqualifies): for a CPU box the one with the
    lowest batch-1 latency, for the edge (a phone, a wearable: onnxruntime and the file, no
    PyTorch) the ONNX variant with the smallest file (to the kB; then the faster). A GPU
    server is not measured by this stage, and the text says so.
    """
    q = results.get("quantization")
    if not q or not q.get("reference"):
        return None
    rows = ["| student | CPU box: fastest at batch 1 (ms/record) | edge: smallest ONNX file |",
            "|---|---|---|"]
    for ref_name, ref in q["reference"].items():
        variants = [(m["format"], m) for m in results["models"].values()
                    if m["kind"] == "quantized" and m.get("fp32") == ref_name
                    and m.get("vs_fp32") and m.get("disk_mb") and m.get("latency_ms")]
        if not variants:
            continue
        kept = [("fp32 (PyTorch)", ref)] + [
            (f, m) for f, m in variants if m["vs_fp32"]["value"] >= -tolerance]
        fast_name, fast = min(kept, key=lambda c: c[1]["latency_ms"]["1"])
        cpu = f"{fast_name}: {fast['latency_ms']['1']:.2f}"
        if fast is not ref:
            cpu += f" (PyTorch fp32: {ref['latency_ms']['1']:.2f})"
        onnx = [c for c in kept if c[0].startswith("onnx")]
        if onnx:
            small_name, small = min(onnx, key=lambda c: (round(c[1]["disk_mb"] * 1000),
                                                         c[1]["latency_ms"]["1"]))
            edge = (f"{small_name}: {small['disk_mb'] * 1000:.0f} kB "
                    f"(fp32: {ref['disk_mb'] * 1000:.0f} kB)")
        else:
            edge = f"none losing at most {tolerance} AUC (or no ONNX format in the recipe)"
        rows.append(f"| {ref_name} | {cpu} | {edge} |")
    if len(rows) == 2:
        return None
    return (f"Which target where, from this run's measurements: among the formats that lose "
            f"at most {tolerance} macro AUC against fp32 on this test fold, the fastest at "
            f"batch 1 on this machine's CPU (one measurement each: `benchmarks/deploy.py` "
            f"gives interleaved medians) and the smallest ONNX file. A GPU server is not "
            f"measured by this stage: there, serve the PyTorch folder; bitsandbytes int8/nf4 "
            f"pays where Linear weights dominate memory, as in a VLM teacher loaded with "
            f"`teacher.load_in`.\n\n" + "\n".join(rows))


def teacher_memory_table(results: dict[str, Any]) -> str | None:
    """The teacher's memory at each precision it was loaded in."""
    mem = (results.get("quantization") or {}).get("teacher_memory")
    if not mem:
        return None
    names = {"none": "fp32", "8bit": "8-bit (LLM.int8)", "4bit": "4-bit (nf4)"}
    rows = ["| teacher precision | weights (MB) | weights + peak activations b1 (MB) |",
            "|---|---|---|"]
    for precision, m in mem.items():
        label = names.get(precision, precision)
        if "error" in m:
            rows.append(f"| {label} | – | could not load here: {m['error']} |")
        else:
            rows.append(f"| {label} | {m['weights_mb']:.2f} | {m['peak_memory_mb']:.1f} |")
    return "Teacher memory by precision (CPU):\n\n" + "\n".join(rows)


def plot_auc_vs_params(results: dict[str, Any], path: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    models = results["models"]
    teacher = next((m for m in models.values() if m["kind"] == "teacher"), None)
    if teacher:
        auc = teacher["macro_auc"]
        ax.axhline(auc["value"], color="black", lw=1.2,
                   label=f"teacher ({_count(teacher['parameters'])} parameters)")
        ax.axhspan(auc["low"], auc["high"], color="black", alpha=0.08)
    styles = {"baseline": ("o", "--", "tab:gray", "label-only baseline"),
              "distill": ("s", "-", "tab:blue", "distilled")}
    for kind, (marker, ls, color, label) in styles.items():
        pts = sorted((m["parameters"], m["macro_auc"]) for m in models.values()
                     if m["kind"] == kind)
        if not pts:
            continue
        x = np.array([p for p, _ in pts], dtype=float)
        y = np.array([a["value"] for _, a in pts])
        err = np.array([[a["value"] - a["low"] for _, a in pts],
                        [a["high"] - a["value"] for _, a in pts]])
        ax.errorbar(x, y, yerr=err, marker=marker, ls=ls, color=color, capsize=3, label=label)
    ax.set_xscale("log")
    ax.set_xlabel("student parameters (log scale)")
    ax.set_ylabel("test macro AUC (95% CI)")
    ax.set_title("Student size against the teacher's AUC")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(plt, fig, path)


def _read_log(path: Path) -> list[dict[str, float]]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return [{k: float(v) for k, v in row.items() if v not in ("", None)}
                for row in csv.DictReader(f)]


def plot_training_curves(run_dir: Path, path: Path) -> Path | None:
    layout = RunLayout(run_dir)
    logs = {TEACHER: _read_log(layout.job_dir(ModelId.teacher()) / "log.csv")}
    for kind in TRAINED_KINDS[:2]:  # baseline, distill
        for folder in layout.trained(kind):
            logs[f"{kind} {folder.name}"] = _read_log(folder / "log.csv")
    logs = {k: v for k, v in logs.items() if v}
    if not logs:
        return None
    plt = _plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for name, rows in logs.items():
        ls = "--" if name.startswith("baseline") else ("-" if name.startswith("distill") else ":")
        ep = [r["epoch"] for r in rows]
        a1.plot(ep, [r.get("val_macro_auc", np.nan) for r in rows], ls=ls, marker=".", label=name)
        a2.plot(ep, [r.get("train_task", r.get("train_loss", np.nan)) for r in rows], ls=ls,
                marker=".", label=name)
    a1.set(xlabel="epoch", ylabel="validation macro AUC", title="Validation AUC")
    a2.set(xlabel="epoch", ylabel="training BCE on the labels", title="Task loss", yscale="log")
    for a in (a1, a2):
        a.grid(alpha=0.3)
    a1.legend(fontsize=7)
    return _save(plt, fig, path)


def _lead_name(i: int) -> str:
    return STANDARD_LEADS[i] if 0 <= i < len(STANDARD_LEADS) else "–"


def plot_transport_plan(plan: np.ndarray, student_leads: np.ndarray, teacher_leads: np.ndarray,
                        path: Path, title: str, teacher_axis: str = "teacher image patches, "
                        "grouped by the lead drawn in them (– = none)") -> Path:
    """The plan [N_s, N_t] with rows and columns grouped by lead and lead blocks marked."""
    plt = _plt()
    rs = np.argsort(np.where(student_leads < 0, 99, student_leads), kind="stable")
    cs = np.argsort(np.where(teacher_leads < 0, 99, teacher_leads), kind="stable")
    p = plan[np.ix_(rs, cs)] * plan.shape[0]  # each row sums to 1
    fig, ax = plt.subplots(figsize=(9, 4.2))
    im = ax.imshow(p, aspect="auto", cmap="magma", interpolation="nearest")
    fig.colorbar(im, ax=ax, label="transported mass (row-normalised)")

    def blocks(leads: np.ndarray) -> list[tuple[int, int, str]]:
        out, start = [], 0
        for i in range(1, len(leads) + 1):
            if i == len(leads) or leads[i] != leads[start]:
                out.append((start, i, _lead_name(int(leads[start]))))
                start = i
        return out

    sl, tl = student_leads[rs], teacher_leads[cs]
    xb, yb = blocks(tl), blocks(sl)
    for s, e, _ in xb[1:]:
        ax.axvline(s - 0.5, color="white", lw=0.4)
    ax.set_xticks([(s + e - 1) / 2 for s, e, _ in xb], [n for *_, n in xb], fontsize=7)
    if len(yb) < len(sl):  # tokens grouped by lead
        for s, e, _ in yb[1:]:
            ax.axhline(s - 0.5, color="white", lw=0.4)
        ax.set_yticks([(s + e - 1) / 2 for s, e, _ in yb], [n for *_, n in yb], fontsize=7)
        ax.set_ylabel("student tokens (by lead)")
    else:
        ax.set_ylabel("student tokens")
    ax.set_xlabel(teacher_axis)
    ax.set_title(title, fontsize=9)
    return _save(plt, fig, path)


def singular_values(tokens: torch.Tensor) -> np.ndarray:
    """Singular values of centred token features [M, D], divided by the largest."""
    x = tokens.reshape(-1, tokens.shape[-1]).double()
    s = torch.linalg.svdvals(x - x.mean(0))
    return (s / s[0]).numpy()


def plot_spectrum(spectra: dict[str, np.ndarray], path: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for name, s in spectra.items():
        ax.plot(np.arange(1, len(s) + 1) / len(s), s, label=f"{name} (D={len(s)})",
                lw=2 if name == "teacher" else 1.2)
    ax.set_yscale("log")
    ax.set_xlabel("singular value rank / feature width")
    ax.set_ylabel("σ_i / σ_1")
    ax.set_title("Singular-value spectrum of token features (test records)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(plt, fig, path)


def has_leads(out: Any) -> bool:
    """Whether a model's tokens carry their leads (token_leads >= 0 for some)."""
    return bool((out.token_leads >= 0).any())


def token_figures(jd: JobData, run_dir: Path, fig_dir: Path, records: int = 32) -> dict[str, Any]:
    """The transport-plan and spectrum figures: tokens of a few test records from the
    teacher and every distilled student. Returns what was drawn (or why not)."""
    recipe = jd.recipe
    layout = RunLayout(run_dir)
    test = jd.data.split("test", jd.views, extras=jd.image_extras())
    batch = torch.utils.data.default_collate([test[i] for i in range(min(records, len(test)))])
    teacher = load_frozen_teacher(jd, run_dir)
    with torch.no_grad():
        t_out = teacher(**teacher_inputs(recipe)(batch))
    spectra = {"teacher": singular_values(t_out.tokens)}
    drawn: dict[str, Any] = {}
    for spec in recipe.students:
        folder = layout.model_dir(ModelId.student("distill", spec))
        if not folder.exists():
            continue
        model = AutoModel.from_pretrained(folder).eval()
        with torch.no_grad():
            s_out = model(**student_inputs(spec)(batch))
        spectra[f"distilled {student_name(spec)}"] = singular_values(s_out.tokens)
        objective_path = folder / OBJECTIVE_FILE
        # the first student whose tokens carry leads (lead-to-lead transport), else the first
        if (drawn.get("plan_has_leads") or ("plan" in drawn and not has_leads(s_out))
                or recipe.distill.weights.get("ot", 0) <= 0 or not objective_path.exists()):
            continue
        objective = build_objective(recipe, s_out.tokens.shape[-1], t_out.tokens.shape[-1])
        objective.load_state_dict(load_file(str(objective_path)), strict=False)
        with torch.no_grad():
            ot = objective.losses["ot"](s_out, t_out, {}, None)
        plan = ot.aux["plan"][0].numpy()
        drawn["plan"] = str(plot_transport_plan(
            plan, s_out.token_leads.numpy(), t_out.token_leads.numpy(),
            fig_dir / "transport_plan.png",
            f"OT plan, test record {int(batch['ecg_id'][0])}: {student_name(spec)} tokens "
            f"against teacher tokens",
            teacher_axis=("teacher image patches, grouped by the lead drawn in them (– = none)"
                          if teacher.reads_images() else
                          "teacher tokens, grouped by lead (– = spans several)")))
        drawn["plan_has_leads"] = has_leads(s_out)
        if has_leads(s_out) and (t_out.token_leads >= 0).any():
            same = (s_out.token_leads[:, None] == t_out.token_leads[None, :]).float()  # (Ns, Nt)
            mass = ot.aux["plan"]  # (B, Ns, Nt)
            share = (mass * same).sum((1, 2)) / mass.sum((1, 2))  # (B,)
            drawn["same_lead"] = {"student": student_name(spec), "records": len(share),
                                  "mean": float(share.mean()), "min": float(share.min()),
                                  "max": float(share.max()), "blind": float(same.mean())}
    if "plan" not in drawn:
        drawn["plan_missing"] = "no distilled student with the OT term (distill.weights.ot = 0)"
    drawn["spectrum"] = str(plot_spectrum(spectra, fig_dir / "spectrum.png"))
    return drawn


def teacher_line(recipe: Any) -> str:
    """"Teacher: <kind> `<name>` (<family>), train mode <mode>."."""
    t = recipe.teacher
    family = teachers.teacher_class(t.kind).family_of(t.name_or_path)
    return (f"Teacher: {t.kind} `{t.name_or_path}`{f' ({family})' if family else ''}, "
            f"train mode {t.train_mode}.")


def write_report(jd: JobData, run_dir: Path) -> Path:
    """``report.md`` and the figures, from ``results.json`` and the job logs."""
    results = load_results(run_dir)
    layout = RunLayout(run_dir)
    fig_dir = layout.figures_dir
    fig_dir.mkdir(parents=True, exist_ok=True)
    plot_auc_vs_params(results, fig_dir / "auc_vs_params.png")
    curves = plot_training_curves(run_dir, fig_dir / "training_curves.png")
    tokens = token_figures(jd, run_dir, fig_dir)
    recipe = jd.recipe
    b = results["bootstrap"]
    lines = [
        f"# {recipe.name}: students against the teacher",
        "",
        f"Task {results['task']} ({', '.join(results['classes'])}); records "
        + ", ".join(f"{k} {v}" for k, v in results["records"].items())
        + f". Test-fold metrics; intervals: {b['level']:.0%} percentile bootstrap over "
          f"{b['resamples']} resamples (seed {b['seed']}), differences paired on the same "
          f"resamples. Latency: CPU, forward pass, ms per record at batch 1 / 64 (fastest "
          f"of {recipe.evaluate.latency_repeats} passes); memory: weights + peak "
          f"activations at batch 64.",
        "",
        teacher_line(recipe),
        "",
        model_table(results),
        "",
    ]
    for extra in (ablation_table(results), stress_table(results), quantization_table(results),
                  deployment_advice(results), teacher_memory_table(results)):
        if extra:
            lines += [extra, ""]
    if results.get("stress") and jd.images is not None:
        first = int(np.sort(jd.data.splits["test"])[0])
        perturbation_figure(np.asarray(jd.images[first]), fig_dir / "perturbations.png",
                            seed=recipe.evaluate.seed)
        lines += ["![a test printout under every variation](figures/perturbations.png)", ""]
    lines += ["![macro AUC against parameters](figures/auc_vs_params.png)", ""]
    if curves:
        lines += ["![training curves](figures/training_curves.png)", ""]
    if "plan" in tokens:
        lines += ["![transport plan](figures/transport_plan.png)", ""]
        if "same_lead" in tokens:
            d = tokens["same_lead"]
            lines += [f"Lead-to-lead transport ({d['student']}, {d['records']} test records): "
                      f"{d['mean']:.3f} of the transported mass stays on the same lead "
                      f"(per record {d['min']:.3f}–{d['max']:.3f}); a plan blind to leads "
                      f"would keep {d['blind']:.3f}.", ""]
    else:
        lines += [f"No transport plan: {tokens['plan_missing']}.", ""]
    lines += ["![singular-value spectrum](figures/spectrum.png)", ""]
    return atomic_write_text(layout.report_file, "\n".join(lines))


def run(ctx: RunContext) -> dict[str, Any]:
    path = write_report(ctx.job_data(), ctx.run_dir)
    print(f"report: {path}")
    return {"report": str(path)}


STAGE = Stage("report", "write report.md and the figures", (*TRAINED, "quantize"), run,
              ("report.md", "figures"), main_only=True, settings=distill_stage_settings)
