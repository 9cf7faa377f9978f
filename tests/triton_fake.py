"""A small stand-in for `triton_python_backend_utils`, the module Triton's python stub gives a model:
enough of its API (tensors, requests, responses, errors, metrics) to run a model's `initialize` and
`execute` in the test process. Requests are built here; responses and metric values are recorded so
tests can read them. The real-server tests stay: this only lets the Triton glue be tested alone."""

from __future__ import annotations

import sys
import types

import numpy as np


class TritonModelException(Exception):
    pass


class TritonError:
    def __init__(self, message: str):
        self._message = message

    def message(self) -> str:
        return self._message


class Tensor:
    def __init__(self, name: str, array: np.ndarray):
        self._name, self._array = name, np.asarray(array)

    @classmethod
    def from_dlpack(cls, name: str, value):
        import torch

        return cls(name, torch.from_dlpack(value).cpu().numpy())

    def name(self) -> str:
        return self._name

    def as_numpy(self) -> np.ndarray:
        return self._array

    def shape(self) -> tuple[int, ...]:
        return self._array.shape

    def is_cpu(self) -> bool:
        return True


class InferenceRequest:
    """A request of one sequence: its correlation id and its input tensors by name."""

    def __init__(self, correlation_id, tensors: dict[str, np.ndarray]):
        self._id, self.tensors = correlation_id, {k: Tensor(k, v) for k, v in tensors.items()}

    def correlation_id(self):
        return self._id


def get_input_tensor_by_name(request: InferenceRequest, name: str) -> Tensor | None:
    return request.tensors.get(name)


class InferenceResponse:
    def __init__(self, output_tensors=(), error: TritonError | None = None):
        self.outputs = {t.name(): t.as_numpy() for t in output_tensors}
        self._error = error

    def has_error(self) -> bool:
        return self._error is not None

    def error(self) -> TritonError | None:
        return self._error


class Metric:
    def __init__(self, family: "MetricFamily", labels: dict):
        self.family, self.labels, self.value = family, labels, 0.0

    def set(self, value: float) -> None:
        self.value = value

    def increment(self, value: float) -> None:
        assert self.family.kind == MetricFamily.COUNTER and value >= 0, "counters only go up"
        self.value += value


class MetricFamily:
    COUNTER, GAUGE = "COUNTER", "GAUGE"
    families: dict[str, "MetricFamily"] = {}

    def __init__(self, name: str, description: str, kind: str):
        self.name, self.description, self.kind, self.metrics = name, description, kind, []
        MetricFamily.families[name] = self

    def Metric(self, labels: dict) -> Metric:  # noqa: N802 - the real API's name
        metric = Metric(self, labels)
        self.metrics.append(metric)
        return metric


def install() -> types.ModuleType:
    """Make `import triton_python_backend_utils` give this module (fresh metric families)."""
    MetricFamily.families = {}
    module = sys.modules[__name__]
    sys.modules["triton_python_backend_utils"] = module
    return module
