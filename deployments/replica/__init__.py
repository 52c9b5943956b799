"""The compute replica process: the decode loop over the requests the leader assigns it."""
