"""Distillation losses: forward+backward time of the batched OT loss against POT, and the
cost of every registered loss relative to one student forward+backward.

OT (EVL-ECG lead matching) at B records of N_s x N_t tokens of width D, fixed Sinkhorn
iterations, timed side by side in one run (interleaved repeats, medians) against

  (a) a per-record Python loop of POT's ``ot.sinkhorn2`` on torch tensors
      (``method="sinkhorn_log"``, same iterations, ``stopThr=0``), forward+backward by
      autograd through POT's iterations;
  (b) POT's batch solver ``ot.batch.solve_batch(method="log_sinkhorn", tol=0)``, forward +
      backward of ``value_linear`` with ``grad="envelope"`` (POT's default: the plan held
      fixed, as in ``ot``); its forward alone with ``grad="detach"`` is printed too.

All three get the same cost matrices (the loss's projections, L2 normalisation, squared
distances), so the timings compare the solvers plus the backward through the cost. POT's
are computed the plain way (``ot_cost``); the loss computes the same matrices to rounding,
in the teacher's space where D = d makes the fixed teacher projection an isometry (see
``docs/ot-solver.md``); the printed value differences include that. The loss's
aux outputs "barycentric" and "student_tokens" are then computed on first access, so the
loss is also timed with every aux entry read, as the training objective does.

Then, per quickstart student (``recipes/quickstart.yaml``'s students, their own token
shapes) against the quickstart teacher's tokens (N_t x D_t, ``--teacher-tokens``), the
forward and the backward of every term of the objective, run as the objective runs them
(one context, relation weighted too), beside the student's own forward+backward; with
``--term-options mhca.student_tokens=48 ot.tol=1e-4`` the terms are built with those
options; ``--profile`` adds, per student, the operations that take the most time
(torch.profiler, forward and backward of every term together).

``--memo`` times the terms as a training job's later epochs run them (what they derive
from the fixed teacher tokens read from the objective's memo); ``--blocks`` adds ot with
its records solved in blocks (the default on a CPU) and in one block, side by side.

Run: ``python benchmarks/losses.py [--threads 2] [--repeats 5] [--terms-only] [--profile]
[--memo] [--blocks]``
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ot
import ot.batch
import torch
import torch.nn.functional as F
import yaml

import students
from distill.core.contract import ECGModelOutput
from distill.losses import LossFamily, loss_families
from distill.losses.sinkhorn import sinkhorn_log_batched, squared_distances
import distill.losses.transport as transport
from distill.losses.memo import MEMO_KEY
from distill.losses.objective import build_objective
from distill.losses.transport import OTLeadMatching
from distill.metrics.footprint import signal_batch
from distill.recipe import load_recipe

REPO = Path(__file__).resolve().parents[1]


def ot_cost(loss: OTLeadMatching, xs: torch.Tensor, xt: torch.Tensor) -> torch.Tensor:
    """The OT loss's cost matrix [B, N_s, N_t] (projection, normalisation, squared distance)."""
    ps, pt = F.normalize(loss.student_proj(xs), dim=-1), F.normalize(loss.teacher_proj(xt), dim=-1)
    return squared_distances(ps, pt)


def side_by_side(cases: dict[str, Callable[[], torch.Tensor | None]], repeats: int,
                 only_once: tuple[str, ...] = ()) -> dict[str, float]:
    """Median seconds of each case, repeats interleaved so that load hits all alike.

    Cases named in ``only_once`` (the slow reference loop) run ``max(2, repeats // 2)`` times.
    """
    times: dict[str, list[float]] = {name: [] for name in cases}
    for fn in cases.values():  # warm-up
        fn()
    for rep in range(repeats):
        for name, fn in cases.items():
            if name in only_once and rep >= max(2, repeats // 2):
                continue
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def ot_cases(loss: OTLeadMatching, args: argparse.Namespace, leaves: list[torch.Tensor],
             cost_fn: Callable[[], torch.Tensor],
             ours_fns: dict[str, Callable[[], tuple[torch.Tensor, torch.Tensor]]],
             values: dict[str, torch.Tensor]) -> dict[str, Callable[[], None]]:
    """ours (one case per entry of ``ours_fns``, the first named "ot"), (a) POT loop, (b) POT
    batch (fwd+bwd) and (b) forward only, on one cost source."""
    n_s, n_t = args.ns, args.nt
    a, w = torch.full((n_s,), 1.0 / n_s), torch.full((n_t,), 1.0 / n_t)
    kw = {"method": "sinkhorn_log", "numItermax": args.iters, "stopThr": 0.0, "warn": False}

    def zero() -> None:
        for t in (*leaves, *loss.parameters()):
            t.grad = None

    def ours(name: str, fn: Callable[[], tuple[torch.Tensor, torch.Tensor]]
             ) -> Callable[[], None]:
        def case() -> None:
            zero()
            value, per = fn()  # scalar, (B,)
            value.backward()
            values[name] = per

        return case

    def pot_loop() -> None:
        zero()
        cost = cost_fn()
        per = torch.stack([ot.sinkhorn2(a, w, cost[r], args.reg, **kw)
                           for r in range(cost.shape[0])])  # (B,)
        per.mean().backward()
        values["pot loop"] = per.detach()

    def pot_batch() -> None:
        zero()
        res = ot.batch.solve_batch(cost_fn(), args.reg, max_iter=args.iters, tol=0.0,
                                   method="log_sinkhorn", grad="envelope")
        res.value_linear.mean().backward()
        values["pot batch"] = res.value_linear.detach()

    def pot_batch_forward() -> None:
        with torch.no_grad():
            ot.batch.solve_batch(cost_fn(), args.reg, max_iter=args.iters, tol=0.0,
                                 method="log_sinkhorn", grad="detach")

    return {**{name: ours(name, fn) for name, fn in ours_fns.items()}, "pot loop": pot_loop,
            "pot batch": pot_batch, "pot batch fwd": pot_batch_forward}


def report_ot(title: str, t: dict[str, float], values: dict[str, torch.Tensor]) -> None:
    print(title)
    print(f"  ot (batched, envelope)          {t['ot'] * 1e3:9.1f} ms")
    if "ot, all aux" in t:
        print(f"  ot, every aux output read       {t['ot, all aux'] * 1e3:9.1f} ms   "
              f"(a)/this {t['pot loop'] / t['ot, all aux']:6.2f}x  (as the objective does)")
    print(f"  (a) POT sinkhorn2 loop, fwd+bwd {t['pot loop'] * 1e3:9.1f} ms   "
          f"(a)/ot {t['pot loop'] / t['ot']:6.2f}x")
    print(f"  (b) POT solve_batch, fwd+bwd    {t['pot batch'] * 1e3:9.1f} ms   "
          f"(b)/ot {t['pot batch'] / t['ot']:6.2f}x")
    print(f"      POT solve_batch, fwd only   {t['pot batch fwd'] * 1e3:9.1f} ms   "
          f"/ot {t['pot batch fwd'] / t['ot']:6.2f}x")
    for ref in ("pot loop", "pot batch"):
        rel = ((values["ot"] - values[ref]).abs() / values[ref].abs()).max().item()
        print(f"  largest relative difference of the values, ot vs {ref}: {rel:.2e}")


def ot_benchmark(args: argparse.Namespace) -> None:
    g = torch.Generator().manual_seed(0)
    b, n_s, n_t, d = args.batch, args.ns, args.nt, args.dim
    xs = torch.randn(b, n_s, d, generator=g).requires_grad_()  # (B, N_s, D)
    xt = torch.randn(b, n_t, d, generator=g).requires_grad_()  # (B, N_t, D)
    loss = OTLeadMatching(d, d, dim=d, reg=args.reg, iters=args.iters)
    student = ECGModelOutput(tokens=xs, token_leads=torch.arange(n_s) % 12)
    teacher = ECGModelOutput(tokens=xt, token_leads=torch.arange(n_t) % 12)
    shape = f"B={b} N_s={n_s} N_t={n_t}, reg={args.reg}, {args.iters} iterations, float32"

    def ours_loss() -> tuple[torch.Tensor, torch.Tensor]:
        out = loss(student, teacher, {})
        return out.value, out.aux["per_record"]

    def ours_loss_all_aux() -> tuple[torch.Tensor, torch.Tensor]:
        # as in training: a context for later terms, and the objective copies every aux
        # entry for its logs (lazily computed ones included)
        out = loss(student, teacher, {}, {})
        aux = {k: v.detach() for k, v in out.aux.items()}
        return out.value, aux["per_record"]

    values: dict[str, torch.Tensor] = {}
    cases = ot_cases(loss, args, [xs, xt], lambda: ot_cost(loss, xs, xt),
                     {"ot": ours_loss, "ot, all aux": ours_loss_all_aux}, values)
    t = side_by_side(cases, args.repeats, only_once=("pot loop",))
    report_ot(f"OT loss forward+backward, {shape}; features D={d} -> projections d={d} -> "
              "cost -> solver (the projections and cost are in all three)", t, values)

    # 2. the solver alone: a given cost matrix (a leaf that requires grad) -> <P, C> -> backward
    with torch.no_grad():
        leaf = ot_cost(loss, xs, xt).requires_grad_()  # (B, N_s, N_t)
    log_a = torch.full((b, n_s), 1.0 / n_s).log()
    log_b = torch.full((b, n_t), 1.0 / n_t).log()

    def ours_solver() -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():  # envelope: the plan is a constant of the backward
            plan, _, _ = sinkhorn_log_batched(leaf, args.reg, args.iters, log_a, log_b)
        per = (plan * leaf).sum((1, 2))  # (B,)
        return per.mean(), per.detach()

    values = {}
    cases = ot_cases(loss, args, [leaf], lambda: leaf, {"ot": ours_solver}, values)
    t = side_by_side(cases, args.repeats, only_once=("pot loop",))
    report_ot(f"\nOT solver alone forward+backward, {shape}; from a given cost matrix", t, values)


def student_step(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> Callable[[], None]:
    def step() -> None:
        model.zero_grad(set_to_none=True)
        out = model(signal=batch["signal"])
        (out.logits.sum() + out.tokens.float().mean()).backward()

    return step


def loss_step(family: LossFamily, args: argparse.Namespace) -> Callable[[], None]:
    """Forward+backward of a registered loss (its default configuration) on random
    B x N_s / N_t x D outputs."""
    g = torch.Generator().manual_seed(1)
    b, n_s, n_t, d = args.batch, args.ns, args.nt, args.dim

    def out(n: int) -> ECGModelOutput:
        return ECGModelOutput(logits=torch.randn(b, 5, generator=g).requires_grad_(),
                              tokens=torch.randn(b, n, d, generator=g).requires_grad_(),
                              token_leads=torch.arange(n) % 12,
                              pooled=torch.randn(b, d, generator=g).requires_grad_())

    s, t = out(n_s), out(n_t)
    loss = family.build(student_dim=d, teacher_dim=d)
    context = {"ot.barycentric": torch.randn(b, n_s, d, generator=g),
               "ot.plan": torch.full((b, n_s, n_t), 1.0 / (n_s * n_t))}
    batch = {"labels": (torch.rand(b, 5, generator=g) > 0.7).float()}

    def step() -> None:
        for x in (*s.values(), *t.values(), *loss.parameters()):
            if isinstance(x, torch.Tensor) and x.requires_grad:
                x.grad = None
        value = loss(s, t, batch, dict(context)).value
        if value.requires_grad:
            value.backward()

    return step


def relative_costs(args: argparse.Namespace) -> None:
    skipped = []
    cases: dict[str, Callable[[], None]] = {}
    batch = signal_batch(args.batch)
    for family, size in (("leadformer", "tiny"), ("xresnet1d", "small")):
        model = students.create(family, size, num_labels=5)
        cases[f"student {family}/{size}"] = student_step(model, batch)
    for family in loss_families():  # every registered loss (discovered), in running order
        name = family.name
        try:
            cases[f"loss {name}"] = loss_step(family, args)
            cases[f"loss {name}"]()
        except (TypeError, ValueError, KeyError, RuntimeError) as exc:  # needs other inputs
            cases.pop(f"loss {name}", None)
            skipped.append(f"{name} ({type(exc).__name__}: {exc})")
    t = side_by_side(cases, args.repeats)
    students_t = {k: v for k, v in t.items() if k.startswith("student")}
    header = "".join(f"{'/ ' + k.split()[1]:>22}" for k in students_t)
    print(f"\nForward+backward at B={args.batch} (losses on N_s={args.ns}, N_t={args.nt}, "
          f"D={args.dim}; students on 10 s x 12 leads at 100 Hz)")
    print(f"{'':<22}{'ms':>9}{header}")
    for name, sec in t.items():
        ratios = "".join(f"{sec / ref:>22.3f}" for ref in students_t.values())
        print(f"{name:<22}{sec * 1e3:>9.1f}{ratios}")
    print("skipped: " + ("; ".join(skipped) if skipped else "none"))


def term_options(pairs: list[str]) -> dict[str, dict[str, Any]]:
    """``["mhca.student_tokens=48", "ot.tol=1e-4"]`` -> {"mhca": {"student_tokens": 48},
    "ot": {"tol": 1e-4}} (numbers as int or float, anything else as a YAML scalar)."""
    out: dict[str, dict[str, Any]] = {}
    for pair in pairs:
        key, text = pair.split("=", 1)
        term, field = key.split(".", 1)
        value: Any
        for kind in (int, float, yaml.safe_load):
            try:
                value = kind(text)
                break
            except ValueError:
                continue
        out.setdefault(term, {})[field] = value
    return out


def quickstart_terms(args: argparse.Namespace) -> None:
    """Forward / backward ms of each objective term at every quickstart student's shapes."""
    recipe = load_recipe(REPO / "recipes" / "quickstart.yaml")
    b, n_t, d_t = args.batch, *args.teacher_tokens
    g = torch.Generator().manual_seed(2)
    teacher = ECGModelOutput(  # the cache's fp16 values, read back as float32
        logits=torch.randn(b, 5, generator=g), pooled=torch.randn(b, d_t, generator=g),
        tokens=(torch.randn(b, n_t, d_t, generator=g) * 3).half().float(),
        token_leads=torch.full((n_t,), -1))
    batch = {"labels": (torch.rand(b, 5, generator=g) > 0.7).float()}
    options = term_options(args.term_options)
    weights = {**recipe.distill.weights, "relation": 1.0}
    configs = {name: {**dataclasses.asdict(recipe.distill.losses[name]),
                      **options.get(name, {})}
               for name in weights if name in recipe.distill.losses}
    print(f"\nThe objective's terms at the quickstart's shapes, B={b}, teacher tokens "
          f"{n_t} x {d_t}, float32, median of {args.repeats} (ms; relation weighted too"
          + (f"; options {' '.join(args.term_options)}" if args.term_options else "")
          + ("; fixed teacher features read from the memo" if args.memo else "") + ")")
    print(f"  {'student':<18}{'N_s x D_s':>11}{'term':>10}{'forward':>10}{'backward':>10}"
          f"{'sum':>9}{'/ student':>11}")
    for spec in recipe.students:
        torch.manual_seed(0)
        model = students.create(spec.family, spec.size, num_labels=5)
        signal = signal_batch(b)
        with torch.no_grad():
            _, n_s, d_s = model.eval()(signal=signal["signal"][:2]).tokens.shape
        model.train()
        objective = build_objective(recipe.distill.alpha, weights, d_s, d_t, **configs)
        xs = torch.randn(b, n_s, d_s, generator=g, requires_grad=True)
        student = ECGModelOutput(logits=torch.randn(b, 5, generator=g, requires_grad=True),
                                 tokens=xs, token_leads=torch.arange(n_s) % 12,
                                 pooled=torch.randn(b, d_s, generator=g))
        names = objective.active_terms
        fwd: dict[str, list[float]] = {n: [] for n in names}
        bwd: dict[str, list[float]] = {n: [] for n in names}
        whole = student_step(model, signal)
        own: list[float] = []

        memo = objective.keep_teacher_features(b) if args.memo else None
        index = torch.arange(b)

        def step(record: bool) -> None:
            # with --memo, what the terms keep per record was stored by the first step: the
            # steady state of a training job's later epochs
            context: dict[str, Any] = {} if memo is None else {
                MEMO_KEY: (memo, index, teacher.tokens)}
            for name in names:
                start = time.perf_counter()
                value = objective.losses[name](student, teacher, batch, context).value
                mid = time.perf_counter()
                value.backward()
                if record:
                    fwd[name].append(mid - start)
                    bwd[name].append(time.perf_counter() - mid)

        step(False)
        whole()
        for _ in range(args.repeats):  # interleaved with the student's own step
            step(True)
            start = time.perf_counter()
            whole()
            own.append(time.perf_counter() - start)
        ref = statistics.median(own)
        label = f"{spec.family}/{spec.size}"
        print(f"  {label:<18}{f'{n_s} x {d_s}':>11}{'student':>10}{'':>20}"
              f"{ref * 1e3:9.1f}{1.0:10.2f}x")
        total = 0.0
        for name in names:
            f, w = statistics.median(fwd[name]), statistics.median(bwd[name])
            total += f + w
            print(f"  {'':<29}{name:>10}{f * 1e3:10.1f}{w * 1e3:10.1f}{(f + w) * 1e3:9.1f}"
                  f"{(f + w) / ref:10.2f}x")
        print(f"  {'':<29}{'all terms':>10}{'':>20}{total * 1e3:9.1f}{total / ref:10.2f}x")
        if args.profile:
            from torch.profiler import ProfilerActivity, profile
            with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
                for _ in range(args.repeats):
                    step(False)
            rows = sorted(prof.key_averages(group_by_input_shape=True),
                          key=lambda e: -e.self_cpu_time_total)
            print(f"  {label}: the operations of a step of every term (forward and backward), "
                  f"ms per step")
            for e in rows[:12]:
                print(f"    {e.self_cpu_time_total / args.repeats / 1e3:8.2f}  x{e.count // args.repeats:<4d}"
                      f"{e.key[:44]:<46}{str(e.input_shapes)[:70]}")


def ot_blocks(args: argparse.Namespace) -> None:
    """ot's forward+backward at every quickstart student's shapes, its records solved in
    blocks (``SOLVE_BLOCK_BYTES``, the default) and all in one block, side by side."""
    recipe = load_recipe(REPO / "recipes" / "quickstart.yaml")
    b, n_t, d_t = args.batch, *args.teacher_tokens
    g = torch.Generator().manual_seed(3)
    default = transport.SOLVE_BLOCK_BYTES
    print(f"\not's records solved in blocks of {default >> 20} MiB of kernel, or all at once "
          f"(B={b}, teacher tokens {n_t} x {d_t}, forward+backward, median of {args.repeats})")
    for spec in recipe.students:
        model = students.create(spec.family, spec.size, num_labels=5)
        with torch.no_grad():
            _, n_s, d_s = model.eval()(signal=signal_batch(2)["signal"]).tokens.shape
        loss = OTLeadMatching(d_s, d_t, **dataclasses.asdict(recipe.distill.losses["ot"]))
        xs = torch.randn(b, n_s, d_s, generator=g, requires_grad=True)
        student = ECGModelOutput(tokens=xs, token_leads=torch.arange(n_s) % 12)
        teacher = ECGModelOutput(tokens=torch.randn(b, n_t, d_t, generator=g) * 3,
                                 token_leads=torch.full((n_t,), -1))
        values = {}

        def case(block: int, name: str) -> Callable[[], None]:
            def run() -> None:
                transport.SOLVE_BLOCK_BYTES = block
                xs.grad = None
                out = loss(student, teacher, {}, {})
                out.value.backward()
                values[name] = out.aux["per_record"]
            return run

        try:
            t = side_by_side({"blocks": case(default, "blocks"),
                              "one block": case(1 << 62, "one block")}, args.repeats)
        finally:
            transport.SOLVE_BLOCK_BYTES = default
        per = transport.solve_block(n_s * n_t * 4, b, torch.device("cpu"))
        rel = float(((values["blocks"] - values["one block"]).abs()
                     / values["one block"].abs()).max())
        print(f"  {spec.family}/{spec.size:<8} N_s={n_s:<4} {per:>3} records a block: "
              f"{t['blocks'] * 1e3:7.1f} ms, one block {t['one block'] * 1e3:7.1f} ms, "
              f"{t['one block'] / t['blocks']:5.2f}x; largest relative difference {rel:.1e}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--ns", type=int, default=96)
    parser.add_argument("--nt", type=int, default=196)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--reg", type=float, default=0.05)
    parser.add_argument("--teacher-tokens", type=int, nargs=2, default=[196, 256],
                        metavar=("N_T", "D_T"), help="the quickstart teacher's tokens "
                        "(ecg-vlm-small: 196 patches of width 256)")
    parser.add_argument("--term-options", nargs="*", default=[], metavar="TERM.KEY=VALUE",
                        help="loss options for the per-student table, e.g. ot.tol=1e-4")
    parser.add_argument("--terms-only", action="store_true",
                        help="only the per-student table of the objective's terms")
    parser.add_argument("--profile", action="store_true",
                        help="the costliest operations of each student's terms")
    parser.add_argument("--memo", action="store_true",
                        help="the per-student table in a training job's steady state: the "
                             "fixed teacher features read from the objective's memo")
    parser.add_argument("--blocks", action="store_true",
                        help="also ot with its records solved in blocks and in one block")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"CPU, {torch.get_num_threads()} threads, torch {torch.__version__}, POT {ot.__version__}")
    if not args.terms_only:
        ot_benchmark(args)
        relative_costs(args)
    quickstart_terms(args)
    if args.blocks:
        ot_blocks(args)


if __name__ == "__main__":
    main()
