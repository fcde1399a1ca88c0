"""Compile every gigatron Triton kernel for sm_90 (H100/H200) without a GPU, through ptxas, and report
whether it lowers to a cubin (register spills are only reported once a driver loads it). Not collected by pytest (slow: ~1-2 min on 2 cores); run by hand after kernel edits:

    TRITON_INTERPRET=0 python tests/kernels/sm90_compile_check.py

It proves the kernels type-check and lower for Hopper with this triton version; it does not run them
(no numerics, no timing), and the GPU machine's Triton 3.6 may lower differently.
"""

import os
import sys

os.environ["TRITON_INTERPRET"] = "0"

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)


def compile_one(fn, sig, const, **opt):
    sig = dict(sig)
    for name in const:
        sig[name] = "constexpr"
    kernel = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const), target=TARGET, options=opt)
    name = getattr(fn, "__name__", str(fn))
    print(f"  {name} {const.get('BLOCK_M', '')}x{const.get('BLOCK_N', '')} {opt}: ok "
          f"(cubin {len(kernel.asm.get('cubin', b''))} bytes)")


def fused(dt="bf16"):
    from gigatron.kernels import fused_triton_kernels as k
    p = f"*{dt}"
    compile_one(k._rmsnorm_fwd, {"X": p, "W": p, "Y": p, "RSTD": "*fp32", "N": "i32", "D": "i32", "sx": "i32",
                                 "sy": "i32", "eps": "fp32"}, {"BLOCK_ROWS": 1, "BLOCK_D": 4096}, num_warps=4)
    compile_one(k._rmsnorm_bwd, {"DY": p, "X": p, "W": p, "RSTD": "*fp32", "DX": p, "DW_PARTIAL": "*fp32",
                                 "N": "i32", "D": "i32", "sdy": "i32", "sx": "i32", "sdx": "i32",
                                 "rows_per_program": "i32"}, {"BLOCK_ROWS": 1, "BLOCK_D": 8192}, num_warps=8)
    compile_one(k._swiglu_fwd, {"A": p, "B": p, "O": p, "n": "i64"}, {"BLOCK": 1024}, num_warps=4)
    compile_one(k._swiglu_bwd, {"DO": p, "A": p, "B": p, "DA": p, "DB": p, "n": "i64"}, {"BLOCK": 1024}, num_warps=4)
    for bwd in (False, True):
        compile_one(k._rope, {"X": p, "COS": "*fp32", "SIN": "*fp32", "Y": p, **{s: "i32" for s in
                    ("sxb", "sxh", "sxt", "syb", "syh", "syt", "sct", "sst", "H", "T")}},
                    {"HALF": 64, "BLOCK_HALF": 64, "BLOCK_T": 64, "BACKWARD": bwd}, num_warps=4)
    compile_one(k._ce_chunk_stats, {"Z": p, "LABEL": "*i32", "M": "*fp32", "S": "*fp32", "TGT": "*fp32", "V": "i32",
                                    "sz": "i32"}, {"BLOCK_V": 4096}, num_warps=8)
    compile_one(k._ce_chunk_grad, {"Z": p, "G": p, "LABEL": "*i32", "LSE": "*fp32", "SCALE": "*fp32", "V": "i32",
                                   "sz": "i32", "sg": "i32"}, {"BLOCK_V": 4096}, num_warps=8)


def attention(dt="bf16", D=128):
    from gigatron.kernels import attention_triton_kernels as k
    p = f"*{dt}"
    flags = dict(GROUP=1, HEAD_DIM=D, BLOCK_D=D, CAUSAL=True, HAS_QPOS=False, HAS_KPOS=False, HAS_SEG=False,
                 DIAG_BOUND=True, SKIP_EMPTY=False, CAST_FP32=dt == "fp32",
                 PRECISION="ieee" if dt == "fp32" else "tf32")
    i = lambda names: {n: "i32" for n in names.split()}  # noqa: E731
    fwd = {"Q": p, "K": p, "V": p, "O": p, "LSE": "*fp32", "QPOS": "*i32", "KPOS": "*i32", "QSEG": "*i32",
           "KSEG": "*i32", **i("sqb sqh sqt skb skh skt svb svh svt sob soh sot sqpos_b skpos_b sqseg_b skseg_b H T S"),
           "qk_scale": "fp32", **i("DIAG_OFF T_BUCKET S_BUCKET")}
    dkdv = {"Q": p, "K": p, "V": p, "DO": p, "LSE": "*fp32", "DELTA": "*fp32", "DK": p, "DV": p, "QPOS": "*i32",
            "KPOS": "*i32", "QSEG": "*i32", "KSEG": "*i32",
            **i("sqb sqh sqt skb skh skt svb svh svt sdob sdoh sdot sdkb sdkh sdkt sdvb sdvh sdvt sqpos_b skpos_b "
                "sqseg_b skseg_b H HKV T S"), "qk_scale": "fp32", "scale": "fp32", **i("DIAG_OFF T_BUCKET S_BUCKET")}
    dq = {"Q": p, "K": p, "V": p, "DO": p, "LSE": "*fp32", "DELTA": "*fp32", "DQ": p, "QPOS": "*i32",
          "KPOS": "*i32", "QSEG": "*i32", "KSEG": "*i32",
          **i("sqb sqh sqt skb skh skt svb svh svt sdob sdoh sdot sdqb sdqh sdqt sqpos_b skpos_b sqseg_b skseg_b "
              "H T S"), "qk_scale": "fp32", "scale": "fp32", **i("DIAG_OFF T_BUCKET S_BUCKET")}
    for name, fn, sig in (("fwd", k._attn_fwd, fwd), ("dkdv", k._attn_bwd_dkdv, dkdv), ("dq", k._attn_bwd_dq, dq)):
        bm, bn, w, st = k.deterministic_config(name, D, dt == "fp32")
        compile_one(fn, sig, dict(flags, BLOCK_M=bm, BLOCK_N=bn), num_warps=w, num_stages=st)


if __name__ == "__main__":
    which = sys.argv[1:] or ["fused", "attention"]
    if "fused" in which:
        print("fused kernels, bf16:")
        fused()
    if "attention" in which:
        print("attention, deterministic configs, bf16 D=128:")
        attention()
