"""batchctl: run one piece of work over tens of thousands of videos on a fleet of GPU nodes."""

__version__ = "0.1.0"
