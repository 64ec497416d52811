"""The native kernels' instruction-set variants (lmserve/quant/csrc/isa_*.cpp, chosen at load by
CPUID): each variant this CPU runs against the AVX2 one and against numpy / the PyTorch modules;
a variant this CPU lacks is skipped with that reason."""

import logging
import math

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import quantize

from lmserve import LLM, SamplingParams
from lmserve.quant import native
from lmserve.quant.gguf_blocks import decode
from lmserve.quant.packed import BlockWeight, quantize_int4, quantize_int8

pytestmark = pytest.mark.skipif(native.load() is None, reason="the C++ extension did not build here")
VARIANTS = ["avx2", "avx512"]


def _require(name: str):
    """The extension, where this CPU runs the variant `name` (else the test is skipped)."""
    labels = {variant: (label, runs) for variant, label, runs in native.isa_variants()}
    label, runs = labels[name]
    if not runs:
        pytest.skip(f"CPU lacks {label}")
    return native.load()


def _run(name: str, f, *args):
    with native.using_isa(name):
        return f(*args)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("form", ["int4", "int8", "int8-group16", "Q4_0", "Q4_1"])
@pytest.mark.parametrize("rows, cols", [(43, 96), (200, 576), (1539, 64)])  # odd row counts, partial blocks
def test_block_matmul_equals_avx2_and_numpy(variant, form, rows, cols):
    """Every batch size 1..40 (all tile heights and their remainders): the variant's output is
    the AVX2 variant's up to the order of the offsets' fp32 sums, and numpy's fp64 product of
    the dequantized weight to 1e-4 relative; each output row is the same computed alone."""
    ext = _require(variant)
    weight = torch.randn(rows, cols, generator=torch.Generator().manual_seed(rows))
    gguf = lambda name: decode(quantize(weight.numpy(), GGMLQuantizationType[name]), name, (rows, cols))  # noqa: E731
    gq = {"int4": lambda: quantize_int4(weight), "int8": lambda: quantize_int8(weight),
          "int8-group16": lambda: quantize_int8(weight, group=16),
          "Q4_0": lambda: gguf("Q4_0"), "Q4_1": lambda: gguf("Q4_1")}[form]()  # fp16 scales, Q4_0 centred
    packed = BlockWeight(gq, ext)
    dense = gq.dequantize().astype(np.float64)
    x = torch.randn(40, cols, generator=torch.Generator().manual_seed(cols))

    def matmul(rows_in):
        return ext.block_matmul(rows_in, packed.q, packed.scale, packed.bias, packed.group, packed.bits, rows)

    for batch in range(1, 41):
        out = _run(variant, matmul, x[:batch])
        expected = x[:batch].double().numpy() @ dense.T
        scale = float(np.abs(expected).max())
        assert np.abs(out.double().numpy() - expected).max() <= 1e-4 * scale, batch
        torch.testing.assert_close(out, _run("avx2", matmul, x[:batch]), rtol=0, atol=1e-6 * scale)
    alone = _run(variant, lambda: torch.cat([matmul(x[i : i + 1]) for i in range(40)]))
    assert torch.equal(alone, out)


@pytest.mark.parametrize("variant", VARIANTS)
def test_argmax_logsumexp_equals_torch(variant):
    """A vocabulary that no register width divides, the maximum late and repeated."""
    ext = _require(variant)
    logits = torch.randn(5, 49157, generator=torch.Generator().manual_seed(0)) * 4
    logits[1, 49150] = logits[1, 49155] = 100.0
    ids, lse = _run(variant, lambda: ext.argmax_logsumexp(logits))
    assert torch.equal(ids, logits.argmax(dim=-1))
    torch.testing.assert_close(lse, torch.logsumexp(logits, dim=-1), rtol=1e-6, atol=1e-5)


def _generate(variant: str, directory, enforce_eager: bool):
    prompts = [list(range(3, 3 + n)) for n in (5, 19, 33)]
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, logprobs=5)

    def run():
        llm = LLM(str(directory), kv_cache_memory="16MiB", quantization="int4", enforce_eager=enforce_eager)
        assert (llm.engine.runner.fused_decode is None) == enforce_eager
        return [o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)]

    return _run(variant, run)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("kind", ["llama_gqa", "qwen3"])  # head_dim 16 and 32 (with q/k norms)
def test_fused_decode_equals_avx2_and_the_module_path(tiny_model_factory, variant, kind):
    """The fused decode step's greedy tokens and top-5 logprobs under the variant: those of the
    AVX2 variant and those of the PyTorch modules (enforce_eager), logprobs within 1e-3 (fp32
    sums run in another order in each: ~3e-4 apart measured, as the AVX2 fused step is from the
    modules)."""
    _require(variant)
    directory, _ = tiny_model_factory(kind)
    fused = _generate(variant, directory, enforce_eager=False)
    others = [_generate(variant, directory, True)] + ([] if variant == "avx2" else [_generate("avx2", directory, False)])
    for other in others:
        for f, e in zip(fused, other):
            assert f.token_ids == e.token_ids
            for step_f, step_e in zip(f.logprobs, e.logprobs):
                assert step_f.keys() == step_e.keys()
                for token, value in step_e.items():
                    assert math.isclose(step_f[token], value, abs_tol=1e-3), (token, step_f[token], value)


def test_load_picks_the_best_variant_unless_the_environment_names_one(monkeypatch, caplog):
    ext = native.load()
    loaded = ext.isa()
    best_name, best_label, _ = next(v for v in native.isa_variants() if v[2])
    try:
        with caplog.at_level(logging.INFO, logger="lmserve"):
            monkeypatch.setenv(native.ISA_ENV, "avx2")
            assert native._choose_isa(ext) == "AVX2+FMA" and ext.isa() == "avx2"
            assert "running AVX2+FMA (LMSERVE_NATIVE_ISA=avx2)" in caplog.text
            monkeypatch.setenv(native.ISA_ENV, "sse9")
            assert native._choose_isa(ext) == best_label and ext.isa() == best_name
            assert "LMSERVE_NATIVE_ISA=sse9: not a kernel variant this CPU runs" in caplog.text
            monkeypatch.delenv(native.ISA_ENV)
            assert native._choose_isa(ext) == best_label and ext.isa() == best_name
    finally:
        ext.use_isa(loaded)
    assert f"native kernels: {native.TARGET_ISA}" in native.describe_cpu()
    with pytest.raises(RuntimeError, match="no kernel variant named sse9"):
        ext.use_isa("sse9")
    for name, label, runs in native.isa_variants():
        if not runs:
            with pytest.raises(RuntimeError, match=f"cannot run the {label} kernels"):
                ext.use_isa(name)
