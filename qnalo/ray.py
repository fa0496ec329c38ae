"""A qnalo model as a Ray Data `map_batches` callable class, for users' own Ray pipelines.

    import ray
    from qnalo.ray import Predictor

    ds = ray.data.read_images("s3://bucket/photos/", include_paths=True, mode="RGB")
    ds = ds.map_batches(Predictor, fn_constructor_kwargs={"model": "litv2_s", "top": 5},
                        concurrency=4, num_cpus=2, batch_size=16)
    ds.write_parquet("s3://bucket/predictions/")

Each actor loads its model once. A batch holds either an "image" column (decoded pixels, as
`ray.data.read_images` gives them) or a "path" column (the actor reads the files, local paths or anything
pyarrow.fs opens); every image then goes through its model family's official preprocessing. The output columns
are those of `qnalo predict` (qnalo.distributed.OUTPUT_COLUMNS). This module does not import Ray: the class is a
plain Python callable, so it can be built and tested without a cluster.
"""
from .distributed import Predictor

__all__ = ["Predictor"]
