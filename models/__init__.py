"""Getting a model in: loaders, the built-in zoo, ONNX conversion and the split-bundle manifest.

Importing this package needs only numpy; torch and onnx are imported where they are used.
"""

from models.extras import MissingExtraError, require
from models.manifest import Bundle, BundleError, CutArtifacts, TensorSpec

__all__ = ["Bundle", "BundleError", "CutArtifacts", "MissingExtraError", "TensorSpec", "require"]
