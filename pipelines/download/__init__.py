"""Download: img2dataset into webdataset shards, with our decoder, fetch, guard and commits."""
