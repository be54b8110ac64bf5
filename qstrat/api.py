"""The public workflow: `Quantizer(model, strategy).quantize_model(calib_data)`.

Orchestration only: capture the float model as a graph, decide and insert
quantizers from the strategy, rebuild a Keras model with its own weights,
calibrate it. The user's model is read, never changed.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from collections.abc import Mapping
from typing import Any

from qstrat import guards
from qstrat.calibration.data import check_count, is_one_shot
from qstrat.errors import CalibrationDataError, ConfigError
from qstrat.export.outputs import output_target, write_output
from qstrat.graph import capture, rebuild
from qstrat.graph.ir import Graph
from qstrat.graph.rebuild import float32_policy
from qstrat.inspect.info import get_quantize_info
from qstrat.passes.calibrate import input_specs
from qstrat.passes.insert import insert
from qstrat.passes.optimize import OptimizeReport, optimize
from qstrat.passes.ptq import annotated, calibrate_and_refine, note_fast_finetune, rebuild_quantized
from qstrat.passes.quantize import QuantizeReport, cast_annotation
from qstrat.passes.refine.bias_correction import Correction
from qstrat.passes.refine.positions import PositionChange
from qstrat.passes.runtime_rounding import round_like
from qstrat.progress import Progress
from qstrat.strategy import Strategy, dump_quantize_strategy, load_strategy, set_quantize_strategy


class Quantizer:
    """Quantize a float Keras 3 model as a strategy says.

    Args:
        model: a Sequential or Functional Keras model (never modified).
        quantize_strategy: "pof2s", "fs" or "tqt" (alias "pof2s_tqt").
        custom_quantize_strategy: a JSON file path or dict merged over the built-in.
        custom_objects: ``{name: object}`` of custom layers (usable in patterns) and the functions (an
            activation) their configs name: qstrat rebuilds layers from their configs within
            ``keras.saving.custom_object_scope(custom_objects)``.

    Example:
        >>> q = Quantizer(model, "pof2s")
        >>> qmodel = q.quantize_model(calib_images, calib_batch_size=32)
        >>> print(q.report.table())
    """

    def __init__(
        self,
        model,
        quantize_strategy: str = "pof2s",
        custom_quantize_strategy: str | os.PathLike | Mapping | None = None,
        custom_objects: Mapping[str, Any] | None = None,
    ):
        graph = capture(model)  # fails early, with a clear message, on models qstrat cannot read
        guards.refuse_quantized(graph)
        guards.refuse_non_finite_weights(graph)
        self.model = model
        self.custom_objects = dict(custom_objects or {})
        self._base = quantize_strategy
        self._custom = custom_quantize_strategy
        self.strategy: Strategy = load_strategy(quantize_strategy, custom_quantize_strategy, self.custom_objects)
        self.report: QuantizeReport | None = None
        self.optimize_report: OptimizeReport | None = None
        self.bias_corrections: list[Correction] = []
        # Of the last quantize_model with include_fast_ft: per block, its error before and after (refine stage).
        self.fast_finetune = None
        # Of the last quantize_model: each position the DPU compiler constraints moved (refine stage).
        self.position_changes: list[PositionChange] = []
        self.convert_report = None  # of the last quantize_model's refine conversions, when a key asked for one
        self.export_report = None  # of the last quantize_model's ONNX file, when output_format is "onnx"
        self.output_path: str | None = None  # the file the last quantize_model wrote (output_format)
        # Of the last quantize_model: seconds per stage, and "data_passes" over the calibration data.
        self.timings: dict[str, float] = {}
        self.mixed_precision = None  # of the last quantize_model with a budget: `qstrat.inspect.mixed.MixedPrecision`

    @contextlib.contextmanager
    def _scope(self):
        """Every public call's: float32 layers, and the user's custom objects known to Keras' deserialization."""
        import keras

        with float32_policy(), keras.saving.custom_object_scope(self.custom_objects):
            yield

    def _strategy(self, overrides: Mapping[str, Any]) -> Strategy:
        if not overrides:
            return self.strategy
        data = self.strategy.to_dict(2)
        return load_strategy(self._base, data, self.custom_objects, **overrides)

    def _optimized_graph(self, strategy: Strategy, data=None, steps=None, batch_size=32, progress=None) -> Graph:
        """The optimize stage's graph; ``data`` (calibration data) serves include_act_eq."""
        calib = (input_specs(self.model), batch_size, steps)
        graph, self.optimize_report = optimize(capture(self.model), strategy.optimize, data, calib, progress)
        return graph

    def optimize_model(self, **overrides):
        """The float model after the strategy's optimize passes, as a new model with its own weights.

        The passes (BN folding, CLE, ...) and their order come from
        ``optimize_pipeline_config``; what each did is in ``self.optimize_report``.

        Example:
            >>> q = Quantizer(model, "pof2s")
            >>> fmodel = q.optimize_model(include_cle=False)
            >>> print(q.optimize_report.table())
        """
        with self._scope():
            graph = self._optimized_graph(self._strategy(overrides))
            return rebuild(graph, name=f"{self.model.name}_optimized")

    def quantize_model(
        self,
        calib_dataset=None,
        calib_steps: int | None = None,
        calib_batch_size: int = 32,
        verbose: int = 1,
        accuracy_budget: float | None = None,
        eval_fn=None,
        target_sqnr: float | None = None,
        max_raised: float = 0.1,
        raise_to: str = "int16",
        **overrides,
    ):
        """Post-training quantization: returns the calibrated quantized Keras model.

        Args:
            calib_dataset: numpy array(s), tf.data.Dataset, keras.utils.PyDataset or a generator
                (not needed with ``convert_datatype``, which only casts).
            calib_steps: batches to use (None: the whole dataset).
            calib_batch_size: batch size for numpy arrays.
            verbose: 1 names each stage with its time and shows a bar for each pass over the data; 0 is silent.
            accuracy_budget, eval_fn: mixed precision: the largest drop of ``eval_fn(model)`` (higher is better)
                from the float model's score to accept; the most sensitive layers are raised to ``raise_to``
                until it is met (`qstrat.inspect.mixed`). ``self.mixed_precision.layer_config`` reproduces it.
            target_sqnr: mixed precision against the model outputs' SQNR (dB) on the first 256 calibration samples.
            max_raised: at most this fraction of the quantized layers is raised.
            raise_to: ``"int16"``, or a float type (``"float32"``, ...) that leaves the raised layers unquantized.
            **overrides: strategy keys, e.g. ``weight_bit=4``, ``include_cle=False``.
        """
        with self._scope():
            with guards.caller_objects_frozen():
                if accuracy_budget is not None or target_sqnr is not None or eval_fn is not None:
                    return self._mixed(
                        calib_dataset, calib_steps, calib_batch_size, verbose, accuracy_budget, eval_fn, target_sqnr,
                        max_raised, raise_to, overrides,
                    )  # fmt: skip
                self.mixed_precision = None
                calib_batch_size = check_count(calib_batch_size, "calib_batch_size")
                calib_steps = check_count(calib_steps, "calib_steps", allow_none=True)
                strategy = self._strategy(overrides)
                rounding = strategy.quantize["export_rounding"]
                if rounding:
                    guards.check_rounding_overrides(rounding, overrides)
                guards.warn_pending(strategy)
                if strategy.optimize["train_with_bn"]:
                    warnings.warn(
                        "optimize_pipeline_config.train_with_bn = true does nothing in quantize_model (PTQ folds every "
                        "BatchNormalization it can): it is for get_qat_model.",
                        stacklevel=2,
                    )
                self.convert_report = self.export_report = self.output_path = None
                target = output_target(strategy)  # checked before any long work
                if strategy.quantize["convert_datatype"]:
                    if target and target.endswith(".onnx"):
                        raise ConfigError(
                            "refine_pipeline_config.output_format",
                            '"onnx" with convert_datatype: a cast model has no quantizers for a QDQ file',
                            'Use output_format "keras", or save the model yourself.',
                        )
                    model = self._converted(strategy, strategy.quantize["convert_datatype"], Progress(verbose))
                    if target:
                        write_output(model, strategy, target, None)  # keras: onnx was refused above
                        self.output_path = target
                    return model
                progress = Progress(verbose)
                graph, annotation, qmodel, taps = self._build(
                    strategy, progress, data=calib_dataset, steps=calib_steps, batch_size=calib_batch_size
                )
                if target and target.endswith(".onnx"):
                    from qstrat.export.onnx_export import check_exportable

                    check_exportable(qmodel, strategy.refine["onnx_opset_version"])  # before calibration, not after
                self._calibrate(
                    qmodel, graph, taps, strategy, calib_dataset, calib_steps, calib_batch_size, verbose, progress
                )
                self.report = annotation.report
                note_fast_finetune(self.report, self.fast_finetune)
                qmodel = self._refine_and_write(qmodel, strategy, target, calib_dataset, progress)
                progress.done("quantized")
                self.timings = {**progress.times, "data_passes": progress.data_passes}
                return qmodel

    def _mixed(self, data, steps, batch_size, verbose, budget, eval_fn, target_sqnr, max_raised, raise_to, overrides):
        """quantize_model with a budget: quantize, then raise the most sensitive layers until it is met."""
        import time

        from qstrat.inspect.mixed import check_budget, first_samples, search

        check_budget(budget, eval_fn, target_sqnr, max_raised, raise_to)
        if is_one_shot(data):
            raise CalibrationDataError(
                "mixed precision (accuracy_budget, target_sqnr, eval_fn) quantizes the model several times and "
                "reads the calibration data each time, and a generator can be read only once. Pass an array, a "
                "tf.data.Dataset or a keras.utils.PyDataset."
            )
        started = time.perf_counter()
        user_config = dict(self._strategy(overrides).user["layer_config"] or {})

        def quantize(layer_config):
            return self.quantize_model(data, steps, batch_size, 0, **{**overrides, "layer_config": layer_config})

        qmodel = self.quantize_model(data, steps, batch_size, verbose, **overrides)
        sample = first_samples(data, input_specs(self.model), 256, batch_size)
        qmodel, self.mixed_precision = search(
            self.model, qmodel, quantize, sample, batch_size, user_config, budget, eval_fn, target_sqnr,
            max_raised, raise_to, verbose,
        )  # fmt: skip
        self.timings = {**self.timings, "mixed precision (whole call)": time.perf_counter() - started}
        return qmodel

    def _calibrate(
        self,
        qmodel,
        graph,
        taps,
        strategy,
        data,
        steps,
        batch_size,
        verbose,
        progress,
        activations=True,
        constraints=True,
    ) -> None:
        """`qstrat.passes.ptq.calibrate_and_refine` on ``qmodel``; sets ``bias_corrections``, ``position_changes``
        and ``fast_finetune``."""
        done = calibrate_and_refine(
            qmodel, graph, taps, strategy, data, steps, batch_size, verbose, progress, self.model, activations,
            constraints,
        )  # fmt: skip
        self.bias_corrections, self.position_changes = done.bias_corrections, done.position_changes
        self.fast_finetune = done.fast_finetune

    def _build(
        self, strategy: Strategy, progress: Progress, suffix: str = "quantized", data=None, steps=None, batch_size=32
    ):
        """Optimize, DPU versions, annotate, insert, rebuild: (float graph, annotation, quantized model, taps).

        ``data``: the calibration data, for include_act_eq's pass in the optimize stage.
        """
        with progress.stage("capture + optimize"):
            graph = self._optimized_graph(strategy, data, steps, batch_size, progress)
        guards.warn_unknown_layer_names(strategy, graph, self.optimize_report)
        guards.warn_unmatchable_params(strategy, graph, self.custom_objects)
        with progress.stage("annotate + insert + rebuild"):
            graph, annotation = annotated(graph, strategy, self.custom_objects)
            rounding = strategy.quantize["export_rounding"]
            if rounding:
                annotation = round_like(graph, annotation, rounding)
            qgraph, taps = insert(graph, annotation)
            qmodel = rebuild_quantized(qgraph, f"{self.model.name}_{suffix}")
            guards.warn_deep(qgraph)
        return graph, annotation, qmodel, taps

    def inspect_model(self, **overrides) -> list[dict]:
        """What each layer gets, without data: one dict per layer of the float model (then per layer the
        optimize stage made) with the rule that matched, its quantizers and bit widths, and whether it is
        fused, converted to a DPU version, folded or skipped, and why (`qstrat.inspect.layers.inspect_rows`).

        Example:
            print(qstrat.inspect.rows_table(Quantizer(model, "pof2s").inspect_model(weight_bit=4)))
        """
        with self._scope():
            from qstrat.inspect.layers import inspect_rows

            strategy = self._strategy(overrides)
            graph = self._optimized_graph(strategy)
            graph, annotation = annotated(graph, strategy, self.custom_objects)
            float_layers = [(layer.name, type(layer).__name__) for layer in self.model.layers]
            return inspect_rows(float_layers, graph, annotation, self.optimize_report)

    def get_qat_model(
        self,
        init_quant: bool = False,
        calib_dataset=None,
        calib_steps: int | None = None,
        calib_batch_size: int = 32,
        train_with_bn: bool | None = None,
        freeze_bn_delay: int | None = None,
        verbose: int = 1,
        **overrides,
    ):
        """A quantized model to train with ``model.fit`` (quantization-aware training); see `qstrat.qat`.

        Example:
            >>> q = Quantizer(model, "tqt")
            >>> qat = q.get_qat_model(init_quant=True, calib_dataset=x_train[:512])
            >>> qat.compile("adam", "sparse_categorical_crossentropy"); qat.fit(x_train, y_train, epochs=2)
            >>> deployed = q.get_deploy_model(qat)
        """
        with self._scope():
            from qstrat.qat import qat_model

            return qat_model(
                self,
                init_quant,
                calib_dataset,
                calib_steps,
                calib_batch_size,
                train_with_bn,
                freeze_bn_delay,
                verbose,
                overrides,
            )

    def get_deploy_model(
        self,
        qat_model,
        convert_to_pof2s_quantize_strategy: bool = True,
        convert_to_fs_quantize_strategy: bool = False,
        verbose: int = 0,
        **overrides,
    ):
        """The trained QAT model ready to deploy: BatchNormalization folded, TQT as positions, DPU constraints.

        See `qstrat.qat.deploy_model`. The QAT model is not changed.
        """
        with self._scope():
            from qstrat.qat import deploy_model

            return deploy_model(
                self, qat_model, convert_to_pof2s_quantize_strategy, convert_to_fs_quantize_strategy, verbose, overrides
            )

    def _refine_and_write(self, qmodel, strategy: Strategy, target: str | None, calib_dataset, progress: Progress):
        """The refine stage's conversions, then the file ``output_format`` asks for."""
        from qstrat.passes.refine.convert import to_float_scale, to_pof2s

        self.convert_report = None
        conversions = (
            ("convert_to_pof2s_quantize_strategy", "TQT", lambda m: to_pof2s(m)),
            ("convert_to_fs_quantize_strategy", "power-of-2 or TQT", lambda m: to_float_scale(m, framework=True)),
        )
        for key, kind, convert in conversions:
            if not strategy.refine[key]:
                continue
            with progress.stage(key.replace("_", " ")):
                converted, report = convert(qmodel)
            if not report.converted():
                warnings.warn(
                    f"refine_pipeline_config.{key} = true does nothing: the model has no {kind} quantizers.",
                    stacklevel=3,
                )
                continue
            qmodel, self.convert_report = converted, report
        qmodel.qstrat_metadata = {"qstrat.strategy": json.dumps(strategy.to_dict(2))}
        self.export_report, self.output_path = None, target
        if target is None:
            return qmodel
        with progress.stage(f"write {os.path.basename(target)}"):
            self.export_report = write_output(qmodel, strategy, target, calib_dataset)
        return qmodel

    def _converted(self, strategy: Strategy, dtype: str, progress: Progress):
        """``convert_datatype``: the optimized model (BatchNormalization folded first) cast to ``dtype``; no data needed."""
        with progress.stage("capture + optimize"):
            graph, self.optimize_report = optimize(capture(self.model), {**strategy.optimize, "fold_conv_bn": True})
        guards.warn_unknown_layer_names(strategy, graph, self.optimize_report)
        guards.warn_unmatchable_params(strategy, graph, self.custom_objects)
        with progress.stage("annotate + insert + rebuild"):
            annotation = cast_annotation(graph, dtype, strategy)
            qgraph, _ = insert(graph, annotation)
            model = rebuild_quantized(qgraph, f"{self.model.name}_{dtype}")
        self.report, self.bias_corrections = annotation.report, []
        progress.done(f"cast to {dtype}")
        self.timings = {**progress.times, "data_passes": progress.data_passes}
        return model

    def dump_quantize_strategy(self, dump_file: str = "quantize_strategy.json", verbose: int = 0) -> str:
        return dump_quantize_strategy(self.strategy, dump_file, verbose)

    def set_quantize_strategy(self, new_quantize_strategy) -> Strategy:
        self.strategy = set_quantize_strategy(self.strategy, new_quantize_strategy, self.custom_objects)
        return self.strategy


__all__ = ["Quantizer", "get_quantize_info"]
