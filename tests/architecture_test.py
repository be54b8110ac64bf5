"""The import rule: a lower layer never imports a higher one.

errors, files -> quantizers -> calibration -> strategy -> layers -> graph -> passes
-> export, inspect, saving -> api -> cli; `zoo` and `demo` sit on top. A strategy
names its quantizers and validates their parameters, so it sits above them.
"""

import ast
import pathlib

RANK = {
    "errors": 0,
    "saving": 7,
    "progress": 0,
    "files": 0,
    "arrays": 0,
    "quantizers": 1,
    "calibration": 2,
    "strategy": 3,
    "layers": 4,
    "graph": 5,
    "passes": 6,
    "export": 7,
    "inspect": 7,
    "integer": 7,
    "api": 8,
    "qat": 8,
    "guards": 8,
    "cli": 9,
    "cli_files": 9,
    "zoo": 10,
    "demo": 11,
}
ROOT = pathlib.Path(__file__).resolve().parents[1] / "qstrat"


def _part(module: str) -> str | None:
    bits = module.split(".")
    return bits[1] if len(bits) > 1 and bits[0] == "qstrat" else None


def test_lower_layers_never_import_higher_ones():
    problems = []
    for path in ROOT.rglob("*.py"):
        if path.name.endswith("_test.py") or path.name == "conftest.py" or path == ROOT / "__init__.py":
            continue
        rel = path.relative_to(ROOT).with_suffix("")
        own = rel.parts[0]
        assert own in RANK, f"{path}: add its package to RANK in this test"
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            for name in names:
                other = _part(name)
                if other and RANK.get(other, 99) > RANK[own]:
                    problems.append(f"{rel} imports {name}")
    assert not problems, "\n".join(problems)


def test_every_module_has_a_test_or_is_covered():
    untested = []
    for path in ROOT.rglob("*.py"):
        if path.name.endswith("_test.py") or path.name in ("__init__.py", "conftest.py"):
            continue
        if not path.with_name(path.stem + "_test.py").exists():
            untested.append(str(path.relative_to(ROOT)))
    # Modules whose behaviour is tested through a neighbour's test file.
    covered_elsewhere = {
        "errors.py",
        "quantizers/grid.py",
        "quantizers/reference.py",
        "quantizers/stats.py",
        "quantizers/base.py",
        "quantizers/batch_ranges.py",  # quantizers/training_test.py
        "quantizers/digit_sums.py",  # quantizers/training_test.py: the digit sums against the twin
        "quantizers/registry.py",
        "strategy/readers.py",  # strategy/load_test.py, strategy/reference_layout_test.py: their errors
        "strategy/parse.py",  # strategy/load_test.py and fuzz_test.py: every validation error
        "strategy/parse_registry.py",  # the same, for quantizer configs and patterns; quantizers/quantizers_test.py
        "inspect/units.py",  # inspect/analyze_test.py: the units, taps and flags every analysis run uses
        "inspect/measures.py",  # inspect/analyze_test.py: the sums against NumPy, the ranges and clipped counts
        "quantizers/affine.py",  # export/onnx_export_test.py (grid_of) and passes/refine/fast_ft_test.py
        "quantizers/exact32.py",  # quantizers/wide_bits_test.py: 17 to 32-bit grids, bit for bit
        "quantizers/pof2.py",
        "quantizers/float_scale.py",
        "quantizers/float_formats.py",  # quantizers/fake_quant_test.py: FP16, BF16 and BFP16 against their twins
        "zoo.py",
        "guards.py",  # api_test.py, cli_test.py, tests/strategy_keys_test.py: each refusal and warning
        "strategy/schema.py",
        "strategy/layer_types.py",
        "strategy/views.py",
        "strategy/resolve.py",
        "strategy/keys_doc.py",  # strategy/keys_test.py: the README table is what it generates
        "strategy/user_keys.py",  # tests/strategy_keys_test.py: every handy and partition key acts  # strategy/match_test.py: resolution, precedence and explain
        "graph/ir.py",
        "graph/rebuild.py",
        "graph/rewrite.py",
        "layers/scale_shift.py",
        "passes/optimize/channels.py",
        "passes/optimize/report.py",
        "layers/fake_quant.py",
        "layers/wrapper.py",
        "layers/shared_state.py",  # passes/quantize_test.py: shared quantizer state, saved and loaded
        "layers/masking.py",  # tests/unusual_models_test.py: a mask through the quantizers and into a wrapped layer
        "passes/scope.py",  # passes/quantize_test.py: input_layers / output_layers
        "calibration/data.py",
        "calibration/inputs.py",  # calibration/data_test.py, tests/bad_data_test.py, tests/bad_input_test.py: every check
        "passes/calibrate.py",
        "passes/weight_calibration.py",  # passes/quantize_test.py, layers/conv_bn_test.py: shared and folded weights
        "api.py",
        "passes/insert.py",  # passes/quantize_test.py: exact insertion counts, shared quantizers, bypass equality
        "passes/ptq.py",  # api_test.py, qat_test.py and the refine tests: every stage it runs, through the API
        "inspect/info.py",  # api_test.py, cli_test.py: get_quantize_info on every strategy's models
        "cli_files.py",  # cli_test.py: each flag's file checks and the calibration arrays' matching
        # export/onnx_export_test.py and onnx_models_test.py: files against ONNX Runtime, bit for bit
        "export/qdq.py",
        "export/rounding.py",
        "export/onnx_build.py",
        "export/onnx_layers.py",
        "export/onnx_activations.py",
        "export/onnx_report.py",
        "export/onnx_writer.py",
        "export/outputs.py",  # export/onnx_export_test.py: quantize_model writes what output_format says
        "passes/runtime_rounding.py",  # export/onnx_export_test.py, tflite_test.py: export_rounding
        "export/tflite_file.py",  # export/tflite_test.py: the file's ops, metadata and report
        "export/tflite_twin.py",  # export/tflite_test.py: the twin each export converts, folds and ranges
        "integer/activations.py",  # integer/layers_test.py: ReLU, relu6, LeakyReLU and hard sigmoid through integer_layer
    }
    assert sorted(set(untested) - covered_elsewhere) == []
