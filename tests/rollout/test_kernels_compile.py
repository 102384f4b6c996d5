"""The Triton kernels compile for NVIDIA GPUs (A100 and H100 targets) on a machine without one: Triton
lowers them to PTX and runs its bundled ptxas, which catches type and shape errors that the interpreter
used by the other kernel tests does not (it runs the Python source with NumPy)."""

from __future__ import annotations

import os
import subprocess
import sys

COMPILE = r"""
import sys
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from m2flow.rollout.paged_attention import TILE, _decode_kernel, _merge_kernel
from m2flow.rollout.fused_ops import _rms_norm_kernel, _rope_store_kernel, _silu_mul_kernel
from m2flow.rollout.sampling_kernel import _sample_kernel

def source(fn, signature, constexprs):  # constants keyed by argument position, as every Triton 3.x accepts
    return ASTSource(fn=fn, signature=signature, constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()})


STRIDES = ["stride_qb", "stride_qh", "stride_kb", "stride_kh", "stride_kt", "stride_tb", "stride_ob", "stride_oh",
           "stride_os", "stride_lb", "stride_lh"]
for arch in (80, 90):
    target = GPUTarget("cuda", arch, 32)
    # Qwen2.5-1.5B in bf16 (6 query heads per KV head, head_dim 128) and the micro test model in fp32
    for dtype, dot, group, dim in (("bf16", tl.bfloat16, 6, 128), ("fp32", tl.float32, 2, 8)):
        consts = dict(GROUP=group, GROUP_P=16, HEAD_DIM=dim, DIM_P=max(16, dim), BLOCK_SIZE=16, TILE=TILE, DOT_DTYPE=dot)
        for out in ("fp32", dtype):  # float32 parts to merge, or (one split) the result itself
            sig = {"q_ptr": f"*{dtype}", "k_ptr": f"*{dtype}", "v_ptr": f"*{dtype}", "tables_ptr": "*i64",
                   "lens_ptr": "*i64", "out_ptr": f"*{out}", "lse_ptr": "*fp32", "scale": "fp32",
                   **{name: "i32" for name in STRIDES}, **{name: "constexpr" for name in consts}}
            compiled = triton.compile(source(_decode_kernel, sig, consts), target=target)
            assert compiled.asm["cubin"], "no cubin"
        merge = {"part_ptr": "*fp32", "lse_ptr": "*fp32", "out_ptr": f"*{dtype}", "splits": "i32",
                 **{name: "i32" for name in ("stride_pb", "stride_ph", "stride_ps", "stride_lb", "stride_lh",
                                             "stride_ob", "stride_oh")}, "HEAD_DIM": "constexpr", "DIM_P": "constexpr",
                 "SPLITS_P": "constexpr"}
        compiled = triton.compile(source(_merge_kernel, merge, dict(HEAD_DIM=dim, DIM_P=max(16, dim), SPLITS_P=64)),
                                  target=target)
        assert compiled.asm["cubin"], "no cubin"
        print(f"decode sm_{arch} {dtype} ok")
    sig = {"logits_ptr": "*fp32", "stride": "i32", "temperature_ptr": "*fp32", "seeds_ptr": "*i64", "positions_ptr": "*i64",
           "tokens_ptr": "*i64", "logprobs_ptr": "*fp32", "vocab": "i32", "BLOCK_V": "constexpr"}
    compiled = triton.compile(source(_sample_kernel, sig, {"BLOCK_V": 1024}), target=target)
    assert compiled.asm["cubin"], "no cubin"
    print(f"sample sm_{arch} ok")
    for dtype in ("bf16", "fp32"):  # Qwen2.5-1.5B sizes: hidden 1536, intermediate 8960, head_dim 128
        norm = {"x_ptr": f"*{dtype}", "res_ptr": f"*{dtype}", "w_ptr": f"*{dtype}", "out_ptr": f"*{dtype}",
                "sum_ptr": f"*{dtype}", **{k: "i32" for k in ("stride_x", "stride_res", "stride_out", "stride_sum",
                                                              "dim")}, "eps": "fp32", "RESIDUAL": "constexpr",
                "BLOCK": "constexpr"}
        rope = {**{k: f"*{dtype}" for k in ("qkv_ptr", "cos_ptr", "sin_ptr", "q_ptr", "k_cache_ptr", "v_cache_ptr")},
                "blocks_ptr": "*i64", "offsets_ptr": "*i64",
                **{k: "i32" for k in ("stride_n", "stride_cn", "stride_qn", "stride_cb", "stride_ch", "stride_ct")},
                **{k: "constexpr" for k in ("HEADS", "KV_HEADS", "HALF", "BLOCK")}}
        kernels = [
            (_rms_norm_kernel, norm, {"RESIDUAL": False, "BLOCK": 2048}),
            (_rms_norm_kernel, norm, {"RESIDUAL": True, "BLOCK": 2048}),
            (_silu_mul_kernel, {"x_ptr": f"*{dtype}", "out_ptr": f"*{dtype}", "stride_x": "i32", "stride_out": "i32",
                                "width": "i32", "BLOCK": "constexpr"}, {"BLOCK": 1024}),
            (_rope_store_kernel, rope, {"HEADS": 12, "KV_HEADS": 2, "HALF": 64, "BLOCK": 128}),
        ]
        for fn, sig, consts in kernels:
            assert triton.compile(source(fn, sig, consts), target=target).asm["cubin"], "no cubin"
    print(f"fused sm_{arch} ok")
"""


def test_triton_kernels_compile_for_nvidia_gpus(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compiled, not interpreted
    env.update(TRITON_CACHE_DIR=str(tmp_path), TRITON_DEFAULT_FP_FUSION="1")
    result = subprocess.run([sys.executable, "-c", COMPILE], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == "decode sm_80 bf16 ok decode sm_80 fp32 ok sample sm_80 ok fused sm_80 ok "\
        "decode sm_90 bf16 ok decode sm_90 fp32 ok sample sm_90 ok fused sm_90 ok".split()
