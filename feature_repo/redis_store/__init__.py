"""Feast's Redis online store, read and written without Feast's per-value work.

The one owner of the online store's wire format and of connections to it; every reader and
writer of the project goes through here (Feast's own store serves everything else):

* `wire`: keys, hash fields and values of one entity (Feast's layout);
* `tokens`, `encode`: whole batches of rows encoded column by column into those bytes;
* `writer`: the newer-row-wins script and the one background writer thread (materialization
  engine, stream sink);
* `reader`: pipelined HMGET reads, decoding, and when a key counts as never written (scorer,
  stream seeder);
* `client`: connections from Feast's online store config (a single node or a Redis Cluster),
  and `is_supported`;
* `script`, `cluster`: the newer-row-wins script as packed calls, and their routing to the
  node owning each key's hash slot on a Redis Cluster.
"""
