"""Registers, spills and shared memory of shard/gemv.py's kernels as the shard launches them on
an H100, read without a GPU: each kernel compiled by Triton for sm_90a, its PTX assembled by
the ptxas that Triton ships (`ptxas -v`), and from its TTGIR whether each 2-16-row loop's
loads became asynchronous copies (Triton's software pipeline) into swizzled buffers.

    python benchmarks/gemv_resources.py --config benchmarks/configs/llama-3.1-8b

The kernels are compiled with the specialization Triton's launcher gives them: pointers and
the integers divisible by 16 marked so (`tt.divisibility`). Without it every load is scalar,
nothing is pipelined, and the registers read here have nothing to do with the GPU's.
Registers differ by Triton version: to read the device's (Triton 3.6 with torch 2.11), put
`pip install --target DIR triton==3.6.0` first on PYTHONPATH.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from transformers import AutoConfig

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from shard import gemv  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
# The arguments of each kernel in order, with their types; the launcher marks pointers and
# integers divisible by 16 as such (the shapes of Llama models are).
GEMV_ARGS = [("x_ptr", "*bf16"), ("w_ptr", "*bf16"), ("out_ptr", "*bf16"), ("res_ptr", "*bf16"),
             ("sq_ptr", "*fp32"), ("eps", "fp32"), ("rows", "i32"), ("N", "i32"), ("K", "i32"),
             ("stride_x", "i32"), ("stride_w", "i32"), ("parts", "i32")]
ROTARY_ARGS = [("x_ptr", "*bf16"), ("w_ptr", "*bf16"), ("q_ptr", "*bf16"), ("k_ptr", "*bf16"),
               ("v_ptr", "*bf16"), ("pos_ptr", "*i64"), ("cos_ptr", "*fp32"),
               ("sin_ptr", "*fp32"), ("slot_ptr", "*i64"), ("sq_ptr", "*fp32"), ("eps", "fp32"),
               ("rows", "i32"), ("K", "i32"), ("stride_x", "i32"), ("stride_w", "i32"),
               ("stride_slot", "i32"), ("num_heads", "i32"), ("num_kv_heads", "i32"),
               ("parts", "i32")]
# fp32, or not divisible by 16 (parts: 1 at one row)
UNSPECIALIZED = {"eps", "rows", "num_heads", "num_kv_heads", "parts"}


def compiled(kernel, args, constants: dict, warps: int, stages: int):
    signature = dict(args) | {name: "constexpr" for name in constants}
    attrs = {(i,): [["tt.divisibility", 16]] for i, (name, _) in enumerate(args)
             if name not in UNSPECIALIZED}
    return triton.compile(ASTSource(kernel, signature, constants, attrs), target=TARGET,
                          options={"num_warps": warps, "num_stages": stages})


def assembled(ptx_text: str) -> str:
    """ptxas -v's report on the PTX; where Triton wrote a PTX version newer than its ptxas
    reads, the PTX is declared at the version that ptxas names and assembled again."""
    with tempfile.TemporaryDirectory() as folder:
        ptx = os.path.join(folder, "k.ptx")
        for _ in range(2):
            with open(ptx, "w") as f:
                f.write(ptx_text)
            done = subprocess.run([PTXAS, "-v", "-arch=sm_90a", ptx, "-o", ptx + ".cubin"],
                                  capture_output=True, text=True)
            newest = re.search(r"Unsupported \.version .*current version is '([\d.]+)'",
                               done.stderr)
            if newest is None:
                break
            ptx_text = re.sub(r"^\.version \S+", f".version {newest[1]}", ptx_text, flags=re.M)
    return done.stderr


def unswizzled_buffers(ttgir: str) -> int:
    """The shared-memory buffers laid out without a swizzle (one phase): reading tl.dot's
    operands from those conflicts on the banks. Triton picks that layout for a tile read in
    two layouts (an operand of tl.dot and a sum on the CUDA cores)."""
    flat = {name for name, phases in re.findall(
        r"^(#shared\d*) = #ttg\.swizzled_shared<\{[^}]*maxPhase = (\d+)", ttgir, re.M)
        if phases == "1"}
    return sum(1 for line in ttgir.splitlines()
               if "ttg.local_alloc" in line and any(f"{name}," in line for name in flat))


def resources(kernel) -> str:
    """ptxas's registers and spills, the shared memory, the loop's asynchronous copies and the
    unswizzled buffers."""
    report = assembled(kernel.asm["ptx"])
    used = re.search(r"Used (\d+) registers", report)
    spills = re.search(r"(\d+) bytes spill stores", report)
    if used is None:
        return "ptxas: " + report.strip()[-300:]
    copies = kernel.asm["ttgir"].count("ttg.async_copy_global_to_local")
    return (f"{used[1]:>3} registers, {spills[1]:>4} B spilled, "
            f"{kernel.metadata.shared:>6} B shared, {copies} async copies, "
            f"{unswizzled_buffers(kernel.asm['ttgir'])} unswizzled buffers")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="a model folder (config.json)")
    args = parser.parse_args()
    config = AutoConfig.from_pretrained(args.config)
    hidden, inner = config.hidden_size, config.intermediate_size
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    qkv = (config.num_attention_heads + 2 * config.num_key_value_heads) * head_dim
    # (name, inputs, outputs, gated, its folded form); each in its plain form too.
    products = [("qkv", hidden, qkv, False, "normed"), ("o", hidden, hidden, False, "added"),
                ("gate_up", hidden, 2 * inner, True, "normed"),
                ("down", inner, hidden, False, "added")]
    for rows in (1, 2):
        # The sums of squares a normed product of 2-16 rows reads: one per program of the
        # added product before it.
        parts = 1 if rows == 1 else gemv.squares_parts(hidden, rows)
        for name, k, n, gated, folded in products:
            for form in ("plain", folded):
                block_n, block_k, warps, stages = gemv.config(rows, k, gated,
                                                              normed=form == "normed", features=n)
                kernel = compiled(gemv._gemv_kernel, GEMV_ARGS, dict(
                    GATED=gated, SCALED=form == "normed", ADDED=form == "added",
                    ROWS=1 if rows == 1 else gemv.DOT_ROWS, BLOCK_N=block_n, BLOCK_K=block_k,
                    PARTS=triton.next_power_of_2(parts), EVEN=True, PDL=True), warps, stages)
                print(f"rows {'1' if rows == 1 else '2-16':>4} {name:8} {form:7} "
                      f"{block_n}x{block_k}, {warps} warps, {stages} stages: {resources(kernel)}")
        for form in ("plain", "normed"):
            pairs, block_k, warps, stages = gemv.rotary_tiles(rows, hidden, head_dim)
            kernel = compiled(gemv._qkv_rotary_kernel, ROTARY_ARGS, dict(
                ROWS=1 if rows == 1 else gemv.DOT_ROWS, PAIRS=pairs,
                BLOCK_K=block_k, HALF=head_dim // 2, SCALED=form == "normed",
                PARTS=triton.next_power_of_2(parts), EVEN=True, PDL=True), warps, stages)
            print(f"rows {'1' if rows == 1 else '2-16':>4} {'rotary':8} {form:7} "
                  f"{pairs} pairs x {block_k}, {warps} warps, "
                  f"{stages} stages: {resources(kernel)}")


if __name__ == "__main__":
    main()
