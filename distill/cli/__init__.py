"""The ``ecg-distill`` command (also ``python -m distill``).

Every subcommand has ``--help``. Errors the user can act on (a recipe key, a data file, a
record) print one line, ``error: ...``, and exit with status 2; nothing already written is
overwritten without ``--force``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from distill import __version__
from distill.core.errors import ECGDistillError
from pathlib import Path

RECIPE_HELP = "a recipe YAML file (see recipes/)"
OVERRIDES_HELP = "recipe overrides as key.path=value, e.g. train.epochs=3 data.sampling_rate=500"


def _add_recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help=RECIPE_HELP)
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=OVERRIDES_HELP)


def _cmd_validate(args: argparse.Namespace) -> int:
    from distill.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    print(recipe.to_yaml(), end="")
    return 0


# training commands: the stages each one runs (the ones before are skipped when complete)
TRAIN_COMMANDS = {
    "teacher": (("data", "teacher"),
                "fine-tune or adapt the teacher on the labels (train_mode full, lora or head)"),
    "baseline": (("data", "baseline"), "train every student of the recipe on the labels alone"),
    "distill": (("data", "teacher", "teacher_cache", "distill"),
                "train every student with the distillation objective against the teacher"),
}


def _cmd_run(args: argparse.Namespace) -> int:
    from distill.run.pipeline import run_pipeline
    from distill.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    stages = TRAIN_COMMANDS[args.command][0] if args.command in TRAIN_COMMANDS else None
    seeds, fractions = getattr(args, "seeds", None), getattr(args, "label_fractions", None)
    if args.command == "run" and (seeds or fractions or recipe.sweep.seeds
                                  or recipe.sweep.label_fractions):
        from distill.run.sweep import run_sweep

        run_sweep(recipe, seeds, fractions, dry_run=args.dry_run, progress=not args.quiet,
                  force=args.force)
        return 0
    # `run` is the resumable pipeline: it continues an interrupted training job of the same
    # settings by itself; the single training commands do so when asked (--resume)
    run_pipeline(recipe, force=args.force, dry_run=args.dry_run, progress=not args.quiet,
                 resume=args.resume or args.command == "run", stages=stages)
    if not args.dry_run:
        from distill.engine.accel import process_state

        process_state().destroy_process_group()  # under accelerate launch; else a no-op
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    from distill.recipe import load_recipe
    from distill.run.plan import format_plan, plan_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    log = (lambda line: None) if args.quiet else (lambda line: print(f"[plan] {line}",
                                                                      file=sys.stderr))
    plan = plan_recipe(recipe, records=args.records, batches=args.batches,
                       progress=not args.quiet, log=log)
    print(format_plan(plan))
    return 0


def _cmd_pretrain(args: argparse.Namespace) -> int:
    from distill.engine.pretrain import run_pretrain
    from distill.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    s = run_pretrain(recipe, resume=args.resume, force=args.force, progress=not args.quiet)
    best = s.get("best_val_loss", s.get("best_val_mse"))  # summaries before issue 20
    loss = "–" if best is None else f"{best:.4f}"
    what = {"rvq": "reconstruction MSE (all codebooks)",
            "hypnos": "next-code cross-entropy (nats)"
            }.get(s["family"], "reconstruction MSE of the hidden patches")
    size = s.get("encoder_parameters", s.get("parameters"))
    print(f"pretrained {s['family']}/{s['size']} ({size:,} "
          f"{'encoder ' if 'encoder_parameters' in s else ''}parameters) on "
          f"{s['records']['train']} records: best validation {what} {loss} (epoch "
          f"{s['best_epoch']}); model in {s['model']}")
    return 0


def _cmd_probe(args: argparse.Namespace) -> int:
    from distill.run.probe import format_probe, run_probe

    result = run_probe(args.checkpoint, args.data, out=args.out, fractions=args.fractions,
                       finetune_fractions=args.finetune_fractions, epochs=args.epochs,
                       lr=args.lr, bootstrap=args.bootstrap, seed=args.seed, label=args.label,
                       force=args.force, progress=not args.quiet)
    print(format_probe(result))
    print(f"wrote {result['out']}/{'codec' if result.get('kind') == 'codec' else 'probe'}.json")
    return 0


def _cmd_translate(args: argparse.Namespace) -> int:
    from distill.run.upsample import format_evaluation, load_translate_recipe, run_translate

    tr = load_translate_recipe(args.recipe, args.overrides)
    s = run_translate(tr, resume=args.resume, force=args.force, progress=not args.quiet)
    print(format_evaluation(s["evaluation"]))
    print(f"translator in {s['translator']['model']}; summary in {tr.run_dir / 'translate.json'}")
    return 0


def _cmd_upsample(args: argparse.Namespace) -> int:
    from distill.run.upsample import upsample_record

    header = upsample_record(args.checkpoint, args.record, to=args.to, out=args.out,
                             force=args.force)
    print(f"wrote {header} ({args.to} Hz)")
    return 0


def _add_run_args(p: argparse.ArgumentParser) -> None:
    _add_recipe_args(p)
    p.add_argument("--dry-run", action="store_true", help="print the plan and do nothing")
    p.add_argument("--force", action="append", default=[], metavar="STAGE",
                   help="delete this stage's results and redo it (repeatable)")
    p.add_argument("--resume", action="store_true",
                   help="continue interrupted training from its newest complete checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_run)


def _cmd_eval(args: argparse.Namespace) -> int:
    import json

    from distill.run.stages.evaluate import evaluate_checkpoint
    from distill.core.io import atomic_write_text

    from distill.data.cinc import format_unmapped

    result = evaluate_checkpoint(args.checkpoint, args.data, task=args.task, split=args.split,
                                 bootstrap=args.bootstrap, seed=args.seed,
                                 progress=not args.quiet, fmt=args.format)
    auc = result["macro_auc"]
    print(f"{result['checkpoint']} on {result['data']} ({result['split']}, "
          f"{result['records']} records, task {result['task']})")
    report = result.get("label_report")
    if report is not None:  # a CinC folder: what the SNOMED -> PTB-XL mapping left out
        print(format_unmapped(report))
        print(f"{report['dropped_without_label']} of {report['records']} record(s) have no "
              f"label among the student's classes and are not scored")
    print(f"macro AUC {auc['value']:.4f} [{auc['low']:.4f}, {auc['high']:.4f}] "
          f"({result['bootstrap']['level']:.0%} CI, {args.bootstrap} resamples)")
    for name, value in result["label_auc"].items():
        print(f"  {name:<10} AUC {'–' if value is None else f'{value:.4f}'}")
    where = ("the validation fold" if result["split"] == "test"
             else "the scored records themselves")
    print(f"F-max {result['fmax']:.4f}, accuracy {result['accuracy']:.4f} "
          f"(thresholds chosen on {where})")
    if args.out:
        atomic_write_text(args.out, json.dumps(result, indent=1))
        print(f"wrote {args.out}")
    return 0


def _cmd_quantize(args: argparse.Namespace) -> int:
    from pathlib import Path

    from distill.compress.quantize import format_for_bits, quantize_folder

    fmt = format_for_bits(args.bits, args.quant_type)
    source = Path(args.checkpoint)
    out = Path(args.out) if args.out else source.with_name(f"{source.name}-{fmt}")
    result = quantize_folder(source, fmt, out, double_quant=args.double_quant,
                             force=args.force)
    print(result.describe())
    return 0


def _cmd_data_synth(args: argparse.Namespace) -> int:
    from distill.data.tools import write_synthetic

    summary = write_synthetic(args.out, records=args.records, seed=args.seed,
                              sampling_rates=tuple(args.rates), force=args.force,
                              progress=not args.quiet, first_patient_id=args.first_patient_id,
                              generator=args.generator)
    print(f"wrote {summary['records']} records to {args.out} in {summary['seconds']:.1f} s "
          f"({summary['records_per_s']:.0f} records/s)")
    return 0


def _cmd_data_info(args: argparse.Namespace) -> int:
    from distill.data.load import data_folder, load_data
    from distill.data.tools import describe_data
    from distill.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    data = load_data(recipe.data, progress=not args.quiet)
    print(describe_data(data, data_folder(recipe.data, progress=False)))
    return 0


def _cmd_data_render(args: argparse.Namespace) -> int:
    from distill.data.tools import render_record_png

    out = render_record_png(args.record, args.out, height=args.height, width=args.width,
                            grid=not args.no_grid)
    print(f"wrote {out}")
    return 0


def _cmd_data_gallery(args: argparse.Namespace) -> int:
    from distill.data.tools import gallery

    print(f"wrote {gallery(args.folder, args.out, task=args.task, size=args.size)}")
    return 0


def _cmd_zoo_list(args: argparse.Namespace) -> int:
    from teachers import zoo

    print(f"{'name':<18}{'parameters':>12}{'val AUC':>9}{'test AUC':>10}  trained on")
    for name in zoo.names():
        zoo.folder(name)  # checks every file's SHA-256
        c = zoo.card(name)
        corpus = c["corpus"]
        print(f"{name:<18}{c['model']['parameters']:>12,}{c['results']['val']['macro_auc']:>9.3f}"
              f"{c['results']['test']['macro_auc']:>10.3f}  {corpus['records']:,} synthetic "
              f"records (generator v{corpus['generator_version']}, seed {corpus['seed']})")
    return 0


def _cmd_zoo_pack(args: argparse.Namespace) -> int:
    from distill.recipe import load_recipe
    from distill.hub.zoo import pack

    recipe = load_recipe(args.recipe, args.overrides)
    pack(recipe, args.recipe, name=args.name, out=args.out, force=args.force,
         progress=not args.quiet)
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    from distill.metrics.footprint import format_count, preset_rows

    rows = preset_rows(sampling_rate=args.sampling_rate, leads=args.leads,
                       num_labels=args.num_labels)
    leads = ", ".join(args.leads) if args.leads else "12 leads"
    print(f"students ({leads} at {args.sampling_rate} Hz, 10-second record, "
          f"{args.num_labels} labels)")
    print(f"{'family':<12}{'size':<7}{'parameters':>12}{'MACs/record':>14}{'Linear share':>14}"
          f"{'reads':>10}")
    for r in rows:
        print(f"{r['family']:<12}{r['size']:<7}{format_count(r['parameters']):>12}"
              f"{format_count(r['macs']):>14}{r['linear_share']:>14.0%}{r['input']:>10}")
    print("(an image student reads the record's 224 x 224 printout, whatever the leads and "
          "rate)")
    return 0


# ---------------------------------------------------------------- export, verify, publish


def _cmd_export(args) -> int:
    from distill.hub.export import export_run

    folders = export_run(args.run, models=args.model, out=args.out, force=args.force,
                         samples=args.samples, progress=not args.quiet, formats=args.format)
    for folder in folders:
        print(f"wrote {folder} (verified in a fresh process)")
    return 0


def _cmd_verify(args) -> int:
    from distill.hub.publish import MANIFEST, verify_folder

    report = verify_folder(args.folder)
    n = len((Path(args.folder) / MANIFEST).read_text().splitlines())
    loader = "onnxruntime" if (Path(args.folder) / "model.onnx").is_file() else "AutoModel"
    print(f"{args.folder}: ok: {n} files match {MANIFEST}; loads with {loader}; "
          f"{report['samples']} stored test predictions reproduced "
          f"(max |difference| {report['max_abs_diff']:.1e}, tolerance {report['atol']:.0e})")
    return 0


def _cmd_publish(args) -> int:
    from distill.hub.publish import publish_folder

    out = publish_folder(args.folder, args.repo_id, revision=args.revision, private=args.private,
                         force=args.force, to=args.to, endpoint=args.endpoint,
                         commit_message=args.message)
    where = out.get("url") or out["path"]
    print(f"published {args.folder} to {args.repo_id} (revision {out['revision']}, commit "
          f"{out['commit'][:12]}): {where}")
    return 0


def add_export_commands(sub) -> None:
    """Register ``export``, ``verify`` and ``publish`` on the CLI's sub-parsers."""
    p = sub.add_parser("export", help="write hub-ready folders of a run's students",
                       description="Write each distilled student and quantized variant of a run "
                                   "(or the models named) as a folder ready for a model hub: "
                                   "config, safetensors weights, model card, recipe, results, "
                                   "test samples and checksums; each is verified in a fresh "
                                   "process before it is renamed into place.")
    p.add_argument("run", help="a run folder (with results.json)")
    p.add_argument("--model", action="append", metavar="NAME",
                   help='a model of results.json, e.g. "distill leadformer/tiny" (repeatable; '
                        'default: every distilled student and quantized variant)')
    p.add_argument("--out", default=None, metavar="DIR",
                   help="where the model folders go (default RUN/export)")
    p.add_argument("--format", action="append", metavar="FMT",
                   choices=["fp32", "int8", "nf4", "fp4", "onnx", "onnx-int8", "onnx-int4",
                            "onnx-int8-qat"],
                   help="only the distilled models in this format (repeatable): fp32, a "
                        "bitsandbytes variant (int8, nf4, fp4) or an ONNX one (onnx, "
                        "onnx-int8, onnx-int4), as the quantize stage made them")
    p.add_argument("--force", action="store_true", help="replace existing export folders")
    p.add_argument("--samples", type=int, default=4,
                   help="test records stored to verify predictions (default 4)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("verify", help="check an exported folder in a fresh process",
                       description="Check an exported folder: checksums, config, loading with "
                                   "AutoModel, and the stored test predictions reproduced.")
    p.add_argument("folder", help="an exported folder")
    p.set_defaults(func=_cmd_verify)

    p = sub.add_parser("publish", help="verify an exported folder and upload it to a model hub",
                       description="Verify an exported folder, then upload it with "
                                   "huggingface_hub (token from HF_TOKEN or `hf auth login`; "
                                   "never stored) or, with --to, write it into a local "
                                   "directory laid out like the hub cache.")
    p.add_argument("folder", help="an exported folder")
    p.add_argument("--repo-id", required=True, help="org/name")
    p.add_argument("--revision", default=None, help="branch (default main; created if missing)")
    p.add_argument("--private", action="store_true", help="create the repository private")
    p.add_argument("--force", action="store_true", help="publish over an existing revision")
    p.add_argument("--to", default=None, metavar="DIR",
                   help="publish into this local directory instead of the hub")
    p.add_argument("--endpoint", default=None,
                   help="the hub's URL (default: HF_ENDPOINT or https://huggingface.co)")
    p.add_argument("--message", default=None, help="commit message")
    p.set_defaults(func=_cmd_publish)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ecg-distill",
        description="Distil large ECG models (vision-language teachers reading rendered 12-lead "
                    "images) into compact signal students; evaluate, quantize and export them.",
    )
    parser.add_argument("--version", action="version", version=f"ecg-distill {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("validate", help="print the resolved recipe, or the first error in it",
                       description="Resolve a recipe (defaults, overrides) and print it as YAML "
                                   "without doing any work.")
    _add_recipe_args(p)
    p.set_defaults(func=_cmd_validate)

    p = sub.add_parser("run", help="run a recipe's stages in order (resumable)",
                       allow_abbrev=False,
                       description="Run a recipe: each stage writes under the run folder and is "
                                   "skipped on rerun when complete.")
    _add_run_args(p)
    p.add_argument("--seeds", type=int, nargs="+", default=None, metavar="S",
                   help="run the whole recipe once per seed (RUN/labels-<f>/seed-<s>/) and "
                        "summarize over seeds (sweep.md)")
    p.add_argument("--label-fractions", type=float, nargs="+", default=None, metavar="F",
                   help="run it once per label fraction too (data.label_fraction) and draw "
                        "the learning curve")
    for name, (stages, text) in TRAIN_COMMANDS.items():
        p = sub.add_parser(name, help=text,
                           description=f"{text[0].upper()}{text[1:]}. Runs the stages "
                                       f"{', '.join(stages)} (complete ones are skipped); "
                                       f"works the same under `accelerate launch`.")
        _add_run_args(p)

    p = sub.add_parser("plan", help="what a recipe will cost per stage (time, memory, disk) "
                                    "before running it",
                       description="Measure a few batches of each stage of the recipe on this "
                                   "machine (a teacher not downloaded here: its configuration "
                                   "on the meta device, timed by its FLOPs) and print, per "
                                   "stage, the time, peak memory and disk for the recipe's data "
                                   "set and extrapolated to --records, and the teacher cache's "
                                   "size for each token storage option.")
    _add_recipe_args(p)
    p.add_argument("--records", type=int, default=None, metavar="N",
                   help="also extrapolate to N records (e.g. 21837 for PTB-XL, 800000 for "
                        "MIMIC-IV-ECG)")
    p.add_argument("--batches", type=int, default=2, metavar="B",
                   help="batches timed per measurement, after one warm-up (default 2)")
    p.add_argument("--quiet", action="store_true", help="no progress bars or log lines")
    p.set_defaults(func=_cmd_plan)

    p = sub.add_parser("pretrain", help="masked self-supervised pretraining of a foundation "
                                        "model (the recipe's pretrain section)",
                       description="Pretrain a foundation model on the data section's training "
                                   "folds (labels ignored) and pretrain.extra: CSFM or LAMAE by "
                                   "masked reconstruction, the RVQ tokenizer (family rvq), or "
                                   "Hypnos' next-token prediction over a tokenizer's codes "
                                   "(family hypnos); writes RUN/pretrain/best (the encoder loads "
                                   "with AutoModel, the decoder dropped).")
    _add_recipe_args(p)
    p.add_argument("--resume", action="store_true",
                   help="continue interrupted pretraining from its newest checkpoint")
    p.add_argument("--force", action="store_true", help="delete a finished pretraining and redo it")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_pretrain)

    p = sub.add_parser("probe", help="linear probing, fine-tuning, label efficiency, lead "
                                     "subsets and reconstruction of a pretrained encoder",
                       description="The seed papers' protocols for a pretrained CSFM, LAMAE or "
                                   "Hypnos (a pretraining best/ folder): linear and MLP probes "
                                   "at 1/10/100%% of the training labels, fine-tuning against "
                                   "the same architecture from scratch, probes on lead I and the "
                                   "limb leads with the same weights, and the test fold's "
                                   "reconstruction error for every mask strategy. For an RVQ "
                                   "tokenizer: PRD and Pearson r per lead, codebook usage and "
                                   "PRD against bits per second for every depth.")
    p.add_argument("checkpoint", help="a pretraining best/ folder or a saved encoder")
    p.add_argument("--data", required=True,
                   help="a recipe file (its data section, e.g. recipes/quickstart.yaml) or a "
                        "PTB-XL-layout folder")
    p.add_argument("--fractions", type=float, nargs="+", default=[0.01, 0.1, 1.0],
                   metavar="F", help="label fractions of the linear probes (default 0.01 0.1 1)")
    p.add_argument("--finetune-fractions", type=float, nargs="*", default=[0.1], metavar="F",
                   help="label fractions fine-tuned, and trained from scratch (default 0.1)")
    p.add_argument("--epochs", type=int, default=30, help="fine-tuning epochs (default 30)")
    p.add_argument("--lr", type=float, default=1e-3, help="fine-tuning learning rate")
    p.add_argument("--bootstrap", type=int, default=1000, help="resamples (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="subset, training and bootstrap seed")
    p.add_argument("--label", default=None, help="one class also scored on its own (e.g. AFIB "
                                                 "on the rhythm task)")
    p.add_argument("--out", default=None, help="output folder (default: beside the checkpoint, "
                                               "probe/)")
    p.add_argument("--force", action="store_true", help="replace earlier results in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_probe)

    p = sub.add_parser("translate", help="train the 25 Hz -> 100 Hz token translator (the "
                                         "recipe's translate section) and compare it with cubic "
                                         "interpolation on the test fold")
    _add_recipe_args(p)
    p.add_argument("--resume", action="store_true", help="continue interrupted training")
    p.add_argument("--force", action="store_true", help="delete finished jobs and redo them")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_translate)

    p = sub.add_parser("upsample", help="upsample a 25 Hz WFDB record to 100 Hz with a translator")
    p.add_argument("checkpoint", help="a translator folder (RUN/translator/best)")
    p.add_argument("record", help="the WFDB record (its .hea, or the path without extension)")
    p.add_argument("--to", type=int, default=100, help="output rate (the translator's target rate)")
    p.add_argument("--out", default=None, help="output record path or folder (default: beside "
                                               "the input, NAME_100hz)")
    p.add_argument("--force", action="store_true", help="replace existing output files")
    p.set_defaults(func=_cmd_upsample)

    p = sub.add_parser("eval", help="evaluate a saved student on a PTB-XL-layout or CinC folder",
                       description="Score a saved student (a best/ or exported folder) on the "
                                   "test fold (or another split) of a PTB-XL-layout folder, or "
                                   "on every record of a PhysioNet/CinC folder (SNOMED codes "
                                   "mapped onto the PTB-XL task; unmapped codes listed): "
                                   "macro AUC with a bootstrap interval, per-label AUC, F-max, "
                                   "accuracy.")
    p.add_argument("checkpoint", help="a saved student folder (config.json + model.safetensors)")
    p.add_argument("--data", required=True, help="a PTB-XL-layout or CinC folder")
    p.add_argument("--format", default="ptbxl", choices=("ptbxl", "cinc"),
                   help="folder layout (default ptbxl); cinc: .hea + .mat with SNOMED CT codes")
    p.add_argument("--task", default="superdiagnostic", help="label task (default superdiagnostic)")
    p.add_argument("--split", default=None, help="test (fold 10, default for ptbxl), val, train "
                                                 "or all (the only one for cinc, its default)")
    p.add_argument("--bootstrap", type=int, default=1000, help="resamples (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    p.add_argument("--out", default=None, help="also write the results as JSON here")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("quantize", help="convert a saved student to 8-bit or 4-bit (bitsandbytes)",
                       description="Quantize the Linear layers of a saved fp32 student (a best/ "
                                   "or exported folder) with bitsandbytes: --bits 8 is LLM.int8, "
                                   "--bits 4 is nf4 (or fp4). Writes a folder that "
                                   "AutoModel.from_pretrained loads quantized, and says which "
                                   "layers stay in fp32 (convolutions, the output layer).")
    p.add_argument("checkpoint", help="a saved student folder (config.json + model.safetensors)")
    p.add_argument("--bits", type=int, required=True, choices=[8, 4], help="8 or 4")
    p.add_argument("--quant-type", default="nf4", choices=["nf4", "fp4"],
                   help="4-bit code book (default nf4)")
    p.add_argument("--double-quant", action="store_true",
                   help="4-bit: quantize the block scales too")
    p.add_argument("--out", default=None,
                   help="output folder (default: CHECKPOINT-int8 / -nf4 / -fp4 beside it)")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.set_defaults(func=_cmd_quantize)

    p = sub.add_parser("models", help="list every student preset with its size and cost",
                       description="Every student family and size preset: parameters, "
                                   "multiply-accumulates per 10-second record, and the share of "
                                   "parameters in Linear layers (what 8/4-bit quantization shrinks).")
    p.add_argument("--sampling-rate", type=int, default=100, help="Hz (default 100)")
    p.add_argument("--leads", nargs="+", default=None, help="lead subset (default all 12)")
    p.add_argument("--num-labels", type=int, default=5, help="labels (default 5, superdiagnostic)")
    p.set_defaults(func=_cmd_models)

    add_export_commands(sub)

    data = sub.add_parser("data", help="synthesise, inspect and render ECG data",
                          description="Data tools: the synthetic PTB-XL-layout generator, "
                                      "a data summary for a recipe, one record as an image.")
    dsub = data.add_subparsers(dest="data_command", metavar="DATA_COMMAND", required=True)

    p = dsub.add_parser("synth", help="write a synthetic data set in the PTB-XL layout",
                        description="Write ptbxl_database.csv, scp_statements.csv and WFDB "
                                    "records (records100/, records500/) of synthetic 12-lead ECGs.")
    p.add_argument("out", help="output folder (must be empty or absent unless --force)")
    p.add_argument("--records", type=int, default=2000, help="number of records (default 2000)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--first-patient-id", type=int, default=1,
                   help="lowest patient id (default 1); sets whose id ranges do not overlap "
                        "share no patient")
    p.add_argument("--rates", type=int, nargs="+", default=[100, 500], choices=[100, 500],
                   help="sampling rates to write (default: 100 500)")
    p.add_argument("--generator", type=int, default=1, choices=[1, 2],
                   help="generator version (default 1; 2 is calibrated against real PTB-XL "
                        "features, see benchmarks/realism.py)")
    p.add_argument("--force", action="store_true", help="replace an existing data set in OUT")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_data_synth)

    p = dsub.add_parser("info", help="load a recipe's data and print splits and label counts",
                        description="Load (and cache) the recipe's data set and summarise it.")
    _add_recipe_args(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_data_info)

    p = dsub.add_parser("render", help="render one WFDB record as a 12-lead ECG image (PNG)",
                        description="Render a WFDB record (path without extension) in the "
                                    "3x4 + lead II rhythm-strip layout.")
    p.add_argument("record", help="WFDB record path without extension, e.g. records100/00000/00001_lr")
    p.add_argument("--out", required=True, help="PNG file to write")
    p.add_argument("--height", type=int, default=448, help="pixels (default 448)")
    p.add_argument("--width", type=int, default=448, help="pixels (default 448)")
    p.add_argument("--no-grid", action="store_true", help="no ECG-paper grid")
    p.set_defaults(func=_cmd_data_render)

    p = dsub.add_parser("gallery", help="one record per class of a task, rendered into one PNG",
                        description="Render, for each class of the task, a record of a PTB-XL-"
                                    "layout folder whose only label is that class.")
    p.add_argument("folder", help="a PTB-XL-layout folder")
    p.add_argument("--out", required=True, help="PNG file to write")
    p.add_argument("--task", default="superdiagnostic", help="label task (default superdiagnostic)")
    p.add_argument("--size", type=int, default=448, help="pixels per image (default 448)")
    p.set_defaults(func=_cmd_data_gallery)

    zoo = sub.add_parser("zoo", help="the teachers shipped with the package: list, pack",
                         description="Teachers trained by recipes/teacher-zoo/ and shipped in "
                                     "teachers/zoo/ (a recipe names one in teacher.name_or_path).")
    zsub = zoo.add_subparsers(dest="zoo_command", metavar="ZOO_COMMAND", required=True)
    p = zsub.add_parser("list", help="the shipped teachers with their size and AUCs",
                        description="Every shipped teacher, its files checked against their "
                                    "SHA-256.")
    p.set_defaults(func=_cmd_zoo_list)
    p = zsub.add_parser("pack", help="ship a teacher-zoo recipe's trained teacher",
                        description="Store the recipe's trained teacher (fp16) in "
                                    "teachers/zoo/<name> with a model card: validation and "
                                    "test AUC on its corpus's held-out folds, a check set's "
                                    "AUC, the command that reproduces it, SHA-256s.")
    _add_recipe_args(p)
    p.add_argument("--name", default=None, help="the zoo name (default: the recipe's name)")
    p.add_argument("--out", default=None, help="folder to write (default teachers/zoo/<name>)")
    p.add_argument("--force", action="store_true", help="replace an existing folder")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_zoo_pack)
    return parser


def _quiet_libraries() -> None:
    """transformers' own bars (loading weights, writing shards) and advisory warnings
    would drown the run's progress; errors still show. bitsandbytes' CPU back end warns on
    import that the optional hub-downloaded ``kernels`` package is absent (it falls back to
    its built-in 4-bit kernels, and hub downloads are off in offline sites anyway)."""
    import logging

    from transformers.utils import logging as hf_logging

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    settings: list[str] = []
    if argv[:1] == ["run"]:
        # `run R --seeds 0 1 train.epochs=2`: a list option would take the override as one of
        # its numbers; every KEY=VALUE is set aside and joins the recipe's overrides
        settings = [a for a in argv[1:] if "=" in a and not a.startswith("-")]
        argv = [a for a in argv if a not in settings]
    # overrides may also follow the options (`run R --dry-run train.epochs=2`)
    args, extra = parser.parse_known_args(argv)
    if settings:
        args.overrides = [*args.overrides, *settings]
    if extra:
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    _quiet_libraries()  # every command loads transformers (the recipe checks its registries)
    try:
        return args.func(args)
    except ECGDistillError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
