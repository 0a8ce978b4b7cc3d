"""fr_dist: distributed, model-parallel face-recognition training.

Importing fr_dist creates no process group and touches no device.
"""

__version__ = "0.1.0"
