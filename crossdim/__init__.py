"""crossdim: cross-dimensional transfer learning for medical image segmentation.

Importing the package starts nothing (no Ray, no MLflow run).
"""

__version__ = "0.1.0"
