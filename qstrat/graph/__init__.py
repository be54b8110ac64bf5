"""Graph capture and rebuild: Keras model <-> `Graph`."""

from qstrat.graph.capture import UnsupportedModelError, capture
from qstrat.graph.ir import Graph, Node, TensorRef
from qstrat.graph.rebuild import copy_layer, rebuild

__all__ = ["Graph", "Node", "TensorRef", "UnsupportedModelError", "capture", "copy_layer", "rebuild"]
