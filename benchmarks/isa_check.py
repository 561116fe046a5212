"""Which of the engine's kernels honour the switches that hold an AVX-512 machine to its AVX2 code.

Issue 19 measures both instruction-set paths on one machine: ATen's kernels follow
`ATEN_CPU_CAPABILITY`, oneDNN's `ONEDNN_MAX_CPU_ISA`, MKL's `MKL_ENABLE_INSTRUCTIONS`. A kernel
that ignored its switch would run AVX-512 code in the "AVX2" figures. Each kernel the engine uses
(lm/kernels.py; MKL for transformers' own products) runs on the same inputs in a child process
unrestricted, under its own switch and under all three, and three things are recorded:

- the instructions its hot code ran: under `perf record`, the hottest compiled functions'
  disassembly (`perf annotate`), counting the sampled instructions on 512-bit registers (zmm)
  and on 256-bit ones (ymm): zmm under an AVX2 switch means the switch was ignored;
- what oneDNN says it ran (its verbose log names the kernel and ISA of each product: its code is
  generated at run time, so perf has no disassembly of it);
- whether the output differs bit for bit from the unrestricted run (different vector widths add in
  a different order; the same bits prove nothing, least of all for the draft kernels' bf16 outputs).

No timing (that is the engine benchmarks' job, on an idle machine); a few minutes in all:

    .venv/bin/python benchmarks/isa_check.py      # writes benchmarks/results/isa_check.json
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import save  # noqa: E402

SETTINGS = {
    "native": {},
    "aten_avx2": {"ATEN_CPU_CAPABILITY": "avx2"},
    "onednn_avx2": {"ONEDNN_MAX_CPU_ISA": "AVX2"},
    "mkl_avx2": {"MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    "all_avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
}
SWITCHES = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")
# Each kernel, and the switch that should hold it to AVX2 (it runs native, under that switch alone,
# and under all three).
KERNELS = {
    "onednn_linear_1_row": "onednn_avx2",  # the engine's fp32 products (decoding: one row a request)
    "onednn_linear_8_rows": "onednn_avx2",
    "mkl_linear_1_row": "mkl_avx2",  # transformers' own products (embedded-plain)
    "mkl_matmul_256_rows": "mkl_avx2",  # prefill, training
    "int8_draft_lm_head_1_row": "aten_avx2",  # the draft model's products
    "int4_draft_1_row": "aten_avx2",
    "flash_attention": "aten_avx2",  # the shared-head attention (lm/kernels.py)
    "sdpa": "aten_avx2",  # attention otherwise
}
HOTTEST = 3  # compiled functions disassembled a run
WIDTHS = ("zmm", "ymm", "xmm")  # 512-, 256- and 128-bit vector registers
LOOP_SECONDS = 1.5  # under perf, long enough for a few hundred samples of the kernel


def kernel(name: str):
    """A call of kernel `name` on fixed inputs with SmolLM2-135M's shapes."""
    import torch

    from misstep.lm.kernels import Int4Linear, Int8Linear, OneDNNLinear

    torch.manual_seed(0)
    linear = torch.nn.Linear(576, 1536, bias=False)
    one, eight, many = torch.randn(1, 576), torch.randn(8, 576), torch.randn(256, 576)
    # Shapes large enough that the kernel, not Python's call overhead, holds most samples: the draft
    # model's 8-bit LM head (49,152 outputs), and 8 rows' queries over a long prompt's keys.
    query, key, value = torch.randn(1, 9, 8, 64), torch.randn(1, 9, 4096, 64), torch.randn(1, 9, 4096, 64)
    if name.startswith("onednn"):
        onednn = OneDNNLinear(linear)
        return lambda: onednn(one if name.endswith("1_row") else eight)
    if name == "mkl_linear_1_row":
        return lambda: torch.nn.functional.linear(one, linear.weight)
    if name == "mkl_matmul_256_rows":
        return lambda: torch.mm(many, linear.weight.t())
    if name.startswith("int8"):
        draft = Int8Linear(torch.nn.Linear(576, 49152, bias=False))
        return lambda: draft(one)
    if name.startswith("int4"):
        draft = Int4Linear(linear)
        return lambda: draft(one)
    if name == "flash_attention":
        flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        return lambda: flash(query, key, value, 0.0, False)[0]
    return lambda: torch.nn.functional.scaled_dot_product_attention(query, key, value)


def child(name: str, out: str) -> None:
    """Run kernel `name` once (output saved to `out`), say so, and on a line from stdin (perf is
    attached by then) run it in a loop for `LOOP_SECONDS`."""
    import torch

    call = kernel(name)
    with torch.no_grad():
        torch.save(call(), out)
        print("ready", flush=True)
        sys.stdin.readline()
        started = time.perf_counter()
        while time.perf_counter() - started < LOOP_SECONDS:
            call()
    print("capability", torch.backends.cpu.get_cpu_capability(), flush=True)


def hot_instructions(perf_data: Path) -> dict:
    """torch's compiled functions (MKL's linked in) with the most samples, at least 1% each, and how
    many of their sampled instructions use zmm, ymm and xmm registers."""
    report = subprocess.run(
        ["perf", "report", "-i", str(perf_data), "--stdio", "--sort", "dso,sym", "--percent-limit", "1"],
        capture_output=True,
        text=True,
    ).stdout
    hot = re.findall(r"^\s+([\d.]+)%\s+(\S+)\s+\[\.\] (.+?)\s*$", report, re.M)
    hot = [(float(p), dso, sym) for p, dso, sym in hot if dso.startswith(("libtorch", "libmkl", "libdnnl"))][:HOTTEST]
    counted = {"symbols": [], **dict.fromkeys(WIDTHS, 0)}
    for percent, dso, symbol in hot:
        annotated = subprocess.run(
            ["perf", "annotate", "-i", str(perf_data), "--stdio", "-s", symbol], capture_output=True, text=True
        ).stdout
        share = [(re.match(r"^\s+([\d.]+)\s+:", line), line) for line in annotated.splitlines()]
        sampled = [line for m, line in share if m and float(m[1]) > 0]
        counted["symbols"].append({"percent": percent, "dso": dso, "symbol": symbol[:160]})
        for width in WIDTHS:
            counted[width] += sum(width in line for line in sampled)
    return counted


def run(name: str, setting: dict[str, str], folder: Path) -> dict:
    """Kernel `name` under `setting`: perf attached to its loop alone (not to Python's start-up)."""
    env = {k: v for k, v in os.environ.items() if k not in SWITCHES}
    env.update(setting, ONEDNN_VERBOSE="1")
    out, perf_data = folder / f"{name}.pt", folder / f"{name}.perf"
    command = [sys.executable, __file__, "--child", name, str(out)]
    process = subprocess.Popen(command, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    log = [process.stdout.readline()]
    perf = None
    if shutil.which("perf") and not name.startswith("onednn"):  # oneDNN's generated code has no disassembly
        perf = subprocess.Popen(["perf", "record", "-q", "-p", str(process.pid), "-o", str(perf_data)])
        time.sleep(0.5)  # perf attaches
    process.stdin.write("go\n")
    process.stdin.flush()
    log.append(process.stdout.read())
    if process.wait() != 0:
        raise RuntimeError(f"{name} under {setting} failed: {''.join(log)}")
    if perf is not None:
        perf.wait()
    log = "".join(log)
    return {
        "onednn_kernels": sorted(set(re.findall(r"exec,cpu,\w+,([^,]+),forward", log))),
        "torch_cpu_capability": re.findall(r"^capability (\S+)", log, re.M)[0],
        "hot_code": hot_instructions(perf_data) if perf_data.exists() else None,
    }


def main() -> None:
    import torch

    results: dict[str, dict] = {name: {"switch": SETTINGS[switch]} for name, switch in KERNELS.items()}
    with tempfile.TemporaryDirectory() as tmp:
        for setting_name, setting in SETTINGS.items():
            folder = Path(tmp) / setting_name
            folder.mkdir()
            for name, switch in KERNELS.items():
                if setting_name not in ("native", switch, "all_avx2"):
                    continue
                found = run(name, setting, folder)
                output = torch.load(folder / f"{name}.pt")
                native = torch.load(Path(tmp) / "native" / f"{name}.pt")
                found["differs_from_native"] = not torch.equal(output, native)
                results[name][setting_name] = found
                hot = found["hot_code"] or {}
                print(
                    f"{setting_name:12} {name:24} "
                    + " ".join(f"{width} {hot.get(width)!s:>4}" for width in WIDTHS)
                    + " "
                    + f"onednn {found['onednn_kernels']} differs {found['differs_from_native']}",
                    flush=True,
                )
    save(
        "isa_check",
        "none (random layers of SmolLM2-135M's shapes)",
        {"perf": bool(shutil.which("perf")), "kernels": results},
    )


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3])
    else:
        main()
