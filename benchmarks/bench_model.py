"""VAN train-step and inference throughput on CPU against PyTorch, both measured in this run.

    .venv/bin/python benchmarks/bench_model.py                       # b0, this CPU's own ISA
    .venv/bin/python benchmarks/bench_model.py --isa native,avx2     # and oneDNN/ATen at AVX2
    .venv/bin/python benchmarks/bench_model.py --ideas               # each optimisation alone
    .venv/bin/python benchmarks/bench_model.py --tf-env "oneDNN off:TF_ENABLE_ONEDNN_OPTS=0"

The reference is Hugging Face's `VanForImageClassification` (transformers 4.57.6, torch 2.13.0
CPU) in the side environment `.bench-venv/`, created on first use (benchmarks/workers.py), timed
in NCHW and channels-last; the faster layout counts. Ours is `build_van` trained with the
Trainer's layout and optimizer (C++ depthwise kernels where they load, fused AdamW, decay
exemptions) and served as the folded copy (`fold_for_inference`, stock TF ops). Same batch,
size, drop-path rate and loss on both sides.

PyTorch and each TF environment run in a worker process of their own (benchmarks/torch_van.py,
benchmarks/tf_van.py; the TF rows of one environment share its worker); rounds alternate between
all rows (one sample of each, repeated; the TF rows' order rotates each round) so load from other
processes on a shared machine hits them alike, and the median round is reported with its spread
and the load average. `--isa avx2` starts the workers with oneDNN capped (ONEDNN_MAX_CPU_ISA=AVX2,
TF and torch), ATen and torch's MKL capped (ATEN_CPU_CAPABILITY=avx2, MKL_ENABLE_INSTRUCTIONS=AVX2)
and our C++ kernels on their AVX2 path (VAN_TFX_KERNELS_ISA=avx2). TF's own Eigen kernels are
compiled into the pip wheel for AVX and XLA:CPU in TF 2.16 emits 256-bit code on any host, so
those two run the same code on both; cache sizes and memory bandwidth are this machine's, so a
capped figure approximates, and is not, an AVX2 machine. `--tf-env` adds TF
workers that differ only in environment variables.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from benchmarks.machine import cpu_flags, cpu_model, describe_machine, load_average  # noqa: E402
from benchmarks.workers import tf_worker, torch_worker  # noqa: E402

ISA_CAPS = {
    "native": {},
    "avx2": {
        "ONEDNN_MAX_CPU_ISA": "AVX2",
        "ATEN_CPU_CAPABILITY": "avx2",
        # torch's MKL runs only the classifier's GEMMs here, but an AVX2 CPU would run them at AVX2.
        "MKL_ENABLE_INSTRUCTIONS": "AVX2",
        "VAN_TFX_KERNELS_ISA": "avx2",
    },
}
TORCH_LAYOUTS = ("nchw", "channels_last")
OURS = "ours"
IDEAS = (
    "naive port (grouped conv, conv 1x1, unfused BN, autodiff GELU)",
    "ours, stock TF depthwise convs (no C++ kernels)",
    "ours, inference as one batch (no slices)",
    "ours, inference in 4 slices",
    "ours, not folded for inference",
    "ours, GELU constants not folded (inference)",
    "ours, conv 1x1 for training",
    "ours, GELU as TF ops (not XLA-fused)",
    "ours, autodiff GELU gradient",
    "ours, mixed_bfloat16",
)
GOALS = {"train": 2.0, "infer": 1.5}


def parse_tf_envs(specs: list[str]) -> dict[str, dict[str, str]]:
    """['label:VAR=V,VAR2=W', ...] -> {label: {VAR: V, VAR2: W}}."""
    envs = {}
    for spec in specs:
        label, _, assignments = spec.partition(":")
        pairs = [a.split("=", 1) for a in assignments.split(",") if a]
        if not label or not pairs or any(len(p) != 2 for p in pairs):
            raise SystemExit(f"--tf-env {spec!r}: expected 'label:VAR=VALUE[,VAR=VALUE]'")
        envs[label] = dict(pairs)
    return envs


def measure(args, variant: str, torch, tfs: dict) -> tuple[dict, dict]:
    """Set every worker up, then alternate rounds; (facts per side, img/s samples per row)."""
    shape = {"batch": args.batch, "image_size": args.image_size, "drop_path_rate": 0.1}
    facts, rows = {}, {}  # rows: row label -> (worker, row name in the worker)
    for label, (worker, names) in tfs.items():
        facts[label] = worker.ask(cmd="setup", variant=variant, rows=list(names), **shape)
        for name in names:
            rows[name if label == OURS else f"{name}, {label}"] = (worker, name)
    # The same widths, depths and MLP ratios, from van_trainer.model.VARIANTS via our worker.
    facts["torch"] = torch.ask(cmd="setup", **facts[OURS]["variant_config"], **shape)
    samples = {
        f"PyTorch (HF VAN), {layout}": {"train": [], "infer": []} for layout in TORCH_LAYOUTS
    }
    samples |= {row: {"train": [], "infer": []} for row in rows}
    layouts = {"train": list(TORCH_LAYOUTS), "infer": list(TORCH_LAYOUTS)}
    for round_index in range(args.rounds):
        for kind, steps in (("train", args.steps), ("infer", 3 * args.steps)):
            for layout in layouts[kind]:
                answer = torch.ask(cmd=kind, layout=layout, steps=steps)
                samples[f"PyTorch (HF VAN), {layout}"][kind].append(answer["images_per_second"])
            if round_index == 0:
                layouts[kind] = fast_layouts(samples, kind)
            for row in rotated(list(rows), round_index):
                worker, name = rows[row]
                answer = worker.ask(cmd=kind, row=name, steps=steps)
                samples[row][kind].append(answer["images_per_second"])
    return facts, samples


def rotated(names: list[str], shift: int) -> list[str]:
    """The rows starting `shift` places on, so no row always runs right after PyTorch."""
    # `ours`, first in every round, was the slowest of identical graphs natively in two runs.
    shift %= max(len(names), 1)
    return names[shift:] + names[:shift]


def fast_layouts(samples: dict, kind: str) -> list[str]:
    """Layouts within 2x of the best after round 1; slower ones cost no more rounds."""
    # Slower ones keep their one figure (the other layout then counts anyway).
    first = {layout: samples[f"PyTorch (HF VAN), {layout}"][kind][0] for layout in TORCH_LAYOUTS}
    return [layout for layout, ips in first.items() if ips * 2 >= max(first.values())]


def report(variant: str, args, facts: dict, samples: dict, loads: tuple[str, str]) -> None:
    """Median img/s per row, its spread over rounds, the best PyTorch layout, each row / best."""
    medians = {
        n: {k: statistics.median(v) for k, v in kinds.items()} for n, kinds in samples.items()
    }
    torch_rows = [n for n in medians if n.startswith("PyTorch")]
    best = {k: max(medians[n][k] for n in torch_rows) for k in ("train", "infer")}
    t, ours = facts["torch"], facts[OURS]
    print(
        f"\n== VAN-{variant}, batch {args.batch}, {args.image_size} px: images/s, median of "
        f"{args.rounds} interleaved rounds; load average before / after: {loads[0]} / {loads[1]}"
    )
    print(
        f"PyTorch {t['torch']} (ATen {t['cpu_capability']}, {t['threads']} threads), transformers "
        f"{t['transformers']} VanForImageClassification, {t['parameters_used']:,} parameters in "
        f"use ({t['parameters']:,} defined); TF {ours['tf']} (oneDNN "
        f"{'on' if ours['onednn'] else 'off'}, {ours['intra_op_threads']} intra-op threads; "
        f"C++ depthwise kernels: {ours['kernels_isa'] or 'unavailable'})"
    )
    print(
        f"{'implementation':<72}{'train':>8}{'infer':>8}   round spread   "
        "vs best PyTorch (train / infer)"
    )
    for name, m in medians.items():
        ratio = (
            ""
            if name in torch_rows
            else f"x{m['train'] / best['train']:.2f} / x{m['infer'] / best['infer']:.2f}"
        )
        spread = " / ".join(f"{round_spread(samples[name][k]):>3.0%}" for k in ("train", "infer"))
        print(f"{name:<72}{m['train']:>8.1f}{m['infer']:>8.1f}   {spread:<12}   {ratio}")
    verdict = ", ".join(
        f"{kind} x{medians[OURS][kind] / best[kind]:.2f} (goal x{goal}: "
        f"{'met' if medians[OURS][kind] / best[kind] >= goal else 'NOT met'})"
        for kind, goal in GOALS.items()
    )
    print(f"ours vs best PyTorch layout: {verdict}")


def round_spread(values: list[float]) -> float:
    """(max - min) / median of one row's rounds: how far apart the same measurement landed."""
    return (max(values) - min(values)) / statistics.median(values)


def runs_here(idea: str, isa: str) -> bool:
    """False for the bf16 row where oneDNN has no bf16 kernels (AVX2 cap, CPUs without bf16)."""
    # TF aborts the step there rather than falling back.
    if "bfloat16" not in idea:
        return True
    has_bf16 = bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})
    if isa != "native" or not has_bf16:
        print(f"skipping {idea!r}: no bf16 kernels under {isa} on {cpu_model()}")
        return False
    return True


def run_isa(args, isa: str, tf_envs: dict) -> None:
    """All variants with every worker started under one ISA cap."""
    caps = dict(ISA_CAPS[isa])
    if args.threads:
        # OpenMP (torch) and TF's own pools; one thread each is the comparison least moved by
        # other processes, which stall OpenMP's barriers far more than TF's work queues.
        caps |= {
            "OMP_NUM_THREADS": str(args.threads),
            "TF_NUM_INTRAOP_THREADS": str(args.threads),
            "TF_NUM_INTEROP_THREADS": str(args.threads),
        }
    label = (
        f"AVX2-capped on {cpu_model()} (oneDNN, ATen and our C++ kernels capped; TF's Eigen "
        "kernels are not; not a real AVX2 machine)"
        if isa == "avx2"
        else f"native ISA of {cpu_model()}"
    )
    print(
        f"\n##### {label}" + (f", {args.threads} thread(s) per framework" if args.threads else "")
    )
    print(describe_machine() + (f"; workers start with {caps}" if caps else ""))
    with contextlib.ExitStack() as stack:
        torch = stack.enter_context(torch_worker(caps))
        ideas = [idea for idea in IDEAS if args.ideas and runs_here(idea, isa)]
        tfs = {OURS: (stack.enter_context(tf_worker(caps)), [OURS, *ideas])}
        for name, env in tf_envs.items():
            tfs[name] = (stack.enter_context(tf_worker({**caps, **env})), [OURS])
        for variant in args.variants.split(","):
            before = load_average()
            facts, samples = measure(args, variant, torch, tfs)
            report(variant, args, facts, samples, (before, load_average()))


def main(argv=None) -> int:
    """Parse arguments; measure and print per ISA cap."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default="b0")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=3, help="train steps per round (infer: 3x)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--isa", default="native", help="comma-separated: native, avx2")
    parser.add_argument("--ideas", action="store_true", help="also time each optimisation alone")
    parser.add_argument(
        "--threads", type=int, default=0, help="threads per framework (0: each one's default)"
    )
    parser.add_argument(
        "--tf-env", action="append", default=[], help="'label:VAR=VALUE,...' extra TF worker"
    )
    args = parser.parse_args(argv)
    isas = args.isa.split(",")
    if unknown := set(isas) - set(ISA_CAPS):
        parser.error(f"unknown --isa {sorted(unknown)}; choose from {sorted(ISA_CAPS)}")
    tf_envs = parse_tf_envs(args.tf_env)
    for isa in isas:
        run_isa(args, isa, tf_envs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
