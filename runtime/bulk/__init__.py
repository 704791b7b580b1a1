"""Bulk jobs: many images -> a folder of Parquet shards with a manifest, resumable after a crash.

    sources.py   where images come from: folders (streamed), list files, built-ins, Parquet/CSV
                 tables (path or bytes column), WebDataset tar shards; one lazy (id, item) stream
    output.py    the shard files and manifest.json (atomic writes, resume checks)
    job.py       the job on this machine: shards in input order, progress, summary
    ray_engine.py the same job on Ray Data (an actor per pipeline), same output

pyarrow is imported only when a shard is written or a Parquet table read, ray only by the Ray
engine, so `import runtime` stays light.
"""
