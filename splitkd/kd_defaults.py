"""KD defaults without torch (torchdistill's CIFAR-10 setting: tau = 4, alpha = 0.9)."""

DEFAULT_ALPHA = 0.9
DEFAULT_TEMPERATURE = 4.0
