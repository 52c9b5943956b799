"""The cluster's wire contract: everything the router, the prefetch workers and the compute
replicas exchange through Redis (key names, typed records, token events). Every Redis field
is written here and nowhere else; processes import these types, never each other."""
