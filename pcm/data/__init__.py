"""Shard reading/writing (webdataset), preprocessing, precompute, video: arrives with the data issue."""
