"""Training: the one loop every trainer uses (`train`), its `Task` protocol, EMA and DDP helpers."""
from zoomldm.training.ema import EMA
from zoomldm.training.loop import ResumeError, SampleRNG, Task, train

__all__ = ["EMA", "ResumeError", "SampleRNG", "Task", "train"]
