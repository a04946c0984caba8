"""split-batch: run a dataset through a split bundle on Ray Data (head stage, then tail stage), with a
prediction cache: a rerun skips the rows already computed, and a killed run resumes where its last finished
block left off. Runs on a private local Ray cluster on 127.0.0.1, or on a cluster given by --ray-address.

  split-batch BUNDLE --input DIR --output preds.parquet
  split-batch BUNDLE --input data.parquet --output preds.parquet --batch-size 64 --concurrency 2
  split-batch BUNDLE --input DIR --compare            # the split (int8 head) against the full model, per output
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from cloud_tier.batch.cache import CacheError
from cloud_tier.batch.inputs import DATASET_FORMATS, BatchInputError
from cloud_tier.batch.pipeline import (
    CACHE_FILE,
    DEFAULT_CACHE_DIR,
    HEAD_PRECISIONS,
    BatchOptions,
    OptionError,
    RunError,
    format_agreement,
    run_batch,
)
from models.extras import MissingExtraError
from models.manifest import BundleError

DEFAULTS = BatchOptions()
CACHE_TEXT = """\
cache: a prediction is kept per (row content hash, bundle identity = model hash, cut, head precision, hashes of
  the files run), never per row id. Each finished block (--batch-size rows) is committed in one SQLite
  transaction, so a rerun, or a run after a crash or kill, computes only the rows not yet committed; the summary
  line says how many were skipped and computed. --no-cache neither reads nor writes it.
"""
EXIT_ERROR = 2  # bad input, bundle, cache or options: the message says which
EXIT_RUN_FAILED = 1  # the run failed on Ray (a stage's error, lost rows, actors that never started)


def build_parser() -> argparse.ArgumentParser:
    """The split-batch command line."""
    ap = argparse.ArgumentParser(prog="split-batch", description=__doc__, epilog=DATASET_FORMATS + CACHE_TEXT,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle", type=Path, help="the bundle directory (split-profile --out)")
    ap.add_argument("--input", type=Path, required=True, metavar="DIR|FILE.parquet",
                    help="the dataset: a directory of .npy files or a parquet file (formats below)")
    ap.add_argument("--output", type=Path, metavar="OUT.parquet",
                    help="where the predictions go (required unless --compare)")
    ap.add_argument("--compare", action="store_true",
                    help="also run the full model and report, per output, the split's agreement with it "
                         "(top-1 for classifiers, relative error)")
    ap.add_argument("--cut", help="the cut to run (default: the plan's chosen cut)")
    ap.add_argument("--head-precision", choices=HEAD_PRECISIONS, default=DEFAULTS.head_precision,
                    help="int8: the int8 head where the plan's accuracy gate passed it, as the agent runs it "
                         "(default %(default)s)")
    ap.add_argument("--batch-size", type=int, default=DEFAULTS.batch_size,
                    help="rows per stage call and per block committed to the cache (default %(default)s)")
    ap.add_argument("--concurrency", type=int, default=DEFAULTS.concurrency,
                    help="actors per stage (default %(default)s)")
    ap.add_argument("--threads", type=int, default=DEFAULTS.threads,
                    help="onnxruntime threads per actor (default %(default)s)")
    ap.add_argument("--tail-gpus", type=float, default=None,
                    help="GPUs per tail actor (default: 1 where the cluster has GPUs, else 0)")
    ap.add_argument("--id-column", default=DEFAULTS.id_column,
                    help="the parquet input's row-id column, also the output's (default %(default)s)")
    ap.add_argument("--cache-dir", type=Path, default=None,
                    help=f"the prediction cache's folder (default {DEFAULT_CACHE_DIR}; the file is {CACHE_FILE})")
    ap.add_argument("--no-cache", action="store_true", help="neither read nor write the prediction cache")
    ap.add_argument("--ray-address", help="a Ray cluster's address (default: a private local cluster on 127.0.0.1)")
    ap.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local cluster (default: all)")
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress bars (the summary lines remain)")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of split-batch: 0 on success, 2 with one line on stderr for a bad bundle, dataset or option,
    1 with one line for a run that failed on Ray."""
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.output is None and not args.compare:
        ap.error("give --output OUT.parquet (or --compare)")
    options = BatchOptions(cut=args.cut, head_precision=args.head_precision, batch_size=args.batch_size,
                           concurrency=args.concurrency, threads=args.threads, tail_gpus=args.tail_gpus,
                           use_cache=not args.no_cache, cache_dir=args.cache_dir, id_column=args.id_column,
                           ray_address=args.ray_address, num_cpus=args.num_cpus, progress=not args.quiet)
    try:
        options.check()
        result = run_batch(args.bundle, args.input, args.output, options, compare=args.compare)
    except (BatchInputError, BundleError, CacheError, MissingExtraError, OptionError, OSError) as exc:
        print(f"split-batch: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except RunError as exc:
        print(f"split-batch: {exc}", file=sys.stderr)
        return EXIT_RUN_FAILED
    if result.agreement is not None:
        print(format_agreement(result.agreement, result.label))
    return 0


if __name__ == "__main__":
    sys.exit(main())
