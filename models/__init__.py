"""Getting a model in: loaders, the built-in zoo, ONNX conversion, the split-bundle manifest and the typed plan
document (`plandoc`), and the facts every package shares: dtypes, synthetic inputs, onnxruntime sessions.

Importing this package needs only numpy; torch and onnx are imported where they are used.
"""

from models.extras import MissingExtraError, require
from models.manifest import Bundle, BundleError, CutArtifacts, TensorSpec

__all__ = ["Bundle", "BundleError", "CutArtifacts", "MissingExtraError", "TensorSpec", "require"]
