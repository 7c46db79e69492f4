"""The harness every recipe runs on (:mod:`.harness`), its contract with recipes (:mod:`.task`), the
standard step source (:mod:`.steps`) and the one optimizer update they all use (:mod:`.update`)."""

from .harness import Harness
from .steps import ExampleSteps
from .task import LossFn, Models, StepPlan, StepSource, Task, TrainResult, data_stream
from .tracking import Window
from .update import Updater

__all__ = [
    "ExampleSteps",
    "Harness",
    "LossFn",
    "Models",
    "StepPlan",
    "StepSource",
    "Task",
    "TrainResult",
    "Updater",
    "Window",
    "data_stream",
]
