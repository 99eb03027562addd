"""Names are defined once: a new gate metric or quantization scheme is one registry entry (plus its value
in conf/), and the config schema, its checks, the gate and the pipeline pick it up. Each case runs in a
fresh interpreter that registers the entry before anything else imports it, as an edit of that one
module would."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from conftest import ROOT, python_env

from distill.config import GateConfig, QuantizeConfig, compose
from distill.losses import DIVERGENCES
from export.gate import THRESHOLDS
from families import FAMILIES
from quantize import SCHEMES


def _run(code: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT,
        env=python_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_schema_fields_are_the_registries():
    import dataclasses

    assert [f.name for f in dataclasses.fields(GateConfig)] == ["variants", *THRESHOLDS, "min_teacher_score"]
    assert [f.name for f in dataclasses.fields(QuantizeConfig)] == ["variants", "probe_examples", *SCHEMES]
    for name, scheme in SCHEMES.items():
        assert isinstance(getattr(compose([]).quantize, name), scheme.settings)
    assert set(FAMILIES) >= {"llama", "qwen2", "qwen3", "mistral", "phi3"}
    assert set(DIVERGENCES) == {"forward_kl", "reverse_kl", "jsd", "skew_kl", "tv"}
    # the gate (export layer) flags the metrics that exist only on tool-call data; distill.metrics names them
    from distill.metrics import TOOL_CALL_METRICS

    assert {s.metric for s in THRESHOLDS.values() if s.tool_calls} == set(TOOL_CALL_METRICS)


def test_a_new_gate_metric_is_one_registry_entry():
    out = _run("""
        from export import gate
        gate.THRESHOLDS["min_generation_match"] = gate.Threshold("generation_match", ">=", relative=False, unit=True)
        from distill.config import ConfigError, compose
        rc = compose(["+exp=smoke", "+gate.min_generation_match=0.9"])
        th = gate.thresholds_of(rc.gate)
        assert th["min_generation_match"] == 0.9
        v = gate.evaluate_gate({}, {"onnx_int8": {"generation_match": 0.5}}, {"min_generation_match": 0.9}, 0.0)
        assert not v.passed and v.failures[0].metric == "generation_match"
        try:
            compose(["+exp=smoke", "+gate.min_generation_match=1.5"])
        except ConfigError as err:
            assert "gate.min_generation_match: must be between 0 and 1" in str(err)
        else:
            raise AssertionError("range rule not applied")
        print("OK")
    """)
    assert "OK" in out


def test_a_new_quantization_scheme_is_one_registry_entry():
    out = _run("""
        import dataclasses
        import quantize

        @dataclasses.dataclass
        class Int8TensorSettings:
            embedding: bool
            def problems(self, key):
                return []

        quantize.SCHEMES["int8_tensor"] = quantize.Scheme(
            Int8TensorSettings,
            lambda b: quantize.quantize_int8_dynamic(
                b.src, b.dest, per_channel=False, embedding=b.settings.embedding, probe=b.probe
            ),
            lambda s: False,
            "int8, one scale per tensor",
        )
        from distill.config import ConfigError, compose
        rc = compose(["+exp=smoke", "quantize.variants=[int8_tensor]", "gate.variants=[int8_tensor]",
                      "+quantize.int8_tensor.embedding=false"])
        assert rc.quantize.int8_tensor.embedding is False and "int8_tensor" in quantize.onnx_variants()
        try:
            compose(["+exp=smoke", "quantize.variants=[int8_tensor]"])  # its settings are missing from conf/
        except ConfigError as err:
            assert "quantize.int8_tensor: missing" in str(err)
        else:
            raise AssertionError("missing settings accepted")
        print("OK")
    """)
    assert "OK" in out
