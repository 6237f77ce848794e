"""The data layer: tiny-world scenes, Parquet shards, probe batches and their noise seeds, prompt lists."""
