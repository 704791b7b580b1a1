"""Bulk jobs: many images -> a folder of Parquet shards that reads as one dataset, updated in
place by each rerun (only new or changed inputs are embedded).

    sources.py    where images come from: folders (streamed), list files, built-ins, Parquet/CSV
                  tables (path or bytes column), WebDataset tar shards; one lazy (id, item)
                  stream, and each item's stamp (what tells that it changed)
    output.py     the shard files, their schema and metadata, `read_output`
    manifest.py   _manifest.json, and the checks a rerun makes before trusting a shard
    lock.py       one writer per output folder (flock on _lock)
    job.py        the job: what the folder holds, the update, its summary
    walk.py       the walk of one run: kept / new / changed / duplicate inputs, rows placed back
                  into shards, the progress bar
    writer.py     shards persisted in a background thread, shards rewritten without old rows
    ray_engine.py the same job on Ray Data (an actor per pipeline), same output

pyarrow is imported only when a shard is written or a Parquet table read, ray only by the Ray
engine, so `import runtime` stays light.
"""
