"""Pure-Python scheduling policy core: request state, KV block accounting, batch policies.

Nothing in this package imports torch or Ray, so the engine, the router and the simulator
all drive the very same classes.
"""
