"""The Triton kernels compile for a GPU target (sm_90) on a machine without one.

The interpreter runs the kernels' Python, not Triton's compiler: typing and lowering errors that only
compiled mode sees (a Python int where a tensor is needed, an int64/int32 mix, …) would otherwise
surface first on a GPU. ``triton.compile`` runs the front end, the MLIR passes and ptxas for an sm_90
target without a driver. It runs in a subprocess: the test session imports Triton in interpreter mode.
"""

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

SCRIPT = textwrap.dedent(
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from flowcut_kernels.ops.triton import attention_scores as pa, flow_scores as f, merge_nearest as pm
    from flowcut_kernels.ops.triton import select_gather as g, text_guided_scores as pt, topk_select as pk

    DATA = {"q_ptr", "k_ptr", "v_ptr", "hidden_ptr", "out_ptr"}  # pointers of the input dtype
    INDEX = {"idx_ptr", "idx_out_ptr", "src_ptr"}                 # int64 pointers
    OFFSETS = {"cu_ptr", "cu_out_ptr"}                            # cu_seqlens' dtype; other pointers fp32

    def build(kernel, dtype, cu, **constexprs):
        signature = {}
        for name in kernel.arg_names:
            if name in constexprs:
                signature[name] = "constexpr"
            elif name.endswith("_ptr"):
                types = {**dict.fromkeys(DATA, dtype), **dict.fromkeys(INDEX, "i64"), **dict.fromkeys(OFFSETS, cu)}
                signature[name] = "*" + types.get(name, "fp32")
            else:
                signature[name] = "fp32" if name == "scale" else "i32"
        triton.compile(ASTSource(kernel, signature, constexprs), target=GPUTarget("cuda", 90, 32))

    blocks = dict(BLOCK_S=64, BLOCK_H=16, BLOCK_C=64)
    for dtype, has_cls, semantic, prev, varlen, cu in (
        ("fp16", True, True, True, False, "i32"),   # dense batches
        ("bf16", False, False, False, False, "i32"),
        ("bf16", True, True, False, True, "i32"),   # packed batches, int32 and int64 cu_seqlens
        ("fp32", False, False, True, True, "i64"),
    ):
        flags = dict(HAS_CLS=has_cls, SEMANTIC=semantic, VARLEN=varlen)
        build(f._flow_scores_fused, dtype, cu, **flags, HAS_PREV=prev, BLOCK_D=64, **blocks)
        build(f._flow_scores_split, dtype, cu, **flags, BLOCK_S=64, BLOCK_D=64, BLOCK_B=4)
        build(f._flow_scores_heads, dtype, cu, **flags, **blocks)
        build(f._flow_scores_finish, dtype, cu, **flags, HAS_PREV=prev, BLOCK_S=64, BLOCK_H=16, BLOCK_B=4)
        build(f._flow_scores_entropy, dtype, cu, HAS_CLS=has_cls, VARLEN=varlen, BLOCK_S=64, BLOCK_C=64)
        build(g._select_rows_kernel, dtype, cu, HAS_CLS=has_cls, VARLEN=varlen, BLOCK_SEARCH=1024, BLOCK_N=64)
        build(g._gather_rows_kernel, dtype, cu, BLOCK_R=64, BLOCK_C=128)

    # The generic primitives: pointer types by name (others fp32), dots in the input dtype or in fp32 (F32).
    def build_primitive(kernel, pointers, **constexprs):
        signature = {}
        for name in kernel.arg_names:
            if name in constexprs:
                signature[name] = "constexpr"
            elif name.endswith("_ptr"):
                signature[name] = "*" + pointers.get(name, "fp32")
            else:
                signature[name] = "fp32" if name == "scale" else "i32"
        triton.compile(ASTSource(kernel, signature, constexprs), target=GPUTarget("cuda", 90, 32))

    # (input dtype, fp32 dots, cu_seqlens' dtype, the optional input given: key_mask, protect, sizes)
    for dtype, f32, cu, flag in (
        ("fp16", False, "i32", False),
        ("bf16", False, "i64", True),
        ("fp32", True, "i32", True),
    ):
        data = dict.fromkeys(("q_ptr", "k_ptr", "vr_ptr", "v_ptr"), dtype)
        tiles = dict(F32=f32, BLOCK_M=16, BLOCK_S=64, BLOCK_D=128)
        for kernel in (pa._attn_lse_kernel, pa._attn_mean_kernel):
            build_primitive(kernel, {**data, "mask_ptr": "i1"}, HAS_MASK=flag, **tiles)
        for kernel in (pt._text_lse_kernel, pt._text_score_kernel):
            build_primitive(kernel, {**data, "seg_ptr": "i64"}, **tiles)
        index = {"kept_ptr": "i64", "dropped_ptr": "i64", "kept_cu_ptr": cu, "dropped_cu_ptr": cu}
        build_primitive(pk._topk_select_kernel, {**index, "scores_ptr": dtype, "prot_ptr": "i1", "cu_ptr": cu,
                        "keep_ptr": "i64"}, HAS_PROTECT=flag, BLOCK_SEARCH=1024, BLOCK_N=256)
        index["target_ptr"] = "i64"
        build_primitive(pm._merge_assign_kernel, {**index, "keys_ptr": dtype}, F32=f32, BLOCK_J=32, BLOCK_K=32,
                        BLOCK_CK=64)
        build_primitive(pm._merge_accumulate_kernel, {**index, "hidden_ptr": dtype, "out_ptr": dtype,
                        "sizes_ptr": "fp64" if flag else "fp32"}, HAS_SIZES=flag, BLOCK_J=32, BLOCK_C=128)
    print("compiled")
    """
)


def test_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "compiled" in done.stdout, done.stderr[-4000:]
