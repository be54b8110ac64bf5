"""Fast finetune: layer-wise reconstruction of each quantized conv/dense block, by adaptive rounding.

For each quantized conv, depthwise or dense layer, in model order, the
*block* is that layer with the quantizer of its input (when one directly
precedes it) and what follows it up to the next quantizer: its
BatchNormalization and activation, where the strategy keeps them apart. The
rounding of the layer's weights, each to the grid value below or above it,
and its bias are trained (`qstrat.passes.refine.soft_round`) so that the
block's output, quantizers on, matches the float model's output at the same
place:

- every quantizer's state (position, scale) stays frozen, and the weights
  end on the frozen grid, so the layer's quantizer leaves them as they are;
- the block reads either the float model's activations (``fast_ft_input``
  "float", the reference tool's choice) or those of the quantized model,
  the blocks before it already finetuned ("quantized");
- an epoch is a pass over the cached samples in a fresh seeded order (more
  than one pass when that makes fewer than `MIN_STEPS` steps), in batches of
  ``fast_ft_batch_size``; where the samples are no more than that, every step
  takes all of them, and the order no longer matters; a held-out
  eighth of the samples measures the block's error with the rounding chosen
  so far after each epoch: the best choice is kept, and training stops after
  `PATIENCE` epochs past the warm-up without a better one;
- a block keeps the result only if its error on all the cached samples went
  down; at the end, if the model outputs' error against the float model on
  the cached samples went up, every block is put back.

Memory is bounded by ``fast_ft_samples``, not by the calibration set: the
first that many calibration samples are read once into memory, and one
block's inputs and float outputs for them are cached at a time (where every
step takes all of them, the training part a second time while the block
trains, as backend tensors converted once instead of at every step).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import keras
import numpy as np

from qstrat.arrays import to_numpy
from qstrat.calibration.data import take_samples
from qstrat.errors import UnsupportedError
from qstrat.graph.ir import Graph, Node, TensorRef
from qstrat.layers import FakeQuant, QuantizeWrapper
from qstrat.layers.strided import pick, pointwise_strides
from qstrat.passes.frozen import Frozen
from qstrat.passes.refine.soft_round import Chain, Trainer, batch_mse
from qstrat.passes.runner import BatchRunner, graph_probe
from qstrat.progress import Progress

FAST_FT_ONE_SHOT = (
    "fast finetune (include_fast_ft) was skipped: it reads the calibration data again after calibration, and a "
    "generator can be read only once. Pass an array, a tf.data.Dataset or a keras.utils.PyDataset to get it, or set "
    "include_fast_ft=False to silence this warning."
)
MIN_STEPS = 50  # training steps per epoch at least: a small sample set is passed over more than once
PATIENCE = 3  # epochs past the warm-up without a lower held-out error before a block stops
SEED = 0
# Layers a block extends through after its conv/dense layer, up to the next quantizer.
CHAIN = frozenset({"BatchNormalization", "Activation", "ReLU", "LeakyReLU", "ELU", "PReLU", "DPUHardSigmoid"})
WEIGHTED = ("kernel", "depthwise_kernel", "pointwise_kernel")


@dataclass(frozen=True)
class Block:
    """A conv/dense layer and the layers around it that fast finetune trains as one."""

    name: str  # the conv/dense layer's name
    layers: tuple  # the quantized model's layers, in call order
    q_input: TensorRef  # what the block reads, in the quantized model's graph
    float_input: TensorRef | None  # the same place in the float graph (None: not there)
    float_output: TensorRef  # the float tensor the block's output is matched to

    @property
    def wrapper(self) -> QuantizeWrapper:
        return next(layer for layer in self.layers if isinstance(layer, QuantizeWrapper))

    def variables(self) -> list:
        """What fast finetune may change: the layer's weights and bias."""
        return list(self.wrapper.layer.trainable_weights)


@dataclass(frozen=True)
class BlockResult:
    layer: str
    mse_before: float  # the block's output against the float output, on the cached samples
    mse_after: float
    epochs: int  # epochs run (early stopping)
    kept: bool  # False: the new weights did not lower the error, and the old ones stay


@dataclass
class FastFinetune:
    """What fast finetune did (`Quantizer.fast_finetune`)."""

    samples: int
    inputs: str  # "float" | "quantized"
    blocks: list[BlockResult] = field(default_factory=list)
    output_mse_before: float = 0.0  # model outputs against the float model, on the cached samples
    output_mse_after: float = 0.0
    reverted: bool = False  # True: the outputs' error went up, and every block was put back

    def table(self) -> str:
        lines = [f"fast finetune on {self.samples} samples, {self.inputs} inputs:"]
        for r in self.blocks:
            state = "" if r.kept else "  (not kept)"
            lines.append(f"  {r.layer:<40} MSE {r.mse_before:.4g} -> {r.mse_after:.4g}  {r.epochs} epochs{state}")
        end = "  (went up: every block put back)" if self.reverted else ""
        lines.append(f"  model outputs: MSE {self.output_mse_before:.4g} -> {self.output_mse_after:.4g}{end}")
        return "\n".join(lines)


def find_blocks(graph: Graph, float_graph: Graph) -> list[Block]:
    """The blocks of a quantized model's graph (`qstrat.graph.capture` of it), in model order."""
    floats: dict[str, list[Node]] = {}
    for node in float_graph.nodes:
        floats.setdefault(node.layer_name, []).append(node)
    calls: dict[int, int] = {}
    for node in graph.nodes:
        calls[id(node.op)] = calls.get(id(node.op), 0) + 1

    def float_ref(node: Node) -> TensorRef | None:
        name = node.op.layer.name if isinstance(node.op, QuantizeWrapper) else node.layer_name
        found = floats.get(name, [])
        return TensorRef(found[0].name, 0) if len(found) == 1 else None

    blocks = []
    for node in graph.nodes:
        op = node.op
        if not isinstance(op, QuantizeWrapper) or calls[id(op)] != 1 or len(node.inputs) != 1:
            continue
        if not any(a in op.quantizers for a in WEIGHTED):
            continue
        layers = [op]
        source = graph.node(node.inputs[0].node)
        q_input = node.inputs[0]
        if isinstance(source.op, FakeQuant) and calls[id(source.op)] == 1 and len(source.inputs) == 1:
            layers.insert(0, source.op)
            q_input = source.inputs[0]
            source = graph.node(q_input.node)
        if isinstance(source.op, FakeQuant):
            continue
        last = node
        while True:
            users = graph.consumers(TensorRef(last.name, 0))
            if len(users) != 1 or isinstance(users[0].op, FakeQuant) or calls[id(users[0].op)] != 1:
                break
            inner = users[0].op.layer if isinstance(users[0].op, QuantizeWrapper) else users[0].op
            if type(inner).__name__ not in CHAIN or len(users[0].inputs) != 1:
                break
            layers.append(users[0].op)
            last = users[0]
        out = float_ref(last)
        if out is None:
            continue
        blocks.append(Block(op.layer.name, tuple(layers), q_input, float_ref(source), out))
    return blocks


def _run(probe, inputs: list[np.ndarray], batch_size: int) -> list[np.ndarray]:
    """The probe's outputs over all samples, batch by batch, into preallocated arrays."""
    n, outs = len(inputs[0]), None
    for start in range(0, n, batch_size):
        got = probe([a[start : start + batch_size] for a in inputs])
        if outs is None:
            outs = [np.empty((n, *g.shape[1:]), np.float32) for g in got]
        for o, g in zip(outs, got, strict=True):
            o[start : start + len(g)] = g
    return outs


def _mse(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(np.square(a.astype(np.float64) - b.astype(np.float64))))


class _Snapshot:
    """The values of some variables, to put back."""

    def __init__(self, variables):
        self.items = [(v, to_numpy(v).copy()) for v in variables]

    def restore(self) -> None:
        for v, value in self.items:
            v.assign(value)


def fast_finetune(
    qmodel,
    float_graph: Graph,
    data,
    settings,
    steps=None,
    batch_size=32,
    progress: Progress | None = None,
    reference=None,
) -> FastFinetune:
    """Finetune ``qmodel``'s blocks in place; ``settings``: the strategy's refine section.

    ``data`` must be re-iterable: it is read again after calibration. ``reference``: the user's float model,
    whose outputs the final check compares with (the float graph's differ where the quantize stage made DPU
    layer versions, which compute an average as the DPU does); its blocks still match the float graph's
    tensors, which have the quantized model's structure.
    """
    from qstrat.passes.calibrate import input_specs

    progress = progress or Progress(0)
    cap, mode = settings["fast_ft_samples"], settings["fast_ft_input"]
    epochs, lr, ft_batch = settings["fast_ft_epochs"], settings["fast_ft_lr"], settings["fast_ft_batch_size"]
    frozen = Frozen(qmodel)
    refs = list(frozen.graph.outputs)
    blocks = find_blocks(frozen.graph, float_graph)
    result = FastFinetune(0, mode)
    if not blocks:
        return result
    inputs = take_samples(data, input_specs(qmodel), cap, batch_size, steps, spread=False)
    result.samples = n = len(inputs[0])
    outputs = graph_probe(
        frozen.graph, lambda xs, symbolic: frozen.outputs(xs, refs, symbolic), "qstrat_fast_ft_outputs"
    )
    if reference is not None:
        floats = _run(BatchRunner(reference), inputs, batch_size)
    else:
        floats = _run(_float_outputs(frozen, float_graph), inputs, batch_size)
    result.output_mse_before = _mse_all(floats, _run(outputs, inputs, batch_size))
    everything = _Snapshot([v for b in blocks for v in b.variables()])
    held = max(1, n // 8) if n > 1 else 0
    bar = progress.data_pass(len(blocks), "block", 1, f"fast finetune of {len(blocks)} layers on {n} samples")
    for k, block in enumerate(blocks):
        probe = _block_probe(frozen, float_graph, block, mode)
        x, y = _run(probe, inputs, batch_size)
        result.blocks.append(_train(block, x, y, held, epochs, lr, ft_batch))
        del x, y
        _sync(frozen, block)
        bar.update(k + 1)
    result.output_mse_after = _mse_all(floats, _run(outputs, inputs, batch_size))
    if result.output_mse_after > result.output_mse_before:
        everything.restore()
        result.reverted = True
    return result


@contextlib.contextmanager
def _unstrided(block: Block):
    """For a block whose layer is a 1x1 convolution with strides: the slicing that picks the samples it reads, with
    the layer at stride 1 meanwhile (the same outputs, and no oneDNN filter gradient of a strided 1x1 convolution:
    see `qstrat.layers.strided`). Else None."""
    layer = block.wrapper.layer
    strides = pointwise_strides(layer)
    if strides is None:
        yield None
        return
    layer.strides = (1,) * len(strides)
    try:
        yield lambda a: pick(a, strides)
    finally:
        layer.strides = strides


def _train(block: Block, x, y, held: int, epochs: int, lr: float, batch_size: int) -> BlockResult:
    """Train one block on (x, y); keep the new weights only where they lower its error on all of x."""
    with _unstrided(block) as pick:
        return _fit(block, x if pick is None else pick(x), y, held, epochs, lr, batch_size)


def _epoch_order(rng, n: int, batch_size: int) -> np.ndarray:
    """One epoch's sample order: a seeded permutation, repeated (each time anew) to at least `MIN_STEPS` batches."""
    need = max(n, MIN_STEPS * batch_size)
    return np.concatenate([rng.permutation(n) for _ in range(-(-need // n))])[:need]


def _fit(block: Block, x, y, held: int, epochs: int, lr: float, batch_size: int) -> BlockResult:
    wrapper = block.wrapper
    plain = Chain(block.layers, name=f"qstrat_fast_ft_{block.name}")
    before = batch_mse(plain, x, y)
    start = _Snapshot(block.variables())
    try:
        attrs = [a for a in WEIGHTED if a in wrapper.quantizers]
        trainer = Trainer(block.layers, wrapper, attrs, name=f"qstrat_fast_ft_{block.name}_rounding")
    except UnsupportedError:  # a custom quantizer with no integer grid: nothing to choose between
        return BlockResult(block.name, before, before, 0, False)
    trainer(x[:1])
    own = {id(v) for v in trainer.rounding_variables()}
    frozen = [v for v in trainer.trainable_variables if id(v) not in own]
    for v in frozen:
        v.trainable = False
    train_x, train_y = (x[: len(x) - held], y[: len(y) - held]) if held else (x, y)
    val_x, val_y = (x[len(x) - held :], y[len(y) - held :]) if held else (x, y)
    batch_size = min(batch_size, len(train_x))  # no more than there are: then every step takes them all
    # With every sample in each step, the batch is the training set itself (each permutation's chunk, sorted,
    # is in order): converted to backend tensors once, not from NumPy at every step.
    whole = batch_size == len(train_x)
    tx, ty = (keras.ops.convert_to_tensor(train_x), keras.ops.convert_to_tensor(train_y)) if whole else (None, None)
    trainer.swap()
    ran = 0
    try:
        trainer.compile(optimizer=keras.optimizers.Adam(lr))
        # Its slots made now, outside the training step: TensorFlow traces a step that makes variables twice.
        trainer.optimizer.build(trainer.trainable_variables)
        best_val, best, waited = trainer.hard_error(val_x, val_y), _Snapshot(trainer.rounding_variables()), 0
        rng = np.random.default_rng(SEED)
        for epoch in range(epochs):
            warm = trainer.schedule(epoch, epochs)
            order = _epoch_order(rng, len(train_x), batch_size)
            for at in range(0, len(order), batch_size):  # batch by batch: fit() would copy the epoch's arrays
                if whole:
                    trainer.train_on_batch(tx, ty)
                    continue
                rows = np.sort(order[at : at + batch_size])
                trainer.train_on_batch(train_x[rows], train_y[rows])
            ran += 1
            val = trainer.hard_error(val_x, val_y)
            if val < best_val:
                best_val, best, waited = val, _Snapshot(trainer.rounding_variables()), 0
            elif not warm:
                waited += 1
                if waited >= PATIENCE:
                    break
        best.restore()
    finally:
        del tx, ty
        trainer.restore(keep=True)
        for v in frozen:
            v.trainable = True
    after = batch_mse(plain, x, y)
    if after >= before:
        start.restore()
        return BlockResult(block.name, before, before, ran, False)
    return BlockResult(block.name, before, after, ran, True)


def _sync(frozen: Frozen, block: Block) -> None:
    """Carry a block's trained values over to the frozen copy (the quantized inputs of the blocks after it)."""
    for layer in block.layers:
        if isinstance(layer, QuantizeWrapper):
            trained = [v.path.split("/")[-1] for v in layer.layer.trainable_weights]
            frozen.sync(layer, sorted(set(layer.quantizers) | set(trained)))
        elif not isinstance(layer, FakeQuant):
            frozen.sync(layer)


def _float_outputs(frozen: Frozen, float_graph: Graph):
    """The float graph's outputs (when the API gives no float model to compare with)."""
    from qstrat.graph.rebuild import run_graph

    return graph_probe(
        frozen.graph,
        lambda xs, symbolic: run_graph(float_graph, xs, list(float_graph.outputs), symbolic),
        "qstrat_fast_ft_float",
    )


def _mse_all(floats, quantized) -> float:
    return float(np.mean([_mse(f, q) for f, q in zip(floats, quantized, strict=True)]))


def _block_probe(frozen: Frozen, float_graph: Graph, block: Block, mode: str):
    """The block's input (the quantized model's, or the float model's) and its float output."""
    from qstrat.graph import rebuild
    from qstrat.graph.ir import taken_names, unique_name
    from qstrat.graph.rebuild import run_graph

    use_float = mode == "float" and block.float_input is not None

    def body(inputs, symbolic):
        if use_float:
            return run_graph(float_graph, inputs, [block.float_input, block.float_output], symbolic)
        x = frozen.outputs(inputs, [block.q_input], symbolic)[0]
        if not symbolic:
            return [x, *run_graph(float_graph, inputs, [block.float_output], symbolic)]
        # In a Keras model the float graph is one operation (a model of copies), so its layers keep
        # their names beside the quantized model's copies.
        name = unique_name("qstrat_fast_ft_float", taken_names(float_graph, frozen.qmodel))
        floats = rebuild(float_graph, outputs=[block.float_output], name=name)
        return [x, floats(inputs[0] if len(inputs) == 1 else inputs)]

    return graph_probe(frozen.graph, body, f"qstrat_fast_ft_{block.name}")
