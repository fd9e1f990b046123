"""What a benchmark ran on: CPU model, vector ISA, ISA caps in force, cores, load average."""

from __future__ import annotations

import os
import platform

# Environment variables that change which kernels run; printed with every figure.
ISA_VARIABLES = ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY", "TF_ENABLE_ONEDNN_OPTS")


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where it does not exist)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_model() -> str:
    """The CPU's marketing name ('Intel(R) Xeon(R) Processor', 'AMD EPYC 7B13', ...)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def isa_summary(flags: set[str] | None = None) -> str:
    """The widest vector ISA families the CPU has: 'AVX2', 'AVX-512 + AVX512_BF16 + AMX', ..."""
    flags = cpu_flags() if flags is None else flags
    parts = []
    if "avx512f" in flags:
        parts.append("AVX-512")
        parts += [name for flag, name in (("avx512_bf16", "AVX512_BF16"),) if flag in flags]
    elif "avx2" in flags:
        parts.append("AVX2")
    else:
        parts.append("SSE/AVX only")
    if "amx_tile" in flags:
        parts.append("AMX")
    return " + ".join(parts)


def isa_caps() -> str:
    """The ISA-related environment variables in force, or 'no ISA cap'."""
    caps = [f"{name}={os.environ[name]}" for name in ISA_VARIABLES if name in os.environ]
    return ", ".join(caps) or "no ISA cap"


def load_average() -> str:
    """1/5/15-minute load averages as 'a b c'."""
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def describe_machine() -> str:
    """One line naming the machine a figure comes from."""
    return (
        f"machine: {cpu_model()}, {isa_summary()}, {os.cpu_count()} cores; {isa_caps()}; "
        f"load average {load_average()}"
    )


if __name__ == "__main__":
    print(describe_machine())
