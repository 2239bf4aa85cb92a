"""The functional core every module calls: views of a call, the lse merge, the
fused and the gather paths, and the block schedule of sequence parallelism."""
