"""Static inference over a dataset (`split-batch`): a bundle's head and tail as two Ray Data stages, with a
prediction cache that makes reruns and resumed runs skip the rows already computed.

- `inputs`: reading a dataset (a directory of .npy files, or a parquet file), each row checked against the
  bundle's inputs before its tensor is made; each row's content hash.
- `cache`: the prediction cache (SQLite in WAL mode, one transaction per finished block; no pickle).
- `pipeline`: the bundle's models and identity, the Ray Data stages, the run, `--compare`, the output file.
- `cli`: the `split-batch` command.

Ray and pyarrow are imported where they are used: without the [ray] extra `split-batch` says which pip install
line adds them. The serving node and the edge agent import nothing from here.
"""

from cloud_tier.batch.cache import PredictionCache
from cloud_tier.batch.inputs import BatchInputError, InputSpec, scan_dataset

__all__ = ["PredictionCache", "BatchInputError", "InputSpec", "scan_dataset"]
